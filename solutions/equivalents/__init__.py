"""Equivalents catalogues, one module per stage (testcases/manifest.py names them); see solutions/tools/variants.py."""

"""Placeholder: written in a later stage."""

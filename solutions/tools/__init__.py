"""Instructor tooling: stub generation, mutants and equivalents, stress, calibration, the handout and the
Gradescope package. A handout drops the whole solutions/ folder, this one with it."""

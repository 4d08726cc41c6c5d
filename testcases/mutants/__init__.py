"""The mutant catalogue: small, named variants of the reference, each a mistake students make.

A mutant is the reference with a few exact text replacements (each ``old`` must occur exactly
once in its file, so a mutant whose anchor drifts away fails loudly instead of testing nothing).
``python -m testcases.mutants.run`` runs the graded suites against every mutant and fails if
any mutant survives. Add a mutant next to its stage's others.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mutant:
    name: str  # short id, e.g. "b_random_init"
    file: str  # which student file it changes, e.g. "model/lora.py"
    mistake: str  # the student mistake, in one sentence
    replace: tuple[tuple[str, str], ...]  # (old, new) exact text replacements in the reference

    def apply(self, source: str) -> str:
        for old, new in self.replace:
            count = source.count(old)
            if count != 1:
                raise ValueError(f"mutant {self.name}: {old!r} occurs {count} times in {self.file}, expected once")
            source = source.replace(old, new)
        return source

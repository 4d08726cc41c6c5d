"""Command-line pieces shared by the capstone's commands (finetune, distributed, fsdp).

Kept apart so that ``training/finetune.py`` (which trains under torchrun with the distributed
trainers) and ``training/distributed.py`` / ``training/fsdp.py`` (whose command lines reuse its
conventions) import this module instead of each other.
"""

from __future__ import annotations

import argparse
import re

from training.qlora_trainer import TrainConfig


def override_defaults(parser: argparse.ArgumentParser, **defaults: object) -> None:
    """``parser.set_defaults(**defaults)``, and the same defaults in the options' help texts."""
    parser.set_defaults(**defaults)
    for action in parser._actions:
        if action.dest in defaults and action.help:
            action.help = re.sub(r"\(default: [^)]*\)$", f"(default: {defaults[action.dest]})", action.help)


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of parsed options (``config_parser``'s fields; lists become tuples, other options are ignored)."""
    fields = set(TrainConfig.__dataclass_fields__)
    return TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items() if k in fields})

"""Command-line parsing shared by ``nxd-lora`` and ``launch/sagemaker.py`` (so neither imports the other)."""

from __future__ import annotations

import argparse


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """argparse, with ``section.key=value`` overrides allowed on both sides of options.

    A ``nargs="*"`` positional only takes the run of values before the first option, so
    ``plan cfg a=1 --device h100 b=2`` would reject ``b=2``; such leftovers join the overrides.
    """
    args, leftover = parser.parse_known_args(argv)
    late = [item for item in leftover if "=" in item and not item.startswith("-")]
    unknown = [item for item in leftover if item not in late]
    if unknown or (late and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or late)}")
    if late:
        args.overrides = list(args.overrides or []) + late
    return args

"""argparse types shared by the benchmarks' command lines."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def positive_float(text: str) -> float:
    """argparse type: a number > 0."""
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def rounds_arg(text: str) -> int:
    """argparse type: at least 3 rounds, so the medians mean something."""
    value = int(text)
    if value < 3:
        raise argparse.ArgumentTypeError("at least 3 rounds, so the medians mean something")
    return value


def add_pin_option(parser: argparse.ArgumentParser, help_text: str) -> None:
    """--pin / --no-pin (default on): whether the benchmark pins its processes to CPUs as `help_text` says."""
    parser.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True, help=help_text)

"""Command-line argument types shared by the benchmark scripts."""
from __future__ import annotations

import argparse


def shapes_arg(text: str) -> list[tuple[int, int]]:
    """``8x4096,2x4096`` -> ``[(8, 4096), (2, 4096)]`` (batch x sequence length); an argparse type,
    so a malformed list is a usage error naming the value instead of a traceback."""
    try:
        shapes = [tuple(int(x) for x in item.split("x")) for item in text.split(",")]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 2 or min(s) < 1 for s in shapes):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of BxT, got {text!r}")
    return shapes

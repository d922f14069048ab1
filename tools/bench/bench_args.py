"""Command-line argument types shared by the benchmark scripts."""
from __future__ import annotations

import argparse


def _positive_sizes(text: str) -> list[tuple[int, ...]]:
    """``8x4096,4096x2x2048`` -> ``[(8, 4096), (4096, 2, 2048)]``, or [] if any size is not a positive int."""
    try:
        shapes = [tuple(int(x) for x in item.split("x")) for item in text.split(",")]
    except ValueError:
        return []
    return shapes if all(min(s) >= 1 for s in shapes) else []


def shapes_arg(text: str) -> list[tuple[int, int]]:
    """``8x4096,2x4096`` -> ``[(8, 4096), (2, 4096)]`` (batch x sequence length); an argparse type,
    so a malformed list is a usage error naming the value instead of a traceback."""
    shapes = _positive_sizes(text)
    if not shapes or any(len(s) != 2 for s in shapes):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of BxT, got {text!r}")
    return shapes


def sizes_arg(text: str) -> list[tuple[int, ...]]:
    """``4096x2x2048,8x64`` -> tensor shapes of any rank; an argparse type like :func:`shapes_arg`."""
    shapes = _positive_sizes(text)
    if not shapes:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of sizes joined by x "
                                         f"(e.g. 4096x2x2048), got {text!r}")
    return shapes


def pattern_arg(text: str) -> tuple[int, int, int]:
    """``64/0/0`` -> ``(64, 0, 0)`` (dilation D / window W / initial tokens P); an argparse type."""
    try:
        pattern = tuple(int(x) for x in text.split("/"))
    except ValueError:
        pattern = ()
    if len(pattern) != 3:
        raise argparse.ArgumentTypeError(f"expected D/W/P (e.g. 64/0/0), got {text!r}")
    return pattern


def patterns_arg(text: str) -> list[tuple[int, int, int]]:
    """``64/0/0,16/256/4`` -> ``[(64, 0, 0), (16, 256, 4)]``; an argparse type."""
    try:
        return [pattern_arg(item) for item in text.split(",")]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of D/W/P (e.g. 64/0/0,16/256/4), got {text!r}") from None


def positive_ints_arg(text: str) -> list[int]:
    """``4,8,16`` -> ``[4, 8, 16]`` (empty text: none); an argparse type."""
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        values = [0]
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of positive integers, got {text!r}")
    return values


def int_pairs_arg(text: str) -> list[tuple[int, int]]:
    """``2:1,1:3`` -> ``[(2, 1), (1, 3)]`` (empty text: none), both positive; an argparse type."""
    try:
        pairs = [tuple(int(x) for x in item.split(":")) for item in text.split(",") if item]
    except ValueError:
        pairs = [()]
    if any(len(p) != 2 or min(p) < 1 for p in pairs):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of A:B positive integer pairs, got {text!r}")
    return pairs


def names_arg(choices):
    """An argparse type for a comma-separated list of names from ``choices`` (order kept)."""
    def parse(text: str) -> list[str]:
        names = [v for v in text.split(",") if v]
        unknown = [v for v in names if v not in choices]
        if not names or unknown:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list of {', '.join(choices)}, got {text!r}")
        return names
    return parse


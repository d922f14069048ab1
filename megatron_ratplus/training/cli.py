"""``ratplus-pretrain``: pretrain / adapt RAT+ models on Megatron-core.

Usage::

    ratplus-pretrain RECIPE.yaml [section.key=value ...] [--dry-run --world-size N]
    torchrun --nproc_per_node=8 -m megatron_ratplus.training.cli RECIPE.yaml train.lr=8e-5

Prints the fully resolved config at start. ``--dry-run`` resolves the recipe for a world size and
prints the plan (layout, batches, steps, parameters, FLOPs, memory per GPU, time to finish)
without touching a GPU.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import List, Optional

import yaml

from ..argtypes import positive_float, positive_int
from ..warning_filters import hide_in_child_processes
from .config import ConfigError, RunConfig, load_config


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ratplus-pretrain", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", nargs="?", help="YAML recipe (see recipes/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=8e-5 model.dilation=16")
    p.add_argument("--dry-run", action="store_true", help="print the plan for --world-size and exit")
    p.add_argument("--world-size", type=positive_int, default=None,
                   help="GPUs for --dry-run (default: $WORLD_SIZE or 1)")
    p.add_argument("--gpu-memory-gib", type=positive_float, default=80.0,
                   help="GPU memory for --dry-run (default 80)")
    p.add_argument("--tokens-per-sec-per-gpu", type=positive_float, default=None,
                   help="throughput for the --dry-run time estimate (default: this stack's rate measured "
                        "on one H100, scaled to the model)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return p


def _split_overrides(recipe: Optional[str], overrides: List[str]):
    """Allow ``ratplus-pretrain train.max_steps=3`` without a recipe."""
    if recipe is not None and "=" in recipe and not os.path.exists(recipe):
        return None, [recipe] + list(overrides)
    return recipe, list(overrides)


def _environment_world_size() -> int:
    text = os.environ.get("WORLD_SIZE", "1")
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(f"WORLD_SIZE={text!r} in the environment is not a positive integer (give --world-size)")
    return int(text)


def dry_run(cfg: RunConfig, world_size: int, gpu_memory_gib: float, tokens_per_sec: Optional[float]) -> str:
    from .plan import format_plan, make_plan
    return format_plan(make_plan(cfg, world_size, gpu_memory_gib=gpu_memory_gib,
                                 tokens_per_sec_per_gpu=tokens_per_sec))


def show_package_notes() -> None:
    """Print this package's INFO log records (which checkpoint was loaded, an allowed change of attention
    pattern on loading, RNG states not restored under another layout, background saves) on stderr.
    Without a handler Python shows only warnings, and enabling INFO on the root logger would also show
    Megatron-core's own INFO chatter."""
    logger = logging.getLogger("megatron_ratplus")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def main(argv: Optional[List[str]] = None) -> int:
    hide_in_child_processes()
    # intermixed: overrides may follow the options (``--dry-run --world-size 8 train.lr=1e-4``)
    ns = _parser().parse_intermixed_args(argv)
    recipe, overrides = _split_overrides(ns.recipe, ns.overrides)
    try:
        cfg = load_config(recipe, overrides)
        if ns.print_config:
            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            return 0
        if ns.dry_run:
            world = ns.world_size or _environment_world_size()
            print(dry_run(cfg, world, ns.gpu_memory_gib, ns.tokens_per_sec_per_gpu))
            return 0
    except ConfigError as e:
        print(f"ratplus-pretrain: error: {e}", file=sys.stderr)
        return 2
    from ..checkpoint.errors import CheckpointError
    from .run import run_training
    show_package_notes()
    try:
        run_training(cfg)
    except (ConfigError, CheckpointError) as e:      # a checkpoint refused (missing, corrupt, mismatched)
        print(f"ratplus-pretrain: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

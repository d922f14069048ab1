"""``ratplus-ckpt``: look at checkpoints without loading any tensor.

    ratplus-ckpt inspect DIR [--json]    # DIR: an iter_* checkpoint, or a save_dir (its latest)
    ratplus-ckpt list SAVE_DIR [--json]  # every iter_* directory, complete or not

``inspect`` prints the iteration, tokens consumed, parallel layout it was saved with, model args,
run config, and every stored tensor with its global shape and dtype (read from the
``dist_checkpointing`` metadata). ``list`` also reports leftovers of killed processes (a
retention deletion or a save that was interrupted) with their size; nothing removes them.
Exit status: 0 on success, 2 for a missing or incomplete checkpoint, or one whose files are
visibly damaged (the message says what is wrong). "complete" means every file is present, long
enough and readable as an index or pickle; tensor bytes are not verified (no checksums are
stored), so same-size corruption goes unnoticed.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import List, Optional

from .errors import CheckpointError
from .manager import resolve_checkpoint_local
from .paths import TRACKER_NAME, format_size, leftovers, list_iter_dirs, looks_like_checkpoint, read_tracker
from .validate import (RATPLUS_KEY, checkpoint_problems, decode_train_state, dir_size_bytes,
                       load_common, read_dcp_index)

RUN_CONFIG_KEYS = ("run_config", "config")

log = logging.getLogger(__name__)


def _tensor_list(ckpt_dir: Path) -> List[dict]:
    """Global shape and dtype of every stored tensor, from Megatron's metadata reader."""
    from megatron.core.dist_checkpointing import load_tensors_metadata
    try:
        meta = load_tensors_metadata(str(ckpt_dir))
        tensors = [{"name": key, "shape": list(t.global_shape), "dtype": str(t.dtype).replace("torch.", "")}
                   for key, t in meta.items()]
    except Exception:  # fall back to the PyTorch-DCP index Megatron's reader is built on
        index = read_dcp_index(ckpt_dir).state_dict_metadata
        tensors = [{"name": key, "shape": list(m.size),
                    "dtype": str(m.properties.dtype).replace("torch.", "")}
                   for key, m in index.items() if hasattr(m, "size")]
    return sorted(tensors, key=lambda t: t["name"])


def describe(ckpt_dir: Path, with_tensors: bool = True) -> dict:
    common = load_common(ckpt_dir)
    info = common.get(RATPLUS_KEY, {})
    train_state = decode_train_state(common)
    run_config = next((train_state[k] for k in RUN_CONFIG_KEYS if k in train_state), None)
    model_args = info.get("model_args") or train_state.get("model_args")
    if hasattr(model_args, "to_dict"):
        model_args = model_args.to_dict()
    out = {
        "path": str(ckpt_dir),
        "iteration": info.get("iteration", train_state.get("step")),
        "consumed_tokens": train_state.get("consumed_tokens"),
        "saved_at": info.get("saved_at"),
        "versions": info.get("versions"),
        "layout": info.get("layout"),
        "optimizer": (info.get("optimizer") or {}).get("kind"),
        "has_scheduler_state": common.get("scheduler") is not None,
        "model_args": model_args,
        "architecture": info.get("architecture"),
        "run_config": run_config,
        "train_state_keys": sorted(train_state),
    }
    if with_tensors:
        out["tensors"] = _tensor_list(ckpt_dir)
    return out


def _flatten(prefix: str, value, out: list) -> None:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out.append((prefix, value))


def _print_description(d: dict) -> None:
    layout = d.get("layout") or {}
    print(f"checkpoint       {d['path']}")
    print(f"iteration        {d['iteration']}")
    print(f"tokens consumed  {d['consumed_tokens'] if d['consumed_tokens'] is not None else 'unknown'}")
    if d.get("saved_at"):
        v = d.get("versions") or {}
        print(f"saved at         {d['saved_at']} "
              f"(torch {v.get('torch')}, megatron-core {v.get('megatron_core')})")
    if layout:
        vpp = layout.get("virtual_pipeline_parallel")
        print(f"saved layout     TP={layout.get('tensor_parallel')} PP={layout.get('pipeline_parallel')}"
              f"{f' VPP={vpp}' if vpp else ''} DP={layout.get('data_parallel')} "
              f"(world size {layout.get('world_size')})")
    print(f"optimizer state  {d['optimizer'] or 'none (weights only)'}")
    print("model args:")
    for k, v in (d.get("model_args") or {}).items():
        print(f"  {k} = {v}")
    if not d.get("model_args"):
        print("  (not stored)")
    print("run config:")
    if d.get("run_config"):
        items: list = []
        _flatten("", d["run_config"], items)
        for k, v in items:
            print(f"  {k} = {v}")
    else:
        print("  (not stored)")
    if "tensors" in d:
        tensors = d["tensors"]
        width = max([len(t["name"]) for t in tensors] + [4])
        print(f"tensors ({len(tensors)}):")
        for t in tensors:
            print(f"  {t['name']:<{width}}  {str(tuple(t['shape'])):<22} {t['dtype']}")


def cmd_inspect(path: Path, as_json: bool, with_tensors: bool) -> int:
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if not looks_like_checkpoint(path):
        for leftover, size, what in leftovers(path):
            log.warning("leftover %s (%s): %s", leftover, format_size(size), what)
    ckpt_dir = resolve_checkpoint_local(str(path), None)
    if ckpt_dir is None:
        raise CheckpointError(f"no complete checkpoint in {path}")
    d = describe(ckpt_dir, with_tensors)
    if as_json:
        print(json.dumps(d, indent=2, default=str))
    else:
        _print_description(d)
    return 0


def list_checkpoints(save_dir: Path) -> dict:
    tracked, tracker_problem = read_tracker(save_dir)
    rows = []
    for it, path in list_iter_dirs(save_dir):
        problems = checkpoint_problems(path)
        row = {"iteration": it, "path": str(path), "complete": not problems, "problems": problems,
               "latest": it == tracked, "size_bytes": dir_size_bytes(path), "consumed_tokens": None}
        if not problems:
            try:
                row["consumed_tokens"] = decode_train_state(load_common(path)).get("consumed_tokens")
            except Exception:
                pass
        rows.append(row)
    return {"save_dir": str(save_dir), "tracker": tracked, "tracker_problem": tracker_problem,
            "checkpoints": rows,
            "leftovers": [{"path": str(p), "size_bytes": size, "what": what}
                          for p, size, what in leftovers(save_dir)]}


def cmd_list(path: Path, as_json: bool) -> int:
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory")
    if looks_like_checkpoint(path) and not list_iter_dirs(path):
        raise CheckpointError(f"{path} is a single checkpoint, not a save_dir: "
                              f"use 'ratplus-ckpt inspect {path}'")
    listing = list_checkpoints(path)
    if as_json:
        print(json.dumps(listing, indent=2))
        return 0
    print(f"save_dir {path}")
    if listing["tracker_problem"]:
        print(f"  warning: {listing['tracker_problem']}")
    elif listing["tracker"] is None:
        print(f"  no {TRACKER_NAME} (no save has completed)")
    if not listing["checkpoints"]:
        print("  (no checkpoints)")
    for row in listing["checkpoints"]:
        size = f"{row['size_bytes'] / 2**20:.1f} MiB" if row["size_bytes"] is not None else "?"
        status = "complete" if row["complete"] else "INCOMPLETE: " + "; ".join(row["problems"])
        tokens = f" tokens={row['consumed_tokens']}" if row["consumed_tokens"] is not None else ""
        latest = "  <- latest" if row["latest"] else ""
        print(f"  iter_{row['iteration']:07d}  {size:>10}  {status}{tokens}{latest}")
    if listing["leftovers"]:
        print("leftovers of interrupted saves or deletions (not removed automatically):")
        for item in listing["leftovers"]:
            print(f"  {Path(item['path']).name}  {format_size(item['size_bytes'])}  {item['what']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ratplus-ckpt", description="Inspect megatron-ratplus checkpoints.")
    sub = p.add_subparsers(dest="command", required=True)
    pi = sub.add_parser("inspect", help="iteration, tokens, config and tensor list of one checkpoint")
    pi.add_argument("path", type=Path, help="an iter_* checkpoint directory, or a save_dir (its latest)")
    pi.add_argument("--json", action="store_true", help="machine-readable output")
    pi.add_argument("--no-tensors", action="store_true", help="skip the tensor list")
    pl = sub.add_parser("list", help="all checkpoints of a save_dir, complete or not")
    pl.add_argument("path", type=Path, help="a save_dir")
    pl.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="ratplus-ckpt: %(levelname)s: %(message)s")
    try:
        if args.command == "inspect":
            return cmd_inspect(args.path, args.json, not args.no_tensors)
        return cmd_list(args.path, args.json)
    except CheckpointError as e:
        print(f"ratplus-ckpt: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

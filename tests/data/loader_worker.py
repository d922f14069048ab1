"""Subprocess side of the data tests (a fresh process per run: real resume, real distributed ranks).

    python loader_worker.py resume '{"dataset": ..., "state": path|null, "n": 5, ...}'
    python loader_worker.py dist   '{"rank": r, "world": w, "port": p, "tp": t, ...}'

Prints one JSON line with the batches it saw (lists of token ids) on stdout.
"""
from __future__ import annotations

import json
import sys

import torch


def _loader(cfg: dict, **kw):
    from megatron_ratplus.data import build_pretraining_loader

    return build_pretraining_loader([{"local": cfg["dataset"]}], split=cfg.get("split", "train"),
                                    seq_len=cfg["seq_len"], micro_batch_size=cfg["mbs"], seed=cfg["seed"],
                                    num_workers=cfg.get("num_workers", 0), global_batch_size=cfg.get("gbs"), **kw)


def resume(cfg: dict) -> dict:
    loader = _loader(cfg, dp_rank=0, dp_size=1)
    if cfg.get("state"):
        with open(cfg["state"]) as fh:
            loader.load_state_dict(json.load(fh))
    it = iter(loader)
    batches = [next(it).tolist() for _ in range(cfg["n"])]
    return {"batches": batches, "state": loader.state_dict()}


def dist(cfg: dict) -> dict:
    """Ranks laid out as dp × tp (tp fastest); the tp=0 rank of each replica reads, then broadcasts."""
    from megatron_ratplus.data import broadcast_batch

    rank, world, tp = cfg["rank"], cfg["world"], cfg["tp"]
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{cfg['port']}",
                                         rank=rank, world_size=world)
    dp_size = world // tp
    dp_rank, tp_rank = divmod(rank, tp)
    readers = [d * tp for d in range(dp_size)]
    reader_group = torch.distributed.new_group(readers) if tp > 1 else None
    mp_groups = [torch.distributed.new_group(list(range(d * tp, d * tp + tp))) for d in range(dp_size)] if tp > 1 else []
    mp_group = mp_groups[dp_rank] if tp > 1 else None
    src = dp_rank * tp
    shape = (cfg["mbs"], cfg["seq_len"] + 1)
    loader = None
    if tp_rank == 0:
        loader = _loader(cfg, dp_rank=dp_rank, dp_size=dp_size, group=reader_group)
        if cfg.get("state"):
            loader.load_state_dict(cfg["state"])
        n = (len(loader) if cfg["n"] == "epoch" else cfg["n"]) + cfg.get("extra", 0)
        count = torch.tensor([n])
    else:
        count = torch.tensor([0])
    if tp > 1:
        torch.distributed.broadcast(count, src=src, group=mp_group)
    n = int(count.item())
    it = iter(loader) if loader is not None else None
    batches = []
    state = None
    for i in range(n):
        if i == cfg.get("save_after") and loader is not None:
            state = json.loads(json.dumps(loader.state_dict()))
        tokens = next(it) if it is not None else None
        if tp > 1:
            tokens = broadcast_batch(tokens, src=src, group=mp_group, shape=shape, device="cpu")
        batches.append(tokens.tolist())
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    return {"rank": rank, "dp_rank": dp_rank, "tp_rank": tp_rank, "batches": batches, "state": state,
            "epoch_len": len(loader) if loader is not None else None}


if __name__ == "__main__":
    mode, cfg = sys.argv[1], json.loads(sys.argv[2])
    result = {"resume": resume, "dist": dist}[mode](cfg)
    print(json.dumps(result))

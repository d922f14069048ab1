"""Small training set-up shared by the checkpoint tests and their torchrun worker.

A 4-layer RAT+ model (d=64, 4 heads, vocab 100 -> padded 128) built by the real training set-up
(``build_training_objects``: Megatron DDP, Megatron optimizer, OptimizerParamScheduler) and
stepped with the real pipeline ``forward_backward`` on synthetic token batches; and the walk over a
process's descendants that the process tests use.
"""
from __future__ import annotations

import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

import torch  # noqa: E402

from megatron_ratplus.checkpoint.state import inner_optimizers  # noqa: E402
from megatron_ratplus.model import set_attention_mode  # noqa: E402
from megatron_ratplus.training.config import load_config  # noqa: E402
from megatron_ratplus.training.setup import build_training_objects  # noqa: E402
from megatron_ratplus.training.step import forward_backward  # noqa: E402

SEQ = 16
VOCAB = 100
MICRO = 2
GLOBAL = 4
TOTAL_STEPS = 20


def run_config(tp=1, pp=1, precision="fp32", extra=()):
    return load_config(None, [
        f"train.max_steps={TOTAL_STEPS}", f"train.seq_len={SEQ}", f"train.global_batch_size={GLOBAL}",
        f"train.micro_batch_size={MICRO}", f"train.precision={precision}", "train.lr=3e-3",
        "train.warmup_fraction=0.1", "model.spec=local", "model.kernel_backend=reference",
        "model.num_layers=4", "model.hidden_size=64", "model.num_attention_heads=4",
        f"model.max_seq_len={SEQ}", "model.dilation=4", "model.local_window=1", "model.initial_tokens=1",
        f"parallel.tensor_parallel={tp}", f"parallel.pipeline_parallel={pp}", *extra,
    ])


def build(cfg):
    args = cfg.model.model_args(vocab_size=VOCAB, seq_len=SEQ)
    return build_training_objects(cfg, args, TOTAL_STEPS)


def build_distributed_optimizer(cfg, args=None, total_steps=TOTAL_STEPS):
    """As :func:`build`, with Megatron's distributed optimizer (and the DDP options of ``cfg`` such as
    ``overlap_param_gather``), which setup.py builds on GPU only; forced on here as on GPU (gloo has
    the collectives they need)."""
    from megatron_ratplus.training import setup
    cfg.parallel.distributed_optimizer = True
    args = args or cfg.model.model_args(vocab_size=VOCAB, seq_len=SEQ)
    tconfig = setup.build_transformer_config(cfg, args)
    chunks = setup.build_model_chunks(cfg, args, tconfig)
    real = setup.cpu_mode_enabled
    setup.cpu_mode_enabled = lambda: False
    try:
        model = setup.wrap_ddp(cfg, tconfig, chunks)
        optimizer = setup.build_optimizer(cfg, tconfig, model)
    finally:
        setup.cpu_mode_enabled = real
    assert model[0].ddp_config.use_distributed_optimizer
    scheduler = setup.build_scheduler(cfg, optimizer, total_steps)
    return setup.TrainingObjects(args, tconfig, model, optimizer, scheduler)


def batch(step, dp_rank=0, dp_size=1):
    """Micro-batches of global batch ``step`` that this DP rank consumes."""
    gen = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, VOCAB, (GLOBAL, SEQ + 1), generator=gen)
    per_rank = GLOBAL // dp_size
    mine = tokens[dp_rank * per_rank:(dp_rank + 1) * per_rank]
    return list(mine.split(MICRO))


def train_step(objs, step, mode="dense", dp_rank=0, dp_size=1):
    set_attention_mode(objs.model, mode)
    for m in objs.model:
        m.zero_grad_buffer()
    objs.optimizer.zero_grad()
    loss = forward_backward(objs.model, batch(step, dp_rank, dp_size), seq_len=SEQ)
    objs.optimizer.step()
    objs.scheduler.step(1)
    return loss.item()


def train_and_save(objs, save_dir, steps=(1, 2, 3), train_state=lambda step: {}, after_save=None):
    """A save_dir with a complete checkpoint after each of ``steps`` training steps, saved with the
    train state ``{"step", "model_args"}`` plus ``train_state(step)``; ``after_save(step)`` runs
    after each save."""
    from megatron_ratplus.checkpoint import CheckpointManager
    mgr = CheckpointManager(save_dir)
    for step in steps:
        train_step(objs, step)
        mgr.save(step, objs.model, objs.optimizer, objs.scheduler,
                 {"step": step, "model_args": objs.model_args.to_dict(), **train_state(step)})
        if after_save is not None:
            after_save(step)
    mgr.close()


def eval_loss(objs, step, mode="dense", dp_rank=0, dp_size=1):
    set_attention_mode(objs.model, mode)
    with torch.no_grad():
        return forward_backward(objs.model, batch(step, dp_rank, dp_size), seq_len=SEQ,
                                forward_only=True).item()


def model_weights(objs):
    """Plain copies of every model tensor (TP=1 names), ``_extra_state`` left out."""
    from megatron_ratplus.checkpoint.architecture import unwrap_model
    out = {}
    for i, chunk in enumerate(objs.model):
        for k, v in unwrap_model(chunk).state_dict().items():
            if not k.endswith("_extra_state"):
                out[f"{i}.{k}"] = v.detach().clone()
    return out


def optimizer_states(objs):
    """Adam state of every parameter, in parameter-group order: [(exp_avg, exp_avg_sq, step)]."""
    out = []
    for opt in inner_optimizers(objs.optimizer):
        for group in opt.optimizer.param_groups:
            for p in group["params"]:
                st = opt.optimizer.state[p]
                out.append({k: (v.detach().clone() if hasattr(v, "detach") else v) for k, v in st.items()})
    for opt in inner_optimizers(objs.optimizer):
        for group in getattr(opt, "fp32_from_float16_groups", []):
            for p in group:
                out.append({"fp32_master": p.detach().clone()})
    return out


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def descendants(pid: int) -> list:
    """Pids of every descendant of ``pid`` (Linux /proc), each listed before its own children."""
    found, todo = [], [pid]
    while todo:
        for task in Path(f"/proc/{todo.pop()}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            found += children
            todo += children
    return found

"""The LR schedule the trainer builds (build_scheduler): Megatron's convention, pinned."""
import math
from types import SimpleNamespace

import pytest

from megatron_ratplus.training.config import load_config
from megatron_ratplus.training.setup import build_scheduler


def lrs_per_step(overrides, steps):
    """The LR each of ``steps`` batches trains with (the loop reads it, then steps the scheduler)."""
    cfg = load_config("recipes/tiny-cpu.yaml", overrides)
    optimizer = SimpleNamespace(param_groups=[{"lr": None, "weight_decay": None}])
    scheduler = build_scheduler(cfg, optimizer, steps)
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        scheduler.step(increment=1)
    return cfg, out, optimizer.param_groups[0]["weight_decay"]


def test_warmup_then_cosine_to_min_lr():
    cfg, lrs, wd = lrs_per_step(["train.lr=1e-3", "train.min_lr=1e-5", "train.warmup_fraction=0.1",
                                 "train.lr_decay_style=cosine", "train.weight_decay=0.1"], 20)
    assert lrs[:3] == pytest.approx([0.0, 5e-4, 1e-3])        # step 1 at init_lr 0, as in Megatron-LM
    for step, lr in enumerate(lrs[2:], start=2):               # cosine from the peak at step 2 to step 20
        ratio = (step - 2) / 18
        assert lr == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5 * (math.cos(math.pi * ratio) + 1)), step
    assert lrs[-1] > 1e-5 and wd == pytest.approx(0.1)


def test_no_warmup_starts_at_the_peak_and_constant_stays():
    _, lrs, _ = lrs_per_step(["train.lr=3e-4", "train.warmup_fraction=0", "train.lr_decay_style=linear",
                              "train.min_lr=0"], 10)
    assert lrs[0] == pytest.approx(3e-4) and lrs == sorted(lrs, reverse=True)
    assert lrs[-1] == pytest.approx(3e-4 / 10)
    _, lrs, _ = lrs_per_step(["train.lr=3e-4", "train.warmup_fraction=0", "train.lr_decay_style=constant"], 5)
    assert lrs == pytest.approx([3e-4] * 5)

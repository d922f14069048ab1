"""Resolution adaptation: start from pretrained weights (not optimizer), sparse-only training."""
import json
import re

import pytest

from ..conftest import tiny_cli_overrides
from ..torchrun import torchrun

pytestmark = pytest.mark.slow


def losses(path):
    return [json.loads(line) for line in path.read_text().splitlines() if '"losses"' in line]


def test_adaptation_starts_from_pretrained_weights_with_fresh_optimizer(tmp_path, tiny_dataset):
    pre, ada = tmp_path / "pre", tmp_path / "ada"
    pre.mkdir()
    ada.mkdir()
    torchrun("megatron_ratplus.training.cli", *tiny_cli_overrides(tiny_dataset, pre, steps=12),
             f"checkpoint.save_dir={pre}/ck", nproc=1, module=True)
    proc = torchrun("megatron_ratplus.training.cli", *tiny_cli_overrides(tiny_dataset, ada, steps=3),
                    "train.joint=false", "train.mode=sparse", "model.dilation=8", "model.local_window=4",
                    "model.initial_tokens=2", "train.lr=1.0e-4", "train.warmup_fraction=0",
                    f"checkpoint.init_from={pre}/ck", "checkpoint.load=latest", f"checkpoint.save_dir={ada}/ck",
                    nproc=1, module=True)
    assert f"initialised weights from {pre}/ck (pretrained for 12 steps)" in proc.stdout
    done = re.search(r"done: (\d+) steps, [\d,]+ tokens, (\d+) optimizer updates", proc.stdout)
    assert done and done.groups() == ("3", "3"), proc.stdout[-2000:]   # fresh step count, one update/batch
    pre_rows, ada_rows = losses(pre / "metrics.jsonl"), losses(ada / "metrics.jsonl")
    assert set(ada_rows[0]["losses"]) == {"sparse"}
    # Pretrained weights: the first adaptation loss is far below a random model's first loss.
    assert ada_rows[0]["losses"]["sparse"] < pre_rows[0]["losses"]["sparse"] - 0.5
    # Fresh schedule: no warmup, the configured LR from the first step.
    assert ada_rows[0]["lr"] == pytest.approx(1.0e-4, rel=1e-3)
    # Re-running the command resumes the adaptation itself instead of re-initialising (here extended
    # by a step: the longer schedule is asked for, a changed schedule is refused otherwise).
    again = torchrun("megatron_ratplus.training.cli", *tiny_cli_overrides(tiny_dataset, ada, steps=4),
                     "train.joint=false", "train.mode=sparse", "model.dilation=8", "model.local_window=4",
                     "model.initial_tokens=2", "train.lr=1.0e-4", "train.warmup_fraction=0",
                     f"checkpoint.init_from={pre}/ck", "checkpoint.load=latest", f"checkpoint.save_dir={ada}/ck",
                     "checkpoint.lr_schedule_on_resume=config", nproc=1, module=True)
    assert "resumed from step 3" in again.stdout and "initialised weights" not in again.stdout

"""The training loop on synthetic token batches (single process, CPU mode)."""
import json
import math

import pytest
import torch

from megatron_ratplus.checkpoint.state import inner_optimizers
from megatron_ratplus.model import get_attention_modes
from megatron_ratplus.training.config import load_config
from megatron_ratplus.training.loop import NonFiniteLossError, Trainer
from megatron_ratplus.training.setup import build_training_objects

VOCAB = 256


class SyntheticData:
    """Deterministic batches with learnable structure (each token = previous + 1 mod VOCAB)."""

    def __init__(self, seq_len, micro_batch_size, seed=0):
        self.seq_len, self.mbs = seq_len, micro_batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self.served = 0

    def _batch(self):
        start = torch.randint(0, VOCAB, (self.mbs, 1), generator=self.gen)
        return (start + torch.arange(self.seq_len + 1)) % VOCAB

    def next_microbatches(self, count):
        self.served += count
        return [self._batch() for _ in range(count)]

    def validation_microbatches(self, count):
        gen = torch.Generator().manual_seed(99)
        return [(torch.randint(0, VOCAB, (self.mbs, 1), generator=gen) + torch.arange(self.seq_len + 1)) % VOCAB
                for _ in range(count)]

    def state_dict(self):
        return {"served": self.served}


def make(megatron_single_process, *overrides, steps=6):
    cfg = load_config(None, ["train.seq_len=32", "train.micro_batch_size=2", "train.global_batch_size=4",
                             f"train.max_steps={steps}", "train.precision=fp32", "train.lr=3e-3",
                             "train.warmup_fraction=0.0", "logging.progress=false", "logging.eval_interval=3",
                             "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=2",
                             "model.dilation=4", *overrides])
    args = cfg.model.model_args(vocab_size=VOCAB, seq_len=32)
    dp, accum = cfg.layout_for(1)
    objs = build_training_objects(cfg, args, cfg.total_steps())
    data = SyntheticData(32, 2)
    return cfg, objs, data, Trainer(cfg, objs, data, world_size=1, rank=0, total_steps=cfg.total_steps(),
                                    accum_steps=accum)


def adam_steps(optimizer):
    steps = {int(s["step"]) for group in optimizer.param_groups for p in group["params"]
             for s in [optimizer.state[p]] if "step" in s}
    assert len(steps) == 1, steps
    return steps.pop()


def test_joint_training_two_updates_per_batch_and_falling_loss(megatron_single_process, tmp_path):
    cfg, objs, data, trainer = make(megatron_single_process, f"logging.metrics_jsonl={tmp_path / 'm.jsonl'}",
                                    steps=8)
    state = trainer.run()
    # Each pass's gradient norm is logged (the step's grad_norm is the dense update's).
    records = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    steps = [r for r in records if "losses" in r]
    assert len(steps) == 8 and all(r["grad_norm/dense"] == r["grad_norm"] for r in steps)
    assert all(r["grad_norm/sparse"] > 0 and r["grad_norm/sparse"] != r["grad_norm"] for r in steps)
    assert state.step == 8 and state.optimizer_updates == 16
    # Checked on the optimizer itself, not on our counter: AdamW took two steps per batch.
    assert adam_steps(objs.optimizer.optimizer if hasattr(objs.optimizer, "optimizer") else objs.optimizer) == 16
    assert data.served == 8 * 2                       # two micro-batches per step, each used twice
    first, last = state.history[0], state.history[-1]
    assert set(first) == {"sparse", "dense", "step"}
    assert last["dense"] < first["dense"] - 0.3 and last["sparse"] < first["sparse"] - 0.3
    # The LR schedule advanced once per batch: 8 scheduler steps.
    assert objs.scheduler.num_steps == 8
    # Each batch's tokens count once (a resumed token budget depends on it); its FLOPs twice (two passes).
    assert state.consumed_tokens == 8 * 4 * 32
    assert trainer.flops_per_step == pytest.approx(2 * objs.model_args.flops_per_token(32, VOCAB) * 4 * 32)


def test_single_mode_training_is_one_update_per_batch(megatron_single_process):
    cfg, objs, data, trainer = make(megatron_single_process, "train.joint=false", "train.mode=sparse", steps=3)
    state = trainer.run()
    assert state.optimizer_updates == 3
    assert set(state.history[0]) == {"sparse", "step"}
    assert get_attention_modes(objs.model) == {"sparse"}


def test_non_finite_loss_skips_then_halts(megatron_single_process):
    cfg, objs, data, trainer = make(megatron_single_process, "train.joint=false", "train.max_nonfinite_steps=2",
                                    steps=5)
    with torch.no_grad():
        for name, p in objs.model[0].named_parameters():
            if "final_layernorm" in name:
                p.fill_(float("nan"))
    before = {n: p.detach().clone() for n, p in objs.model[0].named_parameters() if "linear_fc1" in n}
    with pytest.raises(NonFiniteLossError, match="2 consecutive steps with a non-finite loss or gradient norm"):
        trainer.run()
    assert trainer.state.skipped_updates == 2 and trainer.state.optimizer_updates == 0
    assert trainer.train_state_dict()["consecutive_nonfinite"] == 2     # a resume keeps counting
    for n, p in objs.model[0].named_parameters():
        if n in before:
            assert torch.equal(p, before[n]), "a skipped step must not change the weights"
    assert all(math.isnan(h["dense"]) for h in trainer.state.history)
    # nor the optimizer's state: no AdamW step was counted
    assert not any(state for o in inner_optimizers(objs.optimizer) for state in o.optimizer.state.values())


def test_a_non_finite_gradient_with_a_finite_loss_skips_the_update(megatron_single_process, capsys):
    """An overflow in one backward gives a finite loss but an infinite gradient norm: that update is
    skipped (clipping by an infinite norm would put NaN into the weights and moments for good)."""
    cfg, objs, data, trainer = make(megatron_single_process, "logging.eval_interval=null", steps=3)
    model = objs.model[0]
    weight = next(p for n, p in model.named_parameters() if "linear_fc2.weight" in n)
    backwards = []

    def poison(grad):
        backwards.append(1)
        return grad * float("inf") if len(backwards) == 3 else grad    # in step 1's dense pass
    weight.register_hook(poison)
    state = trainer.run()
    assert (state.skipped_updates, state.optimizer_updates, state.consecutive_nonfinite) == (1, 5, 0)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(math.isfinite(v) for h in state.history for k, v in h.items() if k != "step")
    assert "step 1: non-finite loss" in capsys.readouterr().out


def test_the_loss_is_read_after_the_gradient_norm(megatron_single_process, monkeypatch):
    """The update's host work is queued before the host waits for the backward: the loss is read
    (its finiteness decides the update) only after Megatron's step has computed the gradient norm."""
    from megatron.core.optimizer import optimizer as megatron_optimizer

    from megatron_ratplus.training import update_guard

    cfg, objs, data, trainer = make(megatron_single_process, "train.joint=false", steps=2)
    events = []
    norm = megatron_optimizer.get_grad_norm_fp32
    monkeypatch.setattr(megatron_optimizer, "get_grad_norm_fp32", lambda *a, **k: (events.append("norm"), norm(*a, **k))[1])
    read = update_guard.LossRead.value
    monkeypatch.setattr(update_guard.LossRead, "value", lambda self: (events.append("loss"), read(self))[1])
    state = trainer.run()
    assert state.optimizer_updates == 2
    assert events[:2] == ["norm", "loss"] and events.count("norm") == 2


def test_each_pass_trains_in_the_mode_it_is_given(megatron_single_process):
    """train_update's loss is the loss of the current weights in the requested mode, whatever mode the
    model was left in (the joint loop must not run both passes densely)."""
    from megatron_ratplus.model import attention_mode, set_attention_mode
    from megatron_ratplus.training.loop import train_update
    from megatron_ratplus.training.step import forward_backward

    cfg, objs, data, _ = make(megatron_single_process, "logging.eval_interval=null", steps=2)
    microbatches = data.next_microbatches(1)

    def loss_in(mode):
        with torch.no_grad(), attention_mode(objs.model, mode):
            return forward_backward(objs.model, microbatches, seq_len=32, forward_only=True).item()

    want_sparse = loss_in("sparse")
    assert abs(want_sparse - loss_in("dense")) > 1e-4          # the modes are distinguishable here
    set_attention_mode(objs.model, "dense")
    loss, _, updated = train_update(objs, microbatches, "sparse", 32)
    assert updated and loss == pytest.approx(want_sparse, rel=1e-6, abs=0)
    want_dense = loss_in("dense")                               # of the updated weights
    set_attention_mode(objs.model, "sparse")
    loss, _, updated = train_update(objs, microbatches, "dense", 32)
    assert updated and loss == pytest.approx(want_dense, rel=1e-6, abs=0)


def test_an_update_is_adamw_with_the_configured_hyperparameters(megatron_single_process):
    """The first AdamW step of a weight, written out (bias corrections make it independent of the betas):
    ``p1 = p0 (1 - lr wd) - lr g / (|g| + eps)``, with the recipe's lr, weight decay and eps (non-defaults)."""
    from megatron_ratplus.training.loop import train_update

    cfg, objs, data, _ = make(megatron_single_process, "train.joint=false", "logging.eval_interval=null",
                              "train.lr=0.01", "train.weight_decay=0.3", "train.adam_eps=0.5", "train.clip_grad=0",
                              "train.lr_decay_style=constant", steps=1)
    weight = dict(objs.model[0].module.named_parameters())["decoder.layers.0.mlp.linear_fc1.weight"]
    before = weight.detach().clone()
    _, _, updated = train_update(objs, data.next_microbatches(2), "dense", 32)
    g = weight.main_grad
    assert updated and g.abs().max() > 0
    torch.testing.assert_close(weight.detach(), before * (1 - 0.01 * 0.3) - 0.01 * g / (g.abs() + 0.5),
                               rtol=1e-5, atol=1e-7)


def test_logged_lr_and_evaluation_size(megatron_single_process, tmp_path):
    """Each step logs the LR it trained with (warmup from 0: 0, then the peak), and an evaluation reads
    ``eval_iters`` global batches (eval_iters x accumulation micro-batches on one rank)."""
    cfg, objs, data, trainer = make(megatron_single_process, "train.joint=false", "train.warmup_fraction=0.5",
                                    "train.lr_decay_style=constant", "logging.eval_interval=2",
                                    "logging.eval_iters=1", f"logging.metrics_jsonl={tmp_path / 'm.jsonl'}", steps=2)
    counts = []
    served = data.validation_microbatches
    data.validation_microbatches = lambda count: (counts.append(count), served(count))[1]
    trainer.run()
    records = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in records if "losses" in r] == pytest.approx([0.0, 3e-3])
    assert counts == [1 * 2]          # global batch 4 = micro-batch 2 x 2 accumulation steps


def test_the_end_of_training_is_evaluated(megatron_single_process, tmp_path):
    """Evaluations at every eval_interval steps, and one at the last step when the interval does not
    end there (a stopped, preempted run is not evaluated at its stop; a finished run started again is
    not evaluated again)."""
    metrics = tmp_path / "m.jsonl"
    cfg, objs, data, trainer = make(megatron_single_process, "train.joint=false", "logging.eval_interval=3",
                                    "logging.eval_iters=1", f"logging.metrics_jsonl={metrics}", steps=4)
    trainer.run()
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in records if "val_losses" in r] == [3, 4]
    again = Trainer(cfg, objs, data, world_size=1, rank=0, total_steps=4, accum_steps=2)
    again.state.step = 4
    evaluated = []
    again.metrics.log_eval = lambda step, losses: evaluated.append(step)
    again.run()
    assert evaluated == []

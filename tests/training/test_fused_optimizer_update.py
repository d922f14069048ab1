"""The fused AdamW + bf16 weight write in Megatron's mixed-precision optimizer
(training/fused_optimizer_update.py): training steps with it leave the same master weights, moments
and bf16 model weights as Megatron's own step (torch AdamW, then the weight copy), and it is
installed only where it applies.

On CPU the kernel runs under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1);
CPU mode uses Megatron's float16 optimizer. The distributed optimizer's path (GPU only) is the
``gpu`` test."""
import pytest
import torch
from ratplus_kernels._env import interpreting

from megatron_ratplus.checkpoint.state import inner_optimizers
from megatron_ratplus.training import fused_optimizer_update
from megatron_ratplus.training.config import ConfigError, load_config
from megatron_ratplus.training.loop import train_update
from megatron_ratplus.training.setup import build_training_objects

VOCAB = 128
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def build(overrides):
    cfg = load_config(None, ["train.seq_len=32", "train.micro_batch_size=2", "train.global_batch_size=2",
                             "train.max_steps=4", "train.precision=bf16", "train.lr=1e-2",
                             "train.warmup_fraction=0", "logging.progress=false",
                             "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=2",
                             "model.dilation=4", *overrides])
    torch.manual_seed(0)
    if torch.cuda.is_available():    # the GPU initialises weights from Megatron's tracked RNG
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
        model_parallel_cuda_manual_seed(1234)
    return build_training_objects(cfg, cfg.model.model_args(vocab_size=VOCAB, seq_len=32), 4)


def train(objs, steps=3, modes=("sparse", "dense")):
    """Joint training on fixed random batches; returns each update's loss and (pre-clip) gradient norm."""
    gen = torch.Generator().manual_seed(1)
    losses, grad_norms = [], []
    for step in range(steps):
        batch = [torch.randint(0, VOCAB, (2, 33), generator=gen).to(DEVICE)]
        for mode in modes:
            loss, grad_norm, updated = train_update(objs, batch, mode, seq_len=32)
            assert updated, f"step {step} {mode}: not applied (loss {loss})"
            losses.append(loss)
            grad_norms.append(grad_norm)
        objs.scheduler.step(increment=1)
    return losses, grad_norms


def one_update(objs) -> float:
    """One sparse update on the first batch; returns its gradient norm."""
    return train(objs, steps=1, modes=("sparse",))[1][0]


def snapshot(objs):
    """(bf16 model weights, fp32 master weights, AdamW state tensors), in a fixed order."""
    inner = inner_optimizers(objs.optimizer)
    model, main = [], []
    for o in inner:
        model_data, main_data = o._get_model_and_main_params_data_float16()
        model += [t.clone() for t in model_data]
        main += [t.clone() for t in main_data]
    state = [s[k].clone() for o in inner for s in o.optimizer.state.values() for k in ("exp_avg", "exp_avg_sq", "step")]
    return model, main, state


def assert_model_is_rounded_master(model, main, by_kernel=False):
    """Each model weight is its master weight rounded to nearest. Triton's CPU interpreter rounds
    the kernel's fp32 -> bf16 conversion toward zero instead (GPUs round to nearest), so there a
    kernel-written weight may be one bf16 step lower in magnitude."""
    for low, master in zip(model, main):
        want = master.to(low.dtype)
        if by_kernel and interpreting():
            truncated = (master.view(torch.int32) & ~0xFFFF).view(torch.float32).to(low.dtype)
            assert torch.equal(low, want) or bool(((low == want) | (low == truncated)).all())
        else:
            assert torch.equal(low, want)


def test_one_update_matches_megatrons_step(megatron_single_process):
    """One update (same gradients): master weights and moments agree to fp32 rounding, and each
    bf16 model weight is its master weight rounded."""
    plain = build(["train.fused_optimizer_update=false"])
    assert fused_optimizer_update.installed_count(plain.optimizer) == 0
    one_update(plain)
    want_model, want_main, want_state = snapshot(plain)
    assert_model_is_rounded_master(want_model, want_main)

    fused = build(["train.fused_optimizer_update=true"])
    assert fused_optimizer_update.installed_count(fused.optimizer) >= 1
    assert "fused AdamW" in fused_optimizer_update.describe(fused.optimizer)
    one_update(fused)
    got_model, got_main, got_state = snapshot(fused)
    assert_model_is_rounded_master(got_model, got_main, by_kernel=True)
    assert len(got_main) == len(want_main) > 0 and len(got_state) == len(want_state) > 0
    for got, want in zip(got_main + got_state, want_main + want_state):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    # Megatron's methods are back once the step is over (the swap is scoped to step_with_ready_grads)
    for o in inner_optimizers(fused.optimizer):
        assert "step" not in vars(o.optimizer) and "_copy_main_params_to_model_params" not in vars(o)


def test_joint_training_runs_the_fused_update_for_both_modes(megatron_single_process):
    """Three joint batches: the fused update runs for every update, the model keeps its master
    weights' rounding, and the losses follow Megatron's step (early Adam steps amplify last-bit
    differences of the weights, so the comparison is of losses, loosely)."""
    want, _ = train(build(["train.fused_optimizer_update=false"]))
    fused = build(["train.fused_optimizer_update=true"])
    calls = []
    update = inner_optimizers(fused.optimizer)[0].ratplus_fused_update
    original = update.step
    update.step = lambda closure=None: (calls.append(1), original())[1]
    got, _ = train(fused)
    assert len(calls) == 6                          # 3 batches x (sparse + dense update)
    assert_model_is_rounded_master(*snapshot(fused)[:2], by_kernel=True)
    assert got[0] == want[0]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=2e-2, atol=0)


def main_grad_norm(objs) -> float:
    grads = [p.grad.float() for o in inner_optimizers(objs.optimizer) for g in o.optimizer.param_groups
             for p in g["params"] if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()


def test_clipping_is_folded_into_the_update(megatron_single_process, monkeypatch):
    """With the norm above clip_grad, the fused update applies Megatron's clipping coefficient itself:
    same master weights and moments as Megatron's clip-then-step, no separate scaling pass, and the
    stored main gradients left as they were (their norm is still the unclipped one)."""
    from megatron.core.optimizer import clip_grads

    plain = build(["train.fused_optimizer_update=false", "train.clip_grad=0.05"])
    norm = one_update(plain)
    assert norm > 0.5, "the test needs a step that clips"
    assert main_grad_norm(plain) == pytest.approx(0.05, rel=1e-4)     # Megatron scaled the gradients
    want = snapshot(plain)

    fused = build(["train.fused_optimizer_update=true", "train.clip_grad=0.05"])
    scaled = []
    scale_impl = clip_grads.multi_tensor_scale_impl
    monkeypatch.setattr(clip_grads, "multi_tensor_scale_impl", lambda *a: (scaled.append(1), scale_impl(*a))[1])
    assert one_update(fused) == pytest.approx(norm, rel=1e-6)
    assert not scaled, "the gradients were scaled in a separate pass"
    assert main_grad_norm(fused) == pytest.approx(norm, rel=1e-4)
    assert all(o.ratplus_fused_update.pending_grad_scale == 1.0 for o in inner_optimizers(fused.optimizer))
    got = snapshot(fused)
    assert_model_is_rounded_master(got[0], got[1], by_kernel=True)
    for g, w in zip(got[1] + got[2], want[1] + want[2]):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


def test_a_coefficient_whose_update_never_ran_is_dropped(megatron_single_process):
    """A clip coefficient left from a step that stopped before its update is cleared when the next
    step starts (prepare_grads), so it never scales a later update; here one that does not clip
    (clip_grad 0), where no clipping call would overwrite it."""
    plain = build(["train.fused_optimizer_update=false", "train.clip_grad=0"])
    one_update(plain)
    fused = build(["train.fused_optimizer_update=true", "train.clip_grad=0"])
    for o in inner_optimizers(fused.optimizer):
        o.ratplus_fused_update.pending_grad_scale = 0.01
    one_update(fused)
    for g, w in zip(snapshot(fused)[1], snapshot(plain)[1]):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


def test_the_update_is_prepared_before_the_gradient_norm_is_read(megatron_single_process, monkeypatch):
    """The host work of the update (lists, tables) is done in prepare_grads, before Megatron reads the
    gradient norm; after the read only the launch remains, and the preparation is used once. On the
    first step there is no AdamW state yet and prepare_grads must not create it (the update may still
    be skipped), so that update prepares itself."""
    from megatron.core.optimizer import optimizer as megatron_optimizer

    fused = build(["train.fused_optimizer_update=true"])
    update = inner_optimizers(fused.optimizer)[0].ratplus_fused_update
    events = []
    prepare = update.prepare
    update.prepare = lambda **kwargs: (events.append("prepare"), prepare(**kwargs))[1]
    norm = megatron_optimizer.get_grad_norm_fp32
    monkeypatch.setattr(megatron_optimizer, "get_grad_norm_fp32", lambda *a, **k: (events.append("norm"), norm(*a, **k))[1])
    launch = fused_optimizer_update.FusedUpdate.step
    monkeypatch.setattr(fused_optimizer_update.FusedUpdate, "step",
                        lambda self, closure=None: (events.append("update"), launch(self, closure))[1])
    train(fused, steps=3, modes=("sparse",))
    assert events == ["prepare", "norm", "update", "prepare"] + ["prepare", "norm", "update"] * 2
    assert update.prepared is None


@pytest.mark.parametrize("change", ["gradient replaced", "optimizer state reloaded"])
def test_a_preparation_that_no_longer_names_the_tensors_is_built_again(megatron_single_process, change):
    """If a gradient tensor changes between prepare_grads and the update (replaced by a copy), or the
    optimizer state is reloaded (torch's load_state_dict makes new moment tensors), the update is
    prepared again and gives Megatron's result. The AdamW state exists beforehand (zeros, as torch
    creates it and as after a resume), so prepare_grads prepares."""
    plain = build(["train.fused_optimizer_update=false"])
    one_update(plain)
    fused = build(["train.fused_optimizer_update=true"])
    update = inner_optimizers(fused.optimizer)[0].ratplus_fused_update
    inner = update.opt.optimizer
    for group in inner.param_groups:
        for p in group["params"]:
            update._state(inner, p)
    calls = []
    prepare = update.prepare

    def prepare_then_replace_a_gradient(**kwargs):
        calls.append(1)
        prepare(**kwargs)
        if len(calls) == 1 and change == "gradient replaced":
            p = update.opt.optimizer.param_groups[0]["params"][0]
            p.grad = p.grad.clone()
        elif len(calls) == 1:
            update.opt.optimizer.load_state_dict(update.opt.optimizer.state_dict())

    update.prepare = prepare_then_replace_a_gradient
    one_update(fused)
    assert len(calls) == 2
    for g, w in zip(snapshot(fused)[1] + snapshot(fused)[2], snapshot(plain)[1] + snapshot(plain)[2]):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


def test_a_skipped_update_creates_no_optimizer_state(megatron_single_process):
    """A non-finite loss skips the update after prepare_grads has run: the preparation must not have
    created AdamW state (the first step's moments), so a skipped step changes no optimizer state."""
    fused = build(["train.fused_optimizer_update=true"])
    with torch.no_grad():
        for name, p in fused.model[0].named_parameters():
            if "final_layernorm" in name:
                p.fill_(float("nan"))
    batch = [torch.randint(0, VOCAB, (2, 33), generator=torch.Generator().manual_seed(1)).to(DEVICE)]
    loss, grad_norm, updated = train_update(fused, batch, "sparse", seq_len=32)
    assert loss != loss and grad_norm is None and not updated
    assert not any(state for o in inner_optimizers(fused.optimizer) for state in o.optimizer.state.values())


def test_other_parameters_are_clipped_by_megatron(megatron_single_process):
    """Parameters that are not one fused-update optimizer's own list go to Megatron's clipping."""
    from megatron.core.optimizer import optimizer as megatron_optimizer

    build(["train.fused_optimizer_update=true"])
    assert megatron_optimizer.clip_grad_by_total_norm_fp32 is fused_optimizer_update._clip_or_defer
    param = torch.nn.Parameter(torch.ones(4))
    param.grad = torch.full((4,), 2.0)
    megatron_optimizer.clip_grad_by_total_norm_fp32([param], max_norm=1.0, total_norm=4.0)
    torch.testing.assert_close(param.grad, torch.full((4,), 2.0 / (4.0 + 1e-6)))


def test_automatic_is_off_in_cpu_mode_and_bad_values_are_refused(megatron_single_process):
    objs = build([])
    assert objs.optimizer is not None and fused_optimizer_update.installed_count(objs.optimizer) == 0
    assert "Megatron's" in fused_optimizer_update.describe(objs.optimizer)
    with pytest.raises(ConfigError, match="fused_optimizer_update must be true, false or null"):
        load_config(None, ["train.max_steps=1", "train.fused_optimizer_update=maybe"])
    with pytest.raises(ConfigError, match="clip_grad must be >= 0"):
        load_config(None, ["train.max_steps=1", "train.clip_grad=-1"])


def test_required_but_not_applicable_is_an_error(megatron_single_process):
    with pytest.raises(ConfigError, match="fused_optimizer_update=true, but it cannot apply: .*not a bf16"):
        build(["train.precision=fp32", "train.fused_optimizer_update=true"])


def test_a_zero_beta_falls_outside_the_kernel(megatron_single_process):
    """beta = 0 is a valid AdamW setting but the kernel's bias correction takes log2(beta): asking
    for the fused update names the reason up front instead of failing at the first step."""
    with pytest.raises(ConfigError, match=r"cannot apply: betas \(0.0, 0.95\) outside \(0, 1\)"):
        build(["train.adam_beta1=0", "train.fused_optimizer_update=true"])


def test_required_in_cpu_mode_without_the_interpreter_is_an_error(megatron_single_process, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ConfigError, match="needs TRITON_INTERPRET=1"):
        build(["train.fused_optimizer_update=true"])


@pytest.mark.gpu
@pytest.mark.parametrize("clip_grad", ["0", "0.05"])
def test_gpu_distributed_optimizer_matches_megatrons_step(megatron_single_process, clip_grad):
    """GPU: Megatron's distributed optimizer (the weight copies are shards of the param buffer),
    without clipping and with a step that clips (the coefficient folded into the update)."""
    options = ["parallel.distributed_optimizer=true", f"train.clip_grad={clip_grad}"]
    plain = build(["train.fused_optimizer_update=false", *options])
    norm = one_update(plain)
    assert clip_grad == "0" or norm > 0.5, "the clipped case needs a step that clips"
    want_model, want_main, want_state = snapshot(plain)
    fused = build(["train.fused_optimizer_update=true", *options])
    assert fused_optimizer_update.installed_count(fused.optimizer) >= 1
    assert type(inner_optimizers(fused.optimizer)[0]).__name__ == "DistributedOptimizer"
    one_update(fused)
    got_model, got_main, got_state = snapshot(fused)
    assert_model_is_rounded_master(got_model, got_main, by_kernel=True)
    for got, want in zip(got_main + got_state, want_main + want_state):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    # the all-gathered model weights (DP=1: the buffer itself) are the ones the next forward uses
    for got, want in zip(got_model, want_model):
        torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=2 ** -7 * want.float().abs().max().item())

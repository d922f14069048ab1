"""CUDA graphs of the training forward/backward: the bookkeeping (CPU, a stand-in capture), the
config checks, and eager-versus-graph training on a GPU."""
import pytest
import torch

from megatron_ratplus.training import setup as training_setup
from megatron_ratplus.training.config import ConfigError, load_config
from megatron_ratplus.training.cuda_graph import ForwardBackwardGraphs, describe


class StandInCapture:
    """Records captures; "replays" by running the captured function on its static inputs, so a
    replay that did not see the new micro-batches returns a stale result."""

    def __init__(self):
        self.captures = []

    def __call__(self, run, static_inputs, pool, stream):
        self.captures.append([t.clone() for t in static_inputs])
        test = self

        class Step:
            def replay(self, microbatches):
                for static, batch in zip(static_inputs, microbatches):
                    static.copy_(batch)
                return run(static_inputs).clone()
        return Step(), ("pool", len(test.captures))


def loss_of(batches):
    return torch.stack([b.float().sum() for b in batches]).sum()


def test_warmup_then_capture_once_per_mode_and_shape():
    capture = StandInCapture()
    graphs = ForwardBackwardGraphs(warmup_steps=2, capture=capture)
    calls = []

    def run(batches):
        calls.append(len(batches))
        return loss_of(batches)

    for step in range(5):
        for mode in ("sparse", "dense"):
            batches = [torch.full((2, 5), float(step)), torch.full((2, 5), float(step + 1))]
            assert graphs(mode, run, batches).item() == loss_of(batches).item()
    # two eager warm-up calls per mode, then one capture per mode; every later call replays
    assert len(capture.captures) == 2
    assert [k[0] for k in graphs.captured] == ["sparse", "dense"]
    # the capture's static inputs were the third call's micro-batches (step 2)
    assert capture.captures[0][0].eq(2.0).all() and capture.captures[0][1].eq(3.0).all()
    # a new micro-batch shape is a new key: warm-up again, then its own capture
    for _ in range(3):
        graphs("dense", run, [torch.ones(4, 5)])
    assert len(capture.captures) == 3


def test_replayed_output_is_a_copy():
    graphs = ForwardBackwardGraphs(warmup_steps=1, capture=StandInCapture())
    graphs("dense", loss_of, [torch.ones(3)])
    first = graphs("dense", loss_of, [torch.ones(3)])
    second = graphs("dense", loss_of, [torch.full((3,), 2.0)])
    assert first.item() == 3.0 and second.item() == 6.0


def test_needs_a_warmup_step():
    with pytest.raises(ValueError, match="at least one eager warm-up"):
        ForwardBackwardGraphs(warmup_steps=0)
    assert "off" in describe(None)
    assert "after 3 eager" in describe(ForwardBackwardGraphs(3))


@pytest.mark.parametrize("overrides, message", [
    (["train.cuda_graph=maybe"], "train.cuda_graph must be true or false"),
    (["train.cuda_graph=true", "train.cuda_graph_warmup_steps=0"], "cuda_graph_warmup_steps must be an integer >= 1"),
    (["train.cuda_graph=true", "parallel.pipeline_parallel=2"], "needs parallel.pipeline_parallel=1"),
    (["train.cuda_graph=true", "train.recompute=full"], "cannot be combined with train.recompute"),
    (["train.cuda_graph=true", "parallel.overlap_param_gather=true"], "cannot be combined with parallel.overlap_param_gather"),
])
def test_config_refuses_what_cannot_be_captured(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["train.max_steps=1", *overrides])


def test_cpu_mode_refuses_cuda_graphs(monkeypatch):
    monkeypatch.setattr(training_setup, "cpu_mode_enabled", lambda: True)
    assert training_setup.build_step_graphs(load_config(None, ["train.max_steps=1"])) is None
    with pytest.raises(ConfigError, match="needs a GPU"):
        training_setup.build_step_graphs(load_config(None, ["train.max_steps=1", "train.cuda_graph=true"]))


def _train_losses(cuda_graph: bool, steps: int):
    from megatron_ratplus.training.loop import train_update
    from megatron_ratplus.training.setup import build_training_objects

    vocab, seq = 512, 256
    cfg = load_config(None, [f"train.seq_len={seq}", "train.micro_batch_size=2", "train.global_batch_size=4",
                             f"train.max_steps={steps}", "train.precision=bf16", "train.lr=1e-3",
                             "train.warmup_fraction=0.0", "logging.progress=false", "model.num_layers=2",
                             "model.hidden_size=256", "model.num_attention_heads=4", "model.dilation=8",
                             f"train.cuda_graph={str(cuda_graph).lower()}", "train.cuda_graph_warmup_steps=1"])
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(1234)   # the GPU initialises weights from Megatron's tracked RNG
    objs = build_training_objects(cfg, cfg.model.model_args(vocab_size=vocab, seq_len=seq), steps)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        batches = [torch.randint(0, vocab, (2, seq + 1), generator=gen).cuda() for _ in range(2)]
        for mode in ("sparse", "dense"):
            loss, _, updated = train_update(objs, batches, mode, seq)
            assert updated
            losses.append(loss)
        objs.scheduler.step(increment=1)
    return losses, objs


@pytest.mark.gpu
def test_gpu_graph_replay_trains_like_eager(megatron_single_process, restore_megatron_layers):
    steps = 5
    eager, _ = _train_losses(False, steps)
    graphed, objs = _train_losses(True, steps)
    assert sorted(k[0] for k in objs.step_graphs.captured) == ["dense", "sparse"]
    # the first step is eager in both runs; later ones replay (new batches each step, so a replay
    # that ignored its inputs or a stale gradient would show), all with optimizer updates between
    assert graphed[:2] == pytest.approx(eager[:2], rel=2e-4)
    assert graphed == pytest.approx(eager, rel=2e-3)
    assert len(set(graphed)) == len(graphed)

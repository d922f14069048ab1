"""TP / SP / PP (also interleaved) give the same loss and gradients as TP=PP=1 (torchrun, 2 processes,
gloo)."""
from pathlib import Path

import pytest
import torch

from ..torchrun import torchrun

WORKER = Path(__file__).with_name("dist_worker.py")


def run(tmp_path, name, *flags, nproc):
    out = tmp_path / f"{name}.pt"
    torchrun(WORKER, *flags, "--out", out, nproc=nproc)
    return torch.load(out)


@pytest.fixture(scope="module")
def baselines(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tp1")
    return {mode: run(tmp, f"tp1_{mode}", "--mode", mode, nproc=1) for mode in ("dense", "sparse")}


def assert_same(result, reference):
    assert abs(result["loss"] - reference["loss"]) < 1e-5, (result["loss"], reference["loss"])
    assert result["grads"].keys() == reference["grads"].keys()
    for name, g in reference["grads"].items():
        torch.testing.assert_close(result["grads"][name], g, rtol=1e-4, atol=1e-6,
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.slow
@pytest.mark.parametrize("flags,mode", [
    (("--tp", "2"), "dense"),
    (("--tp", "2", "--sp"), "sparse"),
    (("--tp", "2", "--sp"), "dense"),
    (("--pp", "2"), "sparse"),
    (("--pp", "2", "--vpp", "2"), "sparse"),
], ids=["tp2-dense", "tp2-sp-sparse", "tp2-sp-dense", "pp2-sparse", "pp2-vpp2-sparse"])
def test_layout_matches_single_process(tmp_path, baselines, flags, mode):
    result = run(tmp_path, "run", *flags, "--mode", mode, nproc=2)
    assert_same(result, baselines[mode])


@pytest.mark.slow
def test_triton_kernels_under_sequence_parallelism(tmp_path, baselines):
    """The Triton kernels (through the interpreter on CPU) at TP=2 with sequence parallelism, the
    norms handing their residual branch to the bias-dropout-adds (model/residual.py): the same loss
    and gradients as one process with the reference kernels."""
    result = run(tmp_path, "run", "--tp", "2", "--sp", "--mode", "sparse", "--kernel-backend", "fused", nproc=2)
    assert_same(result, baselines["sparse"])


def test_sparse_and_dense_baselines_differ(baselines):
    assert abs(baselines["dense"]["loss"] - baselines["sparse"]["loss"]) > 1e-4


@pytest.mark.slow
def test_every_pipeline_stage_initialises_its_own_layers(tmp_path):
    """Three stages of one layer each: with one seed on every rank, stages 2 and 3 drew the same
    weights (stage 1's embedding shifts only its own stream)."""
    out = tmp_path / "weights.pt"
    torchrun(Path(__file__).with_name("stage_seed_worker.py"), "--out", out, nproc=3)
    weights = torch.load(out)
    assert sorted(weights) == [1, 2, 3]
    for a, b in ((1, 2), (2, 3), (1, 3)):
        assert not torch.allclose(weights[a], weights[b]), (a, b)


# Two more architectures, each in the layout whose mistake it would show (CI time: one each).
OTHER_ARCHITECTURES = {
    # per-layer D/W/P (sparse, dense D=1, local-only D=-1, sparse): a pipeline stage that numbered
    # its layers from 1 would run the first stage's patterns
    "ratplus-hybrid-nogate-pp2-vpp2": (("--hybrid", "--no-output-gate"), ("--pp", "2", "--vpp", "2")),
    # the attention baseline with a SwiGLU FFN (fc1 holds [gate; up], each TP rank [gate_r; up_r])
    "baseline-swiglu-hybrid-tp2-sp": (("--baseline", "--swiglu", "--hybrid"), ("--tp", "2", "--sp")),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(OTHER_ARCHITECTURES))
def test_other_architectures_match_single_process(tmp_path, case):
    arch, layout = OTHER_ARCHITECTURES[case]
    arch_flags = (*arch, "--mode", "sparse")
    reference = run(tmp_path, "tp1", *arch_flags, nproc=1)
    assert_same(run(tmp_path, "run", *arch_flags, *layout, nproc=2), reference)

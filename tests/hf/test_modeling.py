"""HF RAT+ model logits against the literal loop reference (tests/hf/reference.py)."""
import importlib
import importlib.util
import os
import shutil
import sys

import pytest
import torch

from megatron_ratplus.hf import modeling_ratplus

from .helpers import small_config, small_model, tokens
from .reference import reference_logits

CASES = [
    # (name, config overrides, sparse patterns per layer or None for dense mode)
    ("dense", dict(), None),
    ("D4W0P0", dict(dilation=4, local_window=0, initial_tokens=0), [(4, 0, 0)] * 2),
    ("D3W2P1", dict(dilation=3, local_window=2, initial_tokens=1), [(3, 2, 1)] * 2),
    ("local", dict(dilation=-1, local_window=3, initial_tokens=2), [(-1, 3, 2)] * 2),
    ("hybrid", dict(dilation=[5, 1], local_window=[1, 0], initial_tokens=[2, 0]), [(5, 1, 2), (1, 0, 0)]),
]


def _reference(model, ids, patterns):
    c = model.config
    return reference_logits(model.state_dict(), ids, layers=c.num_hidden_layers, heads=c.num_attention_heads,
                            recurrence=c.recurrence, output_gate=c.output_gate, ffn=c.ffn_type,
                            patterns=patterns, eps=c.rms_norm_eps, theta=c.rope_theta)


@pytest.mark.parametrize("recurrence", [True, False], ids=["rat", "attn"])
@pytest.mark.parametrize("name,overrides,patterns", CASES, ids=[c[0] for c in CASES])
def test_logits_match_loop_reference(name, overrides, patterns, recurrence):
    model = small_model(recurrence=recurrence, attention_mode="dense" if patterns is None else "sparse",
                        **overrides)
    ids = tokens(2, 14)
    with torch.no_grad():
        got = model(ids, use_cache=False).logits
    want = _reference(model, ids, patterns).float()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_swiglu_without_output_gate_matches_reference():
    model = small_model(hidden_act="silu", output_gate=False, dilation=4, local_window=1, initial_tokens=1,
                        attention_mode="sparse", rope_theta=500.0, rms_norm_eps=0.05)
    ids = tokens(1, 12, seed=5)
    with torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got, _reference(model, ids, [(4, 1, 1)] * 2).float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_one_token_input_and_one_token_prompt(mode):
    """A one-token input (the recurrence's decoding shortcut, starting without a state) gives the
    first position's logits of a longer input, and generating from a one-token prompt (a lone BOS)
    equals greedy decoding by recomputation."""
    from .test_generation import greedy_by_recomputation
    model = small_model(seed=3, attention_mode=mode, initializer_range=0.15, dilation=4, local_window=2,
                        initial_tokens=1)
    ids = tokens(2, 12, seed=4)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        first = model(ids[:, :1], use_cache=False).logits
    torch.testing.assert_close(first, full[:, :1], rtol=1e-5, atol=1e-5)
    got = model.generate(ids[:, :1], max_new_tokens=12, do_sample=False)
    assert torch.equal(got, greedy_by_recomputation(model, ids[:, :1], 12))


def test_sparse_mode_changes_logits_and_switches_back():
    model = small_model(dilation=4)
    ids = tokens(1, 16)
    with torch.no_grad():
        dense = model(ids).logits
        model.set_attention_mode("sparse")
        sparse = model(ids).logits
        model.set_attention_mode("dense")
        again = model(ids).logits
    assert (dense - sparse).abs().max() > 1e-3
    torch.testing.assert_close(dense[:, :1], sparse[:, :1])   # t = 0 sees only itself either way
    torch.testing.assert_close(dense, again)


def test_loss_matches_shifted_cross_entropy():
    model = small_model()
    ids = tokens(2, 10)
    out = model(ids, labels=ids)
    want = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]),
                                             ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, want)
    out.loss.backward()
    assert model.model.layers[0].self_attn.recurrence_gate_proj.weight.grad.abs().sum() > 0


def test_torch_fallback_equals_kernel_package_path(monkeypatch):
    """The file's own fallback (used when ratplus_kernels is absent) computes the same thing."""
    model = small_model(dilation=3, local_window=1, initial_tokens=1, attention_mode="sparse")
    ids = tokens(2, 150)       # > one 64-step chunk of the chunked recurrence
    with torch.no_grad():
        a = model(ids).logits
        monkeypatch.setattr(modeling_ratplus, "KERNEL_BACKEND", "torch")
        b = model(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_modeling_file_loads_without_ratplus_kernels(tmp_path, monkeypatch):
    """Copied next to weights, the two files must import with torch + transformers only."""
    pkg = tmp_path / "standalone_ratplus"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    here = modeling_ratplus.__file__.rsplit("/", 1)[0]
    for name in ("configuration_ratplus.py", "modeling_ratplus.py"):
        shutil.copy(f"{here}/{name}", pkg / name)
    monkeypatch.syspath_prepend(str(tmp_path))
    for mod in [m for m in sys.modules if m == "ratplus_kernels" or m.startswith("ratplus_kernels.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "ratplus_kernels", None)        # any import of it now fails
    monkeypatch.setitem(sys.modules, "ratplus_kernels.recurrence", None)
    monkeypatch.setitem(sys.modules, "ratplus_kernels.dilated_attention", None)
    spec = importlib.util.find_spec("standalone_ratplus.modeling_ratplus")
    assert spec is not None
    mod = importlib.import_module("standalone_ratplus.modeling_ratplus")
    assert mod._kernel_chunked_recurrence is None and mod._kernel_fused_recurrence is None
    ref_model = small_model(dilation=4, attention_mode="sparse")
    model = mod.RATPlusForCausalLM(mod.RATPlusConfig(**ref_model.config.to_dict())).eval()
    model.load_state_dict(ref_model.state_dict())
    ids = tokens(1, 20)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref_model(ids).logits, rtol=1e-5, atol=1e-5)



@pytest.mark.parametrize("pattern", [(4, 2, 1), (3, 0, 0), (-1, 5, 2), (7, 40, 9), (100, 3, 2), (102, 0, 0),
                                     (4, 2, 3)])     # (4, 2, 3): a chunk end at j = P
def test_blocked_sparse_attention_equals_masked(monkeypatch, pattern):
    """Long sequences without the fused kernel gather keys per query block: same logits."""
    D, W, P = pattern
    model = small_model(dilation=D, local_window=W, initial_tokens=P, attention_mode="sparse")
    ids = tokens(2, 100)
    with torch.no_grad():
        want = model(ids).logits
        monkeypatch.setattr(modeling_ratplus, "SPARSE_QUERY_BLOCK", 16)
        got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                    reason="needs CUDA or the Triton interpreter")
@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_fused_kernel_path_matches_reference_path(monkeypatch, mode):
    """The CUDA path of the model (fused Triton recurrence and dilated attention from ratplus_kernels),
    run here through the Triton interpreter on CPU tensors, gives the same logits and cache."""
    if modeling_ratplus._kernel_fused_recurrence is None or modeling_ratplus._kernel_fused_attention is None:
        pytest.skip("fused kernels not importable")
    model = small_model(dilation=4, local_window=2, initial_tokens=1, attention_mode=mode, num_hidden_layers=1)
    ids = tokens(1, 20)
    with torch.no_grad():
        want = model(ids).logits
        cache_ref = model.new_cache()
        model(ids[:, :12], past_key_values=cache_ref)
        step_ref = model(ids[:, 12:14], past_key_values=cache_ref).logits
        monkeypatch.setattr(modeling_ratplus, "KERNELS_ON_CPU", True)
        got = model(ids).logits
        cache = model.new_cache()
        model(ids[:, :12], past_key_values=cache)
        step = model(ids[:, 12:14], past_key_values=cache).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(step, step_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cache.layers[0].state[0], cache_ref.layers[0].state[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("overrides,message", [
    (dict(hidden_size=6, num_attention_heads=2), "head size .* = 3 must be even"),
    (dict(num_attention_heads=0), "num_attention_heads must be a positive int"),
    (dict(num_hidden_layers=0), "num_hidden_layers must be a positive int"),
    (dict(vocab_size=0), "vocab_size must be a positive int"),
    (dict(intermediate_size=-4), "intermediate_size must be a positive int"),
    (dict(rope_theta=0), "rope_theta must be a positive number"),
    (dict(rms_norm_eps=-1.0), "rms_norm_eps must be a positive number"),
], ids=["odd-head", "heads", "layers", "vocab", "ffn", "rope", "eps"])
def test_invalid_configs_are_refused_by_name(overrides, message):
    with pytest.raises(ValueError, match=message):
        small_config(**overrides)


def test_pattern_is_checked_again_when_the_model_is_built(tmp_path):
    """from_pretrained(..., num_hidden_layers=n) and attribute edits bypass __init__'s checks."""
    model = small_model(dilation=[4, 1], local_window=2)
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="per-layer list of length 2 but num_hidden_layers=3"):
        type(model).from_pretrained(tmp_path, num_hidden_layers=3)
    cfg = small_config()
    cfg.dilation = 0
    with pytest.raises(ValueError, match="dilation must be >= 1 or -1"):
        type(model)(cfg)


def test_save_pretrained_folder_loads_through_the_auto_classes(tmp_path):
    """The classes register for the Auto classes: save_pretrained copies the source files and
    writes auto_map, also for a model loaded from such a folder and saved again."""
    from transformers import AutoModelForCausalLM
    model = small_model(attention_mode="sparse", dilation=4, local_window=2)
    model.save_pretrained(tmp_path / "a")
    assert {"configuration_ratplus.py", "modeling_ratplus.py"} <= {p.name for p in (tmp_path / "a").iterdir()}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "a", trust_remote_code=True)
    loaded.save_pretrained(tmp_path / "b")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "b", trust_remote_code=True)
    ids = tokens(1, 7)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, again(ids).logits)

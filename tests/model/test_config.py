"""Config validation and presets: bad configs fail fast with a clear message."""
import pytest

from megatron_ratplus.model import RATPlusModelArgs, get_preset, to_transformer_config

BASE = dict(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=100)


@pytest.mark.parametrize("field,value,match", [
    ("dilation", 0, "dilation D"),
    ("dilation", -2, "dilation D"),
    ("local_window", -1, "local window W"),
    ("initial_tokens", -1, "initial tokens P"),
    ("dilation", [4, 4, 4], "per-layer list of length 3"),
    ("local_window", [0], "per-layer list of length 1"),
    ("hidden_size", 66, "not divisible by model.num_attention_heads"),
    ("ffn_type", "relu", "ffn_type"),
    ("attention_mode", "sparse-ish", "attention_mode"),
    ("hidden_size", 12, "head size hidden_size / num_attention_heads = 3 must be even"),
    ("recurrence", "no", "model.recurrence must be true or false"),
    ("rope_base", 0, "model.rope_base must be a positive number"),
    ("ffn_hidden_size", 1.5, "model.ffn_hidden_size must be a positive integer"),
])
def test_bad_model_args(field, value, match):
    with pytest.raises(ValueError, match=match):
        RATPlusModelArgs(**{**BASE, field: value})


def test_unknown_key_rejected():
    with pytest.raises(ValueError, match="unknown model config keys"):
        RATPlusModelArgs.from_dict({**BASE, "dilatoin": 4})


def test_heads_not_divisible_by_tp():
    args = RATPlusModelArgs(**{**BASE, "num_attention_heads": 2, "hidden_size": 64})
    with pytest.raises(ValueError, match="not divisible by tensor_model_parallel_size=4"):
        to_transformer_config(args, tensor_model_parallel_size=4)


def test_sequence_parallel_without_tp():
    with pytest.raises(ValueError, match="sequence_parallel=True needs"):
        to_transformer_config(RATPlusModelArgs(**BASE), sequence_parallel=True)


def test_layers_not_divisible_by_pp():
    with pytest.raises(ValueError, match="num_layers=3 is not divisible"):
        to_transformer_config(RATPlusModelArgs(**{**BASE, "num_layers": 3}), pipeline_model_parallel_size=2)


@pytest.mark.parametrize("name,low,high", [
    ("ratplus-1.5b", 1.50e9, 1.58e9),
    ("ratplus-2.6b", 2.6e9, 2.75e9),
    ("attention-1.5b", 1.40e9, 1.48e9),
    ("ratplus-125m", 1.2e8, 1.6e8),
])
def test_preset_parameter_counts(name, low, high):
    n = get_preset(name).num_parameters()
    assert low <= n <= high, n


def test_flops_formula_matches_design_anchor():
    # DESIGN.md §4: 1.006e10 model FLOPs per token for the 1.5B model at T=4096.
    assert abs(get_preset("ratplus-1.5b").flops_per_token(4096) - 1.006e10) / 1.006e10 < 1e-3


def test_preset_builds_on_meta_device_with_exact_count(megatron_single_process):
    import torch

    from megatron_ratplus.model import build_gpt_model, count_parameters, pad_vocab_size
    args = get_preset("ratplus-125m")
    cfg = to_transformer_config(args, use_cpu_initialization=True, perform_initialization=False)
    with torch.device("meta"):
        model = build_gpt_model(args, cfg, spec="local")
    assert count_parameters(model) == args.num_parameters(pad_vocab_size(args.vocab_size, 1))


def test_transformer_config_builds_without_warnings():
    """Megatron 0.16 warns on every TransformerConfig whose CUDA-graph scope is its default "full";
    ours spells the same scope as the empty list, so building a config warns about nothing."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = to_transformer_config(RATPlusModelArgs(**BASE))
    assert cfg.cuda_graph_scope == []
    assert [str(w.message) for w in caught] == []


def test_layer_numbers_are_megatrons_one_based_global_index():
    cfg = to_transformer_config(RATPlusModelArgs(**{**BASE, "dilation": [4, 8]}))
    assert cfg.pattern_for_layer(1).dilation == 4 and cfg.pattern_for_layer(2).dilation == 8
    for bad in (0, 3, -1):
        with pytest.raises(ValueError, match="layer_number must be in 1..2"):
            cfg.pattern_for_layer(bad)


def test_a_second_initialisation_with_another_layout_is_refused(megatron_single_process):
    from megatron_ratplus.parallel import ParallelLayout, initialize_distributed
    assert initialize_distributed(ParallelLayout(), seed=1234)["dp_size"] == 1         # the same: fine
    with pytest.raises(RuntimeError, match=r"already initialised with TP, PP, VPP = \(1, 1, None\)"):
        initialize_distributed(ParallelLayout(1, 1, 2), seed=1)


def test_fresh_weights_follow_the_design_initialisation(megatron_single_process):
    """DESIGN.md §1: every Linear / Embedding weight N(0, init_std) (no depth-scaled output init),
    RMSNorm weights 1. A non-default ``init_std`` shows the key is used."""
    import torch

    from megatron_ratplus.model import build_gpt_model
    args = RATPlusModelArgs(**{**BASE, "vocab_size": 256, "init_std": 0.05})
    cfg = to_transformer_config(args, use_cpu_initialization=True)
    torch.manual_seed(0)
    model = build_gpt_model(args, cfg, spec="local")
    seen = set()
    for name, p in model.named_parameters():
        kind = name.split(".")[-2]
        seen.add(kind)
        if "layernorm" in name:
            assert torch.equal(p, torch.ones_like(p)), name
        else:
            assert p.dim() == 2, name
            assert abs(p.mean().item()) < 0.005 and abs(p.std().item() - 0.05) < 0.0025, \
                (name, p.mean().item(), p.std().item())
    assert {"linear_in", "linear_out", "linear_fc1", "linear_fc2", "word_embeddings", "output_layer",
            "input_layernorm", "pre_mlp_layernorm", "final_layernorm"} <= seen

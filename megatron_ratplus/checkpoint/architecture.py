"""The architecture a checkpoint was saved with, and the comparison made before loading it.

The description is read from the model itself (Megatron's config of the built chunks), so the
stored and the current one are always comparable, whatever the caller passes. Dimensions that
decide tensor shapes or the function computed are errors when they differ; the sparse attention
pattern and the attention mode are not (resolution adaptation changes them on purpose), nor are
the RoPE cache length and base (context extension): those are reported in a log line.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch

# Any difference in these is an error (listed together in one CheckpointError).
STRICT_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "kv_channels", "vocab_size",
                 "padded_vocab_size", "ffn_hidden_size", "ffn_type", "recurrence", "output_gate",
                 "norm_eps")
# Differences in these are allowed and logged.
ALLOWED_FIELDS = ("dilation", "local_window", "initial_tokens", "attention_mode", "max_seq_len",
                  "rope_base")


def unwrap_model(module: torch.nn.Module) -> torch.nn.Module:
    """DDP -> Float16Module -> GPTModel: the module that owns the parameters' names."""
    while hasattr(module, "module") and isinstance(module.module, torch.nn.Module):
        module = module.module
    return module


def architecture_of(model_chunks: Sequence[torch.nn.Module], model_args=None) -> Dict:
    """Architecture of a built model (any chunk carries the whole model's config).

    ``model_args`` (a ``RATPlusModelArgs`` or its dict), when known, adds the unpadded vocabulary
    size, which the built model does not carry.
    """
    model = unwrap_model(model_chunks[0])
    cfg = model.config
    arch = {
        "num_layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "num_attention_heads": cfg.num_attention_heads,
        "kv_channels": cfg.kv_channels,
        "ffn_hidden_size": cfg.ffn_hidden_size,
        "ffn_type": "swiglu" if cfg.gated_linear_unit else "gelu",
        "norm_eps": float(cfg.layernorm_epsilon),
        "padded_vocab_size": getattr(model, "vocab_size", None),
        "max_seq_len": getattr(model, "max_sequence_length", None),
    }
    rope_base = getattr(model, "rotary_base", None)
    arch["rope_base"] = float(rope_base) if rope_base is not None else None
    if hasattr(cfg, "ratplus_recurrence"):
        patterns = list(cfg.ratplus_patterns)
        arch.update(
            recurrence=bool(cfg.ratplus_recurrence),
            output_gate=bool(cfg.ratplus_output_gate),
            dilation=[p.dilation for p in patterns],
            local_window=[p.window for p in patterns],
            initial_tokens=[p.initial for p in patterns],
            attention_mode=cfg.ratplus_attention_mode,
        )
    if model_args is not None:
        values = model_args.to_dict() if hasattr(model_args, "to_dict") else dict(model_args)
        if values.get("vocab_size") is not None:
            arch["vocab_size"] = int(values["vocab_size"])
    return arch


def _fmt(value) -> str:
    if isinstance(value, list) and len(value) > 1 and all(v == value[0] for v in value):
        return f"{value[0]} (all layers)"
    return repr(value)


def compare_architectures(stored: Dict, current: Dict) -> Tuple[List[str], List[str]]:
    """``(errors, notes)``: one line per differing field, ``checkpoint X vs model Y``.

    A field present on one side only is not compared (older checkpoints, unknown vocab size).
    """
    errors, notes = [], []
    for field in STRICT_FIELDS + ALLOWED_FIELDS:
        if field not in stored or field not in current:
            continue
        a, b = stored[field], current[field]
        if a is None or b is None or a == b:
            continue
        line = f"{field}: checkpoint {_fmt(a)} vs model {_fmt(b)}"
        (errors if field in STRICT_FIELDS else notes).append(line)
    return errors, notes

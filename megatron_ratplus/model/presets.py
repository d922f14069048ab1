"""Named model sizes. The paper presets use d_h = 128 and vocab 32000 (LLaMA-2 tokenizer).

``attention-*`` presets are the baseline of the same size: identical layer with the recurrence off
(4-block projection, output gate kept), so comparisons are fair.
"""
from __future__ import annotations

from typing import Dict

from .config import RATPlusModelArgs

_SIZES: Dict[str, dict] = {
    # CPU-sized (d_h = 64): the README demo. The paper presets below all use d_h = 128.
    "tiny": dict(num_layers=4, hidden_size=128, num_attention_heads=2, vocab_size=4096, max_seq_len=256),
    "125m": dict(num_layers=12, hidden_size=768, num_attention_heads=6, vocab_size=32000, max_seq_len=4096),
    "1.5b": dict(num_layers=24, hidden_size=2048, num_attention_heads=16, vocab_size=32000, max_seq_len=4096),
    "2.6b": dict(num_layers=28, hidden_size=2560, num_attention_heads=20, vocab_size=32000, max_seq_len=4096),
}

PRESETS: Dict[str, dict] = {}
for _size, _dims in _SIZES.items():
    # The tiny model trains on 256-token sequences: D=64 would leave it only 4 chunk ends.
    _sparse = dict(dilation=16 if _size == "tiny" else 64, local_window=0, initial_tokens=0)
    PRESETS[f"ratplus-{_size}"] = dict(_dims, recurrence=True, **_sparse)
    PRESETS[f"attention-{_size}"] = dict(_dims, recurrence=False, **_sparse)
PRESETS["tiny"] = PRESETS["ratplus-tiny"]


def preset_names():
    return sorted(PRESETS)


def get_preset(name: str, **overrides) -> RATPlusModelArgs:
    """Model args of a preset, with field overrides (e.g. ``vocab_size`` from the tokenizer)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {preset_names()}")
    values = dict(PRESETS[name])
    values.update(overrides)
    return RATPlusModelArgs.from_dict(values)

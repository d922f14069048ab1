"""Configuration of RAT+ models for Hugging Face ``transformers`` (``model_type = "ratplus"``).

This file is copied next to exported weights and loaded with ``trust_remote_code=True``: it imports
only ``transformers`` (and the standard library). It works with transformers 4.x and 5.x.

Sparse attention pattern (DESIGN.md §1): query ``t`` attends key ``j`` iff ``j <= t`` and
(``t - j <= W`` or ``j < P`` or ``(j + 1) % D == 0``). ``dilation`` D, ``local_window`` W and
``initial_tokens`` P are an int (every layer) or a list with one value per layer. ``D = -1`` is
local-only (window + initial tokens), ``D = 1`` keeps that layer dense. The pattern is used when
``attention_mode == "sparse"``; ``"dense"`` runs plain causal attention in every layer.
"""
from __future__ import annotations

from transformers import PretrainedConfig

_FFN_BY_ACT = {"gelu": "gelu", "silu": "swiglu", "swish": "swiglu"}


def _check_pattern_value(name, value, num_layers, minimum, allow_minus_one=False):
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if isinstance(value, (list, tuple)) and len(values) != num_layers:
        raise ValueError(f"{name} is a per-layer list of length {len(values)} but num_hidden_layers="
                         f"{num_layers}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{name} must be an int or a list of ints, got {value!r}")
        if v < minimum and not (allow_minus_one and v == -1):
            extra = " or -1 (local-only)" if allow_minus_one else ""
            raise ValueError(f"{name} must be >= {minimum}{extra}, got {v}")


def _check_positive(name, value, kind=int):
    ok = not isinstance(value, bool) and isinstance(value, (int, float) if kind is float else int) and value > 0
    if not ok:
        raise ValueError(f"{name} must be a positive {'number' if kind is float else 'int'}, got {value!r}")


def _check_pattern(dilation, local_window, initial_tokens, num_layers):
    _check_pattern_value("dilation", dilation, num_layers, 1, allow_minus_one=True)
    _check_pattern_value("local_window", local_window, num_layers, 0)
    _check_pattern_value("initial_tokens", initial_tokens, num_layers, 0)


class RATPlusConfig(PretrainedConfig):
    """Architecture of a RAT+ (or attention-baseline) causal language model.

    Args:
        vocab_size: rows of the embedding and of the LM head.
        unpadded_vocab_size: the ids the tokenizer defines when ``vocab_size`` includes Megatron's
            padding rows (a multiple of 128 x TP; those ids are never targets); None when every
            row is a token. Converting back to Megatron restores the model's real vocabulary.
        hidden_size: model width ``d``; ``num_attention_heads`` heads of ``d / H`` channels.
        num_hidden_layers: number of RAT+ blocks.
        intermediate_size: FFN width (default ``4 * hidden_size``).
        hidden_act: ``"gelu"`` (``W2 gelu(W1 x)``, the paper's FFN) or ``"silu"`` (SwiGLU,
            ``W_down (silu(W_gate x) * W_up x)``, for imported Llama-style checkpoints).
        rms_norm_eps: epsilon of every RMSNorm.
        rope_theta: RoPE base (rotate-half convention over all head channels).
        max_position_embeddings: the training context (informative; RoPE has no table).
        recurrence: the gated recurrence on keys/values (False = attention baseline).
        output_gate: the ``sigmoid(o)`` gate on the attention output (False only for imported
            Llama checkpoints converted without folding the gate in).
        dilation / local_window / initial_tokens: the sparse pattern, int or per-layer list.
        attention_mode: ``"dense"`` or ``"sparse"``; switch at run time with
            ``model.set_attention_mode(...)``.
        initializer_range: std of the normal init of Linear/Embedding weights.
    """

    model_type = "ratplus"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 2048,
        num_hidden_layers: int = 24,
        num_attention_heads: int = 16,
        intermediate_size=None,
        hidden_act: str = "gelu",
        rms_norm_eps: float = 1e-6,
        rope_theta: float = 10000.0,
        max_position_embeddings: int = 4096,
        recurrence: bool = True,
        output_gate: bool = True,
        dilation=64,
        local_window=0,
        initial_tokens=0,
        attention_mode: str = "dense",
        initializer_range: float = 0.02,
        use_cache: bool = True,
        tie_word_embeddings: bool = False,
        unpadded_vocab_size=None,
        **kwargs,
    ):
        if hidden_act not in _FFN_BY_ACT:
            raise ValueError(f"hidden_act must be 'gelu' or 'silu' (SwiGLU), got {hidden_act!r}")
        for name, value in (("vocab_size", vocab_size), ("hidden_size", hidden_size),
                            ("num_hidden_layers", num_hidden_layers), ("num_attention_heads", num_attention_heads)):
            _check_positive(name, value)
        if intermediate_size is not None:
            _check_positive("intermediate_size", intermediate_size)
        _check_positive("rms_norm_eps", rms_norm_eps, float)
        _check_positive("rope_theta", rope_theta, float)
        if hidden_size % num_attention_heads:
            raise ValueError(f"hidden_size={hidden_size} is not divisible by "
                             f"num_attention_heads={num_attention_heads}")
        if (hidden_size // num_attention_heads) % 2:
            raise ValueError(f"the head size hidden_size / num_attention_heads = {hidden_size // num_attention_heads} "
                             f"must be even (rotate-half RoPE)")
        if attention_mode not in ("dense", "sparse"):
            raise ValueError(f"attention_mode must be 'dense' or 'sparse', got {attention_mode!r}")
        if tie_word_embeddings:
            raise ValueError("RAT+ models have an untied LM head (tie_word_embeddings must be False)")
        _check_pattern(dilation, local_window, initial_tokens, num_hidden_layers)
        if unpadded_vocab_size is not None and (
                isinstance(unpadded_vocab_size, bool) or not isinstance(unpadded_vocab_size, int)
                or not 1 <= unpadded_vocab_size <= vocab_size):
            raise ValueError(f"unpadded_vocab_size must be an int in [1, vocab_size={vocab_size}], "
                             f"got {unpadded_vocab_size!r}")
        self.vocab_size = vocab_size
        self.unpadded_vocab_size = unpadded_vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size if intermediate_size else 4 * hidden_size
        self.hidden_act = hidden_act
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.max_position_embeddings = max_position_embeddings
        self.recurrence = bool(recurrence)
        self.output_gate = bool(output_gate)
        self.dilation = list(dilation) if isinstance(dilation, (list, tuple)) else dilation
        self.local_window = list(local_window) if isinstance(local_window, (list, tuple)) else local_window
        self.initial_tokens = list(initial_tokens) if isinstance(initial_tokens, (list, tuple)) \
            else initial_tokens
        self.attention_mode = attention_mode
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=False, **kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def ffn_type(self) -> str:
        """``"gelu"`` or ``"swiglu"`` (derived from ``hidden_act``)."""
        return _FFN_BY_ACT[self.hidden_act]

    def check_pattern(self) -> None:
        """Check D/W/P against ``num_hidden_layers`` again: ``from_pretrained(..., num_hidden_layers=n)``
        and attribute assignments change the config after ``__init__``."""
        _check_pattern(self.dilation, self.local_window, self.initial_tokens, self.num_hidden_layers)

    def layer_pattern(self, layer_idx: int):
        """``(D, W, P)`` of layer ``layer_idx``."""
        def pick(v):
            return v[layer_idx] if isinstance(v, (list, tuple)) else v
        return pick(self.dilation), pick(self.local_window), pick(self.initial_tokens)


RATPlusConfig.register_for_auto_class()   # save_pretrained writes auto_map (see modeling_ratplus.py)

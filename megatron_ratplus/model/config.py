"""Model configuration: the architecture of a RAT+ (or attention-baseline) model.

Two objects, two jobs:

* :class:`RATPlusModelArgs` is the user-facing architecture description (what recipes, presets,
  checkpoints and the Hugging Face export store). It knows nothing about parallelism.
* :class:`RATPlusTransformerConfig` is Megatron-core's ``TransformerConfig`` extended with the
  RAT+ fields, built by :func:`to_transformer_config` once the parallel layout and precision are
  known. Megatron modules (our attention, its MLP, norms) read everything from it.

Sparse attention pattern per layer: dilation ``D`` (>= 1, or -1 for local-only; ``D == 1`` means
the layer stays dense), local window ``W >= 0`` and initial tokens ``P >= 0``. Each may be a single
int (all layers) or a list with one entry per layer (hybrid compositions).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple

import torch

from ..attention_pattern import IntOrList, SparsePattern, resolve_patterns

ATTENTION_MODES = ("dense", "sparse")
FFN_TYPES = ("gelu", "swiglu")


@dataclass
class RATPlusModelArgs:
    """Architecture of a RAT+ model. Field names are part of the checkpoint/export interface."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    vocab_size: int
    max_seq_len: int = 4096
    ffn_hidden_size: Optional[int] = None          # default 4 * hidden_size (gelu)
    ffn_type: str = "gelu"                          # "gelu" (paper) or "swiglu" (Llama-style imports)
    recurrence: bool = True                         # False = the attention baseline
    output_gate: bool = True                        # sigmoid(o) gate on the attention output
    dilation: IntOrList = 64                        # sparse pattern used in "sparse" mode
    local_window: IntOrList = 0
    initial_tokens: IntOrList = 0
    attention_mode: str = "dense"                   # mode the model starts in
    rope_base: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02

    def __post_init__(self):
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_projection_blocks(self) -> int:
        """Blocks of the fused input projection, in order (o, q, k, v, g); o/g only when enabled."""
        return 3 + int(self.output_gate) + int(self.recurrence)

    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden_size if self.ffn_hidden_size else 4 * self.hidden_size

    def patterns(self) -> Tuple[SparsePattern, ...]:
        return resolve_patterns(self.dilation, self.local_window, self.initial_tokens, self.num_layers)

    def validate(self) -> None:
        for name in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "max_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"model.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"model.hidden_size={self.hidden_size} is not divisible by "
                             f"model.num_attention_heads={self.num_attention_heads}")
        if self.head_dim % 2:
            raise ValueError(f"the head size hidden_size / num_attention_heads = {self.head_dim} must be even "
                             f"(RoPE rotates channel pairs)")
        for name in ("recurrence", "output_gate"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"model.{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("rope_base", "norm_eps", "init_std"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"model.{name} must be a positive number, got {value!r}")
        if self.ffn_type not in FFN_TYPES:
            raise ValueError(f"model.ffn_type must be one of {FFN_TYPES}, got {self.ffn_type!r}")
        if self.attention_mode not in ATTENTION_MODES:
            raise ValueError(f"model.attention_mode must be one of {ATTENTION_MODES}, "
                             f"got {self.attention_mode!r}")
        if self.ffn_hidden_size is not None and (isinstance(self.ffn_hidden_size, bool) or not isinstance(
                self.ffn_hidden_size, int) or self.ffn_hidden_size <= 0):
            raise ValueError(f"model.ffn_hidden_size must be a positive integer (or null), got {self.ffn_hidden_size}")
        self.patterns()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "RATPlusModelArgs":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown model config keys: {unknown}; known keys: {sorted(known)}")
        return cls(**values)

    def num_parameters(self, padded_vocab_size: Optional[int] = None) -> int:
        """Exact parameter count of the model this config builds (untied embedding and head)."""
        d, L = self.hidden_size, self.num_layers
        vocab = padded_vocab_size or self.vocab_size
        n_blocks = self.num_projection_blocks
        attn = n_blocks * d * d + d * d
        ffn = (3 if self.ffn_type == "swiglu" else 2) * d * self.ffn_size
        norms = 2 * d
        return L * (attn + ffn + norms) + 2 * vocab * d + d

    def flops_per_token(self, seq_len: int, padded_vocab_size: Optional[int] = None) -> float:
        """Model FLOPs per token for forward+backward of one dense step (DESIGN.md §4 formula).

        ``3 * (2 * N_layer_params * ... )``: matmul FLOPs of the projections/FFN/head plus the
        causal attention score/value products counted at full T (the convention of the anchor).
        """
        d, L = self.hidden_size, self.num_layers
        vocab = padded_vocab_size or self.vocab_size
        n_blocks = self.num_projection_blocks
        ffn_mats = 3 if self.ffn_type == "swiglu" else 2
        per_layer_matmul = (n_blocks + 1) * d * d + ffn_mats * d * self.ffn_size
        return 3.0 * (2.0 * per_layer_matmul * L + 2.0 * d * vocab + 2.0 * seq_len * d * L)


def pad_vocab_size(vocab_size: int, tensor_parallel_size: int = 1, divisible_by: int = 128) -> int:
    """Pad the vocab so every TP shard of the embedding/head is equal and aligned.

    Unlike Megatron-LM's ``divisible_by * tp`` rule, the padded size does not depend on TP when
    ``divisible_by`` is a multiple of TP (every power-of-two TP up to 128): checkpoints then
    reshard across TP sizes without changing the model.
    """
    multiple = divisible_by
    while multiple % tensor_parallel_size:
        multiple += divisible_by
    return ((vocab_size + multiple - 1) // multiple) * multiple


# --------------------------------------------------------------------------------------------
# Megatron TransformerConfig extension
# --------------------------------------------------------------------------------------------
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402
from megatron.core.utils import init_method_normal  # noqa: E402


@dataclass
class RATPlusTransformerConfig(TransformerConfig):
    """Megatron ``TransformerConfig`` plus what the RAT+ attention module needs."""

    ratplus_recurrence: bool = True
    ratplus_output_gate: bool = True
    ratplus_patterns: Sequence[SparsePattern] = field(default_factory=tuple)
    ratplus_attention_mode: str = "dense"
    # "auto": fused Triton kernels on CUDA, PyTorch references elsewhere; or "reference"/"fused".
    ratplus_kernel_backend: str = "auto"

    def __post_init__(self):
        if self.tensor_model_parallel_size > 1 and \
                self.num_attention_heads % self.tensor_model_parallel_size:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not divisible by "
                f"tensor_model_parallel_size={self.tensor_model_parallel_size}: RAT+ splits whole "
                f"heads across tensor-parallel ranks")
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise ValueError("sequence_parallel=True needs tensor_model_parallel_size > 1 "
                             "(sequence parallelism shards activations over the TP group)")
        if self.ratplus_attention_mode not in ATTENTION_MODES:
            raise ValueError(f"attention mode must be one of {ATTENTION_MODES}, "
                             f"got {self.ratplus_attention_mode!r}")
        if self.ratplus_kernel_backend not in ("auto", "reference", "fused"):
            raise ValueError(f"kernel backend must be auto|reference|fused, "
                             f"got {self.ratplus_kernel_backend!r}")
        super().__post_init__()
        if len(self.ratplus_patterns) != self.num_layers:
            raise ValueError(f"{len(self.ratplus_patterns)} sparse patterns for {self.num_layers} layers")

    def pattern_for_layer(self, layer_number: int) -> SparsePattern:
        """``layer_number`` is Megatron's global 1-based layer index (pipeline offset included)."""
        if not 1 <= layer_number <= len(self.ratplus_patterns):
            raise ValueError(f"layer_number must be in 1..{len(self.ratplus_patterns)} (Megatron's 1-based "
                             f"global index), got {layer_number}")
        return self.ratplus_patterns[layer_number - 1]


def to_transformer_config(
    args: RATPlusModelArgs,
    *,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: Optional[int] = None,
    sequence_parallel: bool = False,
    params_dtype: torch.dtype = torch.float32,
    bf16: bool = False,
    use_cpu_initialization: bool = False,
    kernel_backend: str = "auto",
    recompute_granularity: Optional[str] = None,
    **overrides,
) -> RATPlusTransformerConfig:
    """Build Megatron's config for this architecture under a given parallel layout."""
    if pipeline_model_parallel_size > 1 and args.num_layers % pipeline_model_parallel_size:
        raise ValueError(f"num_layers={args.num_layers} is not divisible by "
                         f"pipeline_model_parallel_size={pipeline_model_parallel_size}")
    init = init_method_normal(args.init_std)
    swiglu = args.ffn_type == "swiglu"
    kwargs = dict(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        kv_channels=args.head_dim,
        ffn_hidden_size=args.ffn_size,
        normalization="RMSNorm",
        layernorm_epsilon=args.norm_eps,
        add_bias_linear=False,
        add_qkv_bias=False,
        gated_linear_unit=swiglu,
        activation_func=torch.nn.functional.silu if swiglu else torch.nn.functional.gelu,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method=init,
        output_layer_init_method=init,
        init_method_std=args.init_std,
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
        # The interleaved schedule exchanges with the previous and the next stage in one step. With
        # batched P2P at PP=2 both are the same peer, and the two ranks post their sends and
        # receives in the same order: gradients land in the activations' buffer and back (same
        # shapes, no error, wrong training). Megatron-LM's default under VPP is overlapped,
        # unbatched P2P, which pairs them by direction.
        overlap_p2p_comm=bool(virtual_pipeline_model_parallel_size),
        batch_p2p_comm=not virtual_pipeline_model_parallel_size,
        sequence_parallel=sequence_parallel,
        params_dtype=params_dtype,
        bf16=bf16,
        pipeline_dtype=params_dtype,
        use_cpu_initialization=use_cpu_initialization,
        recompute_granularity=recompute_granularity,
        # Megatron 0.16's default, "full", means "the whole layer" and warns that it is deprecated
        # on every construction; the empty list is its current spelling of the same scope
        cuda_graph_scope=[],
        ratplus_recurrence=args.recurrence,
        ratplus_output_gate=args.output_gate,
        ratplus_patterns=args.patterns(),
        ratplus_attention_mode=args.attention_mode,
        ratplus_kernel_backend=kernel_backend,
    )
    kwargs.update(overrides)
    return RATPlusTransformerConfig(**kwargs)

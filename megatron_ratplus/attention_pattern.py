"""Sparse attention patterns of RAT+ layers: dilation D, local window W, initial tokens P.

Kept free of Megatron imports so the ops, the kernels' callers and the Hugging Face model can use
it. Query t sees key j iff ``j <= t and (t - j <= W or j < P or (j + 1) % D == 0)``; ``D = -1``
is local-only and ``D = 1`` admits every causal key (the layer is dense).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import List, Tuple, Union

IntOrList = Union[int, List[int]]


@dataclass(frozen=True)
class SparsePattern:
    """One layer's sparse attention pattern (DESIGN.md §1)."""

    dilation: int
    window: int
    initial: int

    @property
    def is_dense(self) -> bool:
        """D == 1 admits every causal key: run it as dense attention."""
        return self.dilation == 1

    def allowed_pairs(self, seq_len: int) -> int:
        """Number of allowed (query, key) pairs of one head over ``seq_len`` tokens: what the
        attention FLOPs of this pattern scale with (benchmarks count TFLOP/s on these only).

        Per query t: the band ``t - W .. t``; of the ``c = t - W`` keys below it, the first
        ``min(c, P)`` and the chunk ends ``j = mD - 1`` with ``P <= j < c`` (``c // D - P // D`` of
        them). Closed form per query, so long sequences cost no mask.
        """
        if seq_len < 0:
            raise ValueError(f"seq_len must be >= 0, got {seq_len}")
        D, W, P = self.dilation, self.window, self.initial
        total = 0
        for t in range(seq_len):
            below = max(t - W, 0)
            total += min(t, W) + 1 + min(below, P)
            if D > 0:
                total += max(below // D - P // D, 0)
        return total

    def validate(self, where: str = "") -> None:
        loc = f" ({where})" if where else ""
        if isinstance(self.dilation, bool) or not isinstance(self.dilation, int) or self.dilation == 0 \
                or self.dilation < -1:
            raise ValueError(f"dilation D must be an integer >= 1 or -1 (local-only){loc}, "
                             f"got {self.dilation!r}")
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 0:
            raise ValueError(f"local window W must be an integer >= 0{loc}, got {self.window!r}")
        if isinstance(self.initial, bool) or not isinstance(self.initial, int) or self.initial < 0:
            raise ValueError(f"initial tokens P must be an integer >= 0{loc}, got {self.initial!r}")


def _per_layer(name: str, value: IntOrList, num_layers: int) -> List[int]:
    if isinstance(value, (list, tuple)):
        if len(value) != num_layers:
            raise ValueError(f"{name} is a per-layer list of length {len(value)}, "
                             f"but the model has {num_layers} layers")
        # Integer-like entries (numpy ints from a converted config) become ints; anything else,
        # floats included, is left as it is so ``validate`` names it instead of truncating it.
        return [_as_int_if_integral(v) for v in value]
    return [_as_int_if_integral(value)] * num_layers


def _as_int_if_integral(value):
    if isinstance(value, bool):
        return value
    try:
        return operator.index(value)
    except TypeError:
        return value


def resolve_patterns(dilation: IntOrList, window: IntOrList, initial: IntOrList,
                     num_layers: int) -> Tuple[SparsePattern, ...]:
    """Expand scalar-or-list D/W/P into one validated :class:`SparsePattern` per layer."""
    ds = _per_layer("dilation", dilation, num_layers)
    ws = _per_layer("local_window", window, num_layers)
    ps = _per_layer("initial_tokens", initial, num_layers)
    patterns = tuple(SparsePattern(d, w, p) for d, w, p in zip(ds, ws, ps))
    for i, pat in enumerate(patterns):
        pat.validate(where=f"layer {i}")
    return patterns

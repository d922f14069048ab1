"""RAT+ causal language model for Hugging Face ``transformers`` (4.x and 5.x).

Self-contained: this file (with ``configuration_ratplus.py``) is copied next to exported weights
and loaded with ``trust_remote_code=True``. It imports only torch and transformers, and uses the
``ratplus_kernels`` package when it is importable (fused Triton kernels on CUDA, the chunked
PyTorch recurrence elsewhere); a small PyTorch fallback below keeps the file working without it.

The layer (DESIGN.md §1), per block, with ``u = RMSNorm(x)``::

    o, q, k, v, g = u W_o, u W_q, u W_k, u W_v, u W_g           (no biases; g only with recurrence)
    a = sigmoid(g)  (fp32);  k~_t = a_t k~_{t-1} + (1 - a_t) k_t;  v~ likewise;  cast back
    q, k~ = RoPE(q), RoPE(k~)                                    (rotate-half, base rope_theta)
    attn_t = softmax(q_t k~_j^T / sqrt(d_h)) over allowed j, values v~_j
    x = x + (attn * sigmoid(o)) W_out                            (no gate when output_gate=False)
    x = x + W_2 gelu(W_1 RMSNorm(x))      or SwiGLU  W_down (silu(W_gate y) * W_up y)

Allowed keys in sparse mode: ``j <= t`` and (``t - j <= W`` or ``j < P`` or ``(j+1) % D == 0``),
``D = -1`` local-only, ``D = 1`` dense. Final RMSNorm and an untied LM head.

Weight names (TP=1, full tensors; ``d`` = hidden_size, ``V`` = vocab_size, ``f`` = intermediate_size).
This layout is an interface: keep it stable.

=====================================================================  ==========  ==========================
name                                                                   shape       meaning
=====================================================================  ==========  ==========================
``model.embed_tokens.weight``                                          ``[V, d]``  token embedding
``model.layers.{i}.input_layernorm.weight``                            ``[d]``     RMSNorm before attention
``model.layers.{i}.self_attn.q_proj.weight``                           ``[d, d]``  queries (rows head-major)
``model.layers.{i}.self_attn.k_proj.weight``                           ``[d, d]``  keys
``model.layers.{i}.self_attn.v_proj.weight``                           ``[d, d]``  values
``model.layers.{i}.self_attn.output_gate_proj.weight``                 ``[d, d]``  paper's ``o`` (output gate);
                                                                                   absent if output_gate=False
``model.layers.{i}.self_attn.recurrence_gate_proj.weight``             ``[d, d]``  paper's ``g`` (recurrence
                                                                                   gate); absent if recurrence=False
``model.layers.{i}.self_attn.o_proj.weight``                           ``[d, d]``  ``W_out`` (output projection)
``model.layers.{i}.post_attention_layernorm.weight``                   ``[d]``     RMSNorm before the FFN
``model.layers.{i}.mlp.up_proj.weight``                                ``[f, d]``  gelu: ``W_1``; SwiGLU: up
``model.layers.{i}.mlp.gate_proj.weight``                              ``[f, d]``  SwiGLU only: gate (silu)
``model.layers.{i}.mlp.down_proj.weight``                              ``[d, f]``  ``W_2`` / down
``model.norm.weight``                                                  ``[d]``     final RMSNorm
``lm_head.weight``                                                     ``[V, d]``  LM head (untied)
=====================================================================  ==========  ==========================

Generation uses :class:`RATPlusCache`: in sparse mode a compact cache per layer holding the ``P``
initial entries, the last ``W + 1`` entries and one entry per completed D-chunk (keys after RoPE),
plus the recurrence state; in dense mode a full cache. Padded batches are not supported (the
recurrence runs over every position): pass unpadded prompts of equal length.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_ratplus import RATPlusConfig

# --------------------------------------------------------------------------------------------
# Optional kernels (the ratplus_kernels package); everything has a PyTorch fallback below.
# --------------------------------------------------------------------------------------------
try:
    from ratplus_kernels.recurrence import chunked_gated_recurrence as _kernel_chunked_recurrence
except ImportError:  # pragma: no cover - depends on the installation
    _kernel_chunked_recurrence = None
try:
    from ratplus_kernels.recurrence import fused_gated_recurrence as _kernel_fused_recurrence
except ImportError:  # pragma: no cover
    _kernel_fused_recurrence = None
try:
    from ratplus_kernels.dilated_attention import fused_dilated_attention as _kernel_fused_attention
except ImportError:  # pragma: no cover
    _kernel_fused_attention = None
try:  # one query over a cache whose every entry is allowed (the kernels package picks the CUDA path)
    from ratplus_kernels.dilated_attention import decode_attention as _kernel_decode_attention
except ImportError:  # pragma: no cover
    _kernel_decode_attention = None

# "auto": fused kernels for CUDA tensors when importable, chunked kernels-package reference else;
# "torch": the fallback of this file only (used by tests to check the file standalone).
KERNEL_BACKEND = "auto"
# Tests set this to run the fused/decode kernels on CPU tensors too (Triton interpreter).
KERNELS_ON_CPU = False
# Without the fused kernel, sparse attention over more queries than this gathers keys per query
# block instead of materialising a [T, T] mask.
SPARSE_QUERY_BLOCK = 1024


def _torch_gated_recurrence(g, k, v, initial_state=None, chunk_size: int = 64):
    """Exact chunked gated recurrence in fp32 (fallback). Time-first ``[T, B, H, D]``.

    Inside a chunk, with ``c_t`` the running sum of ``log a`` from the chunk start::

        h_t = exp(c_t) h_start + sum_{r <= t} exp(c_t - c_r) (1 - a_r) x_r

    The exponents are <= 0 so nothing overflows. Returns ``(k~, v~, (k_T, v_T))``.
    """
    T, B, H, D = g.shape
    log_a = F.logsigmoid(g.float())
    xs = torch.stack((k.float(), v.float())) * (-torch.expm1(log_a))      # (1 - a) x, [2, T, B, H, D]
    if initial_state is None:
        h = xs.new_zeros(2, B, H, D)
    else:
        h = torch.stack((initial_state[0].float(), initial_state[1].float()))
    out = torch.empty_like(xs)
    for start in range(0, T, chunk_size):
        stop = min(start + chunk_size, T)
        c = torch.cumsum(log_a[start:stop], dim=0)                          # [C, B, H, D]
        n = stop - start
        lower = torch.ones(n, n, dtype=torch.bool, device=g.device).tril()
        rel = (c.unsqueeze(1) - c.unsqueeze(0)).masked_fill(~lower[:, :, None, None, None], float("-inf"))
        out[:, start:stop] = torch.einsum("trbhd,xrbhd->xtbhd", rel.exp(), xs[:, start:stop]) \
            + c.exp().unsqueeze(0) * h.unsqueeze(1)
        h = out[:, stop - 1]
    return out[0].to(k.dtype), out[1].to(v.dtype), (h[0], h[1])


def gated_recurrence(g, k, v, initial_state=None):
    """``[B, T, H, D]`` in and out; returns ``(k~, v~, final_state)``, final state fp32 ``[B, H, D]``."""
    if g.shape[1] == 1:  # one decoding step: the recurrence itself
        a = torch.sigmoid(g[:, 0].float())
        if initial_state is None:
            hk, hv = (1 - a) * k[:, 0].float(), (1 - a) * v[:, 0].float()
        else:
            hk = a * initial_state[0] + (1 - a) * k[:, 0].float()
            hv = a * initial_state[1] + (1 - a) * v[:, 0].float()
        return hk.to(k.dtype).unsqueeze(1), hv.to(v.dtype).unsqueeze(1), (hk, hv)
    gt, kt, vt = g.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)   # time-first views
    if KERNEL_BACKEND == "auto" and (g.is_cuda or KERNELS_ON_CPU) and _kernel_fused_recurrence is not None:
        ko, vo, state = _kernel_fused_recurrence(gt, kt.contiguous(), vt.contiguous(),
                                                 initial_state=initial_state, output_final_state=True)
    elif KERNEL_BACKEND == "auto" and _kernel_chunked_recurrence is not None:
        ko, vo, state = _kernel_chunked_recurrence(gt, kt, vt, initial_state=initial_state,
                                                   output_final_state=True)
    else:
        ko, vo, state = _torch_gated_recurrence(gt, kt, vt, initial_state=initial_state)
    return ko.transpose(0, 1), vo.transpose(0, 1), (state[0].float(), state[1].float())


def allowed_keys(q_pos: torch.Tensor, k_pos: torch.Tensor, pattern) -> torch.Tensor:
    """Boolean ``[Tq, Tk]``: query at absolute position ``q_pos[i]`` may attend key ``k_pos[j]``.

    ``pattern`` is ``(D, W, P)`` or None (dense causal). Negative key positions mark empty slots.
    """
    qp, kp = q_pos.unsqueeze(1), k_pos.unsqueeze(0)
    ok = (kp >= 0) & (kp <= qp)
    if pattern is None:
        return ok
    D, W, P = pattern
    rule = (qp - kp <= W) | (kp < P)
    if D > 0:
        rule = rule | ((kp + 1) % D == 0)
    return ok & rule


def _sdpa(q, k, v, mask, scale):
    """``q [B, Tq, H, D]`` against ``k, v [B, H, Tk, D]`` with a boolean mask ``[Tq, Tk]``;
    returns ``[B, Tq, H, D]``."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask, scale=scale)
    return out.transpose(1, 2)


def full_attention(q, k, v, pattern, scale):
    """Attention of a whole sequence from position 0. ``[B, T, H, D]`` in and out."""
    T = q.shape[1]
    if pattern is None:
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=True, scale=scale)
        return out.transpose(1, 2)
    if KERNEL_BACKEND == "auto" and (q.is_cuda or KERNELS_ON_CPU) and _kernel_fused_attention is not None:
        out = _kernel_fused_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                      pattern[0], pattern[1], pattern[2], scale=scale)
        return out.transpose(0, 1)
    if T > SPARSE_QUERY_BLOCK:
        return blocked_sparse_attention(q, k, v, pattern, scale, SPARSE_QUERY_BLOCK)
    pos = torch.arange(T, device=q.device)
    return _sdpa(q, k.transpose(1, 2), v.transpose(1, 2), allowed_keys(pos, pos, pattern), scale)


def blocked_sparse_attention(q, k, v, pattern, scale, block: int):
    """Sparse attention without a ``[T, T]`` mask: for each block of queries ``[s, e)`` gather only
    the keys any of them may see (initial tokens, chunk ends before the window, the window and the
    block itself) and mask within. Memory ``O(block * (P + W + block + T / D))``."""
    B, T, H, Dh = q.shape
    D, W, P = pattern
    dev = q.device
    # chunk-end keys; none when local-only or when the first chunk ends past the sequence (D > T)
    ends = torch.arange(D - 1, max(T, D - 1), D, device=dev) if D > 0 else \
        torch.zeros(0, dtype=torch.long, device=dev)
    out = torch.empty_like(q)
    for s in range(0, T, block):
        e = min(s + block, T)
        lo = max(0, s - W)                                  # keys in [lo, e) may be in the window
        sel = ends[(ends >= P) & (ends < lo)]
        idx = torch.cat((torch.arange(min(P, lo), device=dev), sel, torch.arange(lo, e, device=dev)))
        mask = allowed_keys(torch.arange(s, e, device=dev), idx, pattern)
        out[:, s:e] = _sdpa(q[:, s:e], k[:, idx].transpose(1, 2), v[:, idx].transpose(1, 2), mask, scale)
    return out


_INV_FREQ: dict = {}


def _inv_freq(dim: int, theta: float, device) -> torch.Tensor:
    """RoPE inverse frequencies, computed once per (dim, theta, device): a decoding step calls
    ``rope`` twice per layer and should not rebuild them (extra kernels on the GPU)."""
    key = (dim, float(theta), str(device))
    if key not in _INV_FREQ:
        _INV_FREQ[key] = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
    return _INV_FREQ[key]


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate-half RoPE over all channels of ``x [B, T, H, D]`` at absolute ``positions [T]``."""
    dim = x.shape[-1]
    inv_freq = _inv_freq(dim, theta, x.device)
    freqs = torch.outer(positions.to(torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)[None, :, None, :]
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    x1, x2 = x[..., : dim // 2], x[..., dim // 2:]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


# --------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------
def compact_cache_entries(seq_len: int, pattern) -> int:
    """Entries a layer cache holds after ``seq_len`` tokens: ``|{j < T : j < P or j >= T-W-1 or
    (j+1) % D == 0}|`` (each position once), or ``T`` for a dense layer (``pattern`` None)."""
    T = seq_len
    if pattern is None:
        return T
    D, W, P = pattern
    if D == 1:
        return T
    head_tail = min(T, P + W + 1)
    if D > 0 and T - W - 1 > P:
        # chunk ends j in [P, T-W-1): multiples of D among j+1 in [P+1, T-W-1]
        head_tail += (T - W - 1) // D - P // D
    return head_tail


class RATPlusLayerCache:
    """The cache of one layer.

    Keys/values live in one buffer ``[B, H, capacity, d_h]`` with the absolute position of every
    slot in ``positions`` (``-1`` = empty). Sparse ``(D, W, P)``: slots ``[0, P)`` hold the initial
    tokens, ``[P, P + W + 1)`` a ring of the last ``W + 1`` tokens (position ``p`` in slot
    ``P + p % (W + 1)``), then the chunk ends ``(j + 1) % D == 0`` that left the ring, appended in
    order (capacity doubles). Every position is stored once. Dense: positions ``0..T-1`` in order.
    The buffer grows with the sequence: before the ring wraps, position ``p`` lands in slot
    ``P + p`` (and while ``seen <= P`` only slots ``[0, seen)`` are written), so a short prompt with
    a wide window or many initial tokens costs (and attends over) only what it holds, not
    ``P + W + 1`` slots.
    ``state``: the recurrence state ``(k~, v~)`` of the last token, fp32 ``[B, H, d_h]``.
    """

    def __init__(self, pattern):
        if pattern is not None and pattern[0] == 1:
            pattern = None                                # D = 1 admits every key: dense
        self.pattern = pattern
        self.fixed = 0 if pattern is None else pattern[2] + pattern[1] + 1
        self.keys: Optional[torch.Tensor] = None
        self.values: Optional[torch.Tensor] = None
        self.positions: Optional[torch.Tensor] = None
        self.extra = 0                                    # dense: tokens; sparse: chunk entries
        self.seen = 0
        self.state: Optional[Tuple[torch.Tensor, torch.Tensor]] = None

    # storage -------------------------------------------------------------------------------
    @property
    def used(self) -> int:
        return self.fixed + self.extra

    def _slots_written(self, seen: int) -> int:
        """Leading slots that can hold an entry after ``seen`` tokens. The initial tokens fill
        slots ``[0, seen)`` while ``seen <= P``; later, until the ring wraps, position ``p`` sits
        in slot ``P + p % (W + 1) < P + seen``, and once it has wrapped every used slot counts."""
        if self.pattern is None:
            return self.used
        P = self.pattern[2]
        return seen if seen <= P else min(self.used, P + seen)

    def _reserve(self, k: torch.Tensor, need: int) -> None:
        """Make room for ``need`` slots in total (``k``: a ``[B, H, n, d]`` template)."""
        B, H, _, Dh = k.shape
        cap = 0 if self.keys is None else self.keys.shape[2]
        if self.keys is not None and need <= cap:
            return
        if need <= self.fixed:          # the initial tokens and ring: double, up to their size
            new_cap = min(self.fixed, max(need, 2 * cap, 16))
        else:                           # the chunk ends after them: double their part
            new_cap = self.fixed + max(need - self.fixed, 2 * max(cap - self.fixed, 0), 16)
        keys = k.new_zeros(B, H, new_cap, Dh)
        values = k.new_zeros(B, H, new_cap, Dh)
        positions = torch.full((new_cap,), -1, dtype=torch.long, device=k.device)
        if self.keys is not None:
            keys[:, :, :cap] = self.keys
            values[:, :, :cap] = self.values
            positions[:cap] = self.positions
        self.keys, self.values, self.positions = keys, values, positions

    def insert(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append the next ``n`` tokens (positions ``seen .. seen+n-1``); ``k, v``: ``[B, H, n, d]``."""
        n = k.shape[2]
        start, end = self.seen, self.seen + n
        dev = k.device
        if self.pattern is None:
            self._reserve(k, end)
            self.keys[:, :, start:end] = k
            self.values[:, :, start:end] = v
            self.positions[start:end] = torch.arange(start, end, device=dev)
            self.extra = end
            self.seen = end
            return
        D, W, P = self.pattern
        self._reserve(k, self._slots_written(end))
        if n == 1:
            self._insert_one(k, v)
            return
        new_pos = torch.arange(start, end, device=dev)
        # 1. initial tokens
        n_init = max(0, min(end, P) - start)
        if n_init > 0:
            self.keys[:, :, start:start + n_init] = k[:, :, :n_init]
            self.values[:, :, start:start + n_init] = v[:, :, :n_init]
            self.positions[start:start + n_init] = new_pos[:n_init]
        # 2. tokens that leave the ring (older than the last W + 1); chunk ends move on
        keep_from = max(P, end - (W + 1))
        ring = slice(P, P + W + 1)
        ring_pos = self.positions[ring]
        old_out = (ring_pos >= 0) & (ring_pos < keep_from)
        if D > 0:
            old_ends = old_out & ((ring_pos + 1) % D == 0)
            new_sel = (new_pos >= P) & (new_pos < keep_from) & ((new_pos + 1) % D == 0)
            ring_k, ring_v = self.keys[:, :, ring], self.values[:, :, ring]
            mk = torch.cat((ring_k[:, :, old_ends], k[:, :, new_sel]), dim=2)
            mv = torch.cat((ring_v[:, :, old_ends], v[:, :, new_sel]), dim=2)
            mp = torch.cat((ring_pos[old_ends], new_pos[new_sel]))
            m = mp.numel()
            if m:
                order = torch.argsort(mp)
                self._reserve(k, self.used + m)
                s = self.used
                self.keys[:, :, s:s + m] = mk[:, :, order]
                self.values[:, :, s:s + m] = mv[:, :, order]
                self.positions[s:s + m] = mp[order]
                self.extra += m
        self.positions[ring] = torch.where(old_out, torch.full_like(ring_pos, -1), ring_pos)
        # 3. the newest tokens enter the ring
        first = max(start, keep_from)
        if first < end:
            idx = torch.arange(first, end, device=dev)
            slots = P + idx % (W + 1)
            self.keys[:, :, slots] = k[:, :, first - start:]
            self.values[:, :, slots] = v[:, :, first - start:]
            self.positions[slots] = idx
        self.seen = end

    def _insert_one(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """One decoding step of a sparse cache. Where every entry goes is a function of the
        position alone, so it is decided with Python integers: no boolean indexing, hence no
        device synchronisation per layer and step (the general path needs several)."""
        D, W, P = self.pattern
        p = self.seen
        if p < P:                                         # an initial token
            slot = p
        else:
            ring = W + 1
            slot = P + p % ring
            q = p - ring                                  # the ring entry this token replaces
            if q >= P and D > 0 and (q + 1) % D == 0:     # a chunk end leaving the ring: keep it
                self._reserve(k, self.used + 1)
                u = self.used
                self.keys[:, :, u] = self.keys[:, :, slot]
                self.values[:, :, u] = self.values[:, :, slot]
                self.positions[u] = q
                self.extra += 1
        self.keys[:, :, slot] = k[:, :, 0]
        self.values[:, :, slot] = v[:, :, 0]
        self.positions[slot] = p
        self.seen = p + 1

    def check_step(self, k: torch.Tensor, layer_idx: int) -> None:
        """Refuse a step whose keys ``[B, H, n, d]`` do not fit the stored ones: another batch size
        (a cache of one prompt reused for several sequences or beams) or another dtype."""
        if k.shape[0] != self.keys.shape[0]:
            raise ValueError(f"layer {layer_idx}: the cache holds {self.keys.shape[0]} sequences but this step "
                             f"has {k.shape[0]}; use a new cache (or expand it with batch_repeat_interleave)")
        if k.dtype != self.keys.dtype or k.shape[1:2] + k.shape[3:] != self.keys.shape[1:2] + self.keys.shape[3:]:
            raise ValueError(f"layer {layer_idx}: the cache holds {self.keys.dtype} keys of "
                             f"{tuple(self.keys.shape[1:2] + self.keys.shape[3:])} (heads, head size) but the "
                             f"model computes {k.dtype} keys of {tuple(k.shape[1:2] + k.shape[3:])}; "
                             f"the cache belongs to another model or dtype")

    def is_full(self) -> bool:
        """No empty slot among the used ones: every stored entry is a key of the next query."""
        return self.pattern is None or self.seen >= self.fixed

    def view(self):
        """``(keys, values, positions)`` of the slots that can hold entries (views, no copy):
        a short prompt with many initial tokens or a wide window attends only over what it holds."""
        u = self._slots_written(self.seen)
        return self.keys[:, :, :u], self.values[:, :, :u], self.positions[:u]

    # accounting ----------------------------------------------------------------------------
    def num_entries(self) -> int:
        return 0 if self.positions is None else int((self.positions >= 0).sum())

    def entry_bytes(self) -> int:
        """Bytes of one cached token (its key and value over all heads)."""
        if self.keys is None:
            return 0
        B, H, _, Dh = self.keys.shape
        return 2 * B * H * Dh * self.keys.element_size()

    def state_bytes(self) -> int:
        return 0 if self.state is None else sum(s.numel() * s.element_size() for s in self.state)

    def allocated_bytes(self) -> int:
        total = self.state_bytes()
        for t in (self.keys, self.values, self.positions):
            if t is not None:
                total += t.numel() * t.element_size()
        return total

    def reorder(self, index: torch.Tensor) -> None:
        if self.keys is not None:
            self.keys = self.keys.index_select(0, index.to(self.keys.device))
            self.values = self.values.index_select(0, index.to(self.values.device))
        if self.state is not None:
            self.state = tuple(s.index_select(0, index.to(s.device)) for s in self.state)


class RATPlusCache:
    """Generation cache of a RAT+ model: one :class:`RATPlusLayerCache` per layer.

    Works as ``past_key_values`` for ``model(...)`` and ``model.generate(...)``. Created for one
    attention mode: ``RATPlusCache(config, "sparse")`` keeps the compact per-layer cache,
    ``"dense"`` a full one. ``size()`` reports entries and bytes.
    """

    is_compileable = False
    is_croppable = False

    def __init__(self, config: RATPlusConfig, attention_mode: Optional[str] = None):
        mode = attention_mode or config.attention_mode
        if mode not in ("dense", "sparse"):
            raise ValueError(f"attention mode must be 'dense' or 'sparse', got {mode!r}")
        self.attention_mode = mode
        self.layers: List[RATPlusLayerCache] = [
            RATPlusLayerCache(config.layer_pattern(i) if mode == "sparse" else None)
            for i in range(config.num_hidden_layers)]

    def __len__(self) -> int:
        return len(self.layers)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].seen

    def get_max_cache_shape(self, layer_idx: int = 0):
        return None

    def num_entries(self) -> int:
        return sum(layer.num_entries() for layer in self.layers)

    def expected_entries(self) -> int:
        """Entries the formula predicts after ``get_seq_length()`` tokens, summed over layers."""
        return sum(compact_cache_entries(layer.seen, layer.pattern) for layer in self.layers)

    def size(self) -> dict:
        """``entries`` (tokens stored, all layers), ``kv_bytes`` (their keys and values),
        ``state_bytes`` (recurrence states), ``allocated_bytes`` (all buffers, incl. spare capacity
        and the position index), ``tokens`` (sequence length seen)."""
        entries = self.num_entries()
        kv = sum(layer.num_entries() * layer.entry_bytes() for layer in self.layers)
        return {
            "tokens": self.get_seq_length(),
            "entries": entries,
            "kv_bytes": kv,
            "state_bytes": sum(layer.state_bytes() for layer in self.layers),
            "allocated_bytes": sum(layer.allocated_bytes() for layer in self.layers),
        }

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        for layer in self.layers:
            layer.reorder(beam_idx)

    def crop(self, max_length: int) -> None:
        """Not possible: the recurrence state of a dropped token cannot be undone, so assisted
        (speculative) generation, which rolls the cache back, is not supported."""
        raise NotImplementedError("a RATPlusCache cannot be cropped (the recurrence state cannot be rolled back): "
                                  "assisted / speculative generation is not supported")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.reorder_cache(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        for layer in self.layers:
            if layer.keys is not None:
                index = torch.arange(layer.keys.shape[0], device=layer.keys.device).repeat_interleave(repeats)
                layer.reorder(index)


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------
class RATPlusRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return (y * self.weight.float()).to(x.dtype)


class RATPlusMLP(nn.Module):
    def __init__(self, config: RATPlusConfig):
        super().__init__()
        d, f = config.hidden_size, config.intermediate_size
        self.swiglu = config.ffn_type == "swiglu"
        if self.swiglu:
            self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x)))


class RATPlusAttention(nn.Module):
    def __init__(self, config: RATPlusConfig, layer_idx: int):
        super().__init__()
        d = config.hidden_size
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim ** -0.5
        self.rope_theta = config.rope_theta
        self.use_recurrence = config.recurrence
        self.use_output_gate = config.output_gate
        pattern = tuple(config.layer_pattern(layer_idx))
        self.pattern = None if pattern[0] == 1 else pattern
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        if self.use_output_gate:
            self.output_gate_proj = nn.Linear(d, d, bias=False)
        if self.use_recurrence:
            self.recurrence_gate_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def active_pattern(self, mode: str):
        return self.pattern if mode == "sparse" else None

    def forward(self, u: torch.Tensor, positions: torch.Tensor, mode: str,
                cache: Optional[RATPlusLayerCache] = None) -> torch.Tensor:
        B, T, _ = u.shape
        shape = (B, T, self.num_heads, self.head_dim)
        q = self.q_proj(u).view(shape)
        k = self.k_proj(u).view(shape)
        v = self.v_proj(u).view(shape)
        past = cache is not None and cache.seen > 0
        if past:               # before the recurrence, whose state would broadcast another batch size
            cache.check_step(k.transpose(1, 2), self.layer_idx)
        if self.use_recurrence:
            g = self.recurrence_gate_proj(u).view(shape)
            k, v, state = gated_recurrence(g, k, v, initial_state=cache.state if past else None)
            if cache is not None:
                cache.state = state
        q = rope(q, positions, self.rope_theta)
        k = rope(k, positions, self.rope_theta)
        pattern = self.active_pattern(mode)
        if cache is not None and cache.pattern != pattern:
            raise ValueError(f"layer {self.layer_idx}: the cache was built for pattern {cache.pattern} "
                             f"but the layer runs {pattern} (attention mode changed mid-generation?)")
        kh, vh = k.transpose(1, 2), v.transpose(1, 2)             # [B, H, T, d]
        if not past:
            attn = full_attention(q, k, v, pattern, self.scale)
            if cache is not None:
                cache.insert(kh, vh)
        elif T == 1:
            cache.insert(kh, vh)                                    # its evictions are never needed by t
            ck, cv, cpos = cache.view()
            if _kernel_decode_attention is not None and KERNEL_BACKEND == "auto" and cache.is_full() \
                    and (q.is_cuda or KERNELS_ON_CPU):
                # after the insertion every stored entry is allowed for this query: no mask needed
                attn = _kernel_decode_attention(q[:, 0], ck, cv, self.scale).unsqueeze(1)
            else:
                attn = _sdpa(q, ck, cv, allowed_keys(positions, cpos, pattern), self.scale)
        else:
            ck, cv, cpos = cache.view()
            keys, values = torch.cat((ck, kh), dim=2), torch.cat((cv, vh), dim=2)
            mask = allowed_keys(positions, torch.cat((cpos, positions)), pattern)
            attn = _sdpa(q, keys, values, mask, self.scale)
            cache.insert(kh, vh)
        attn = attn.reshape(B, T, -1)
        if self.use_output_gate:
            attn = attn * torch.sigmoid(self.output_gate_proj(u))
        return self.o_proj(attn)


class RATPlusDecoderLayer(nn.Module):
    def __init__(self, config: RATPlusConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RATPlusRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = RATPlusAttention(config, layer_idx)
        self.post_attention_layernorm = RATPlusRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = RATPlusMLP(config)

    def forward(self, x, positions, mode, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), positions, mode, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class RATPlusPreTrainedModel(PreTrainedModel):
    config_class = RATPlusConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["RATPlusDecoderLayer"]

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RATPlusRMSNorm):
            torch.nn.init.ones_(module.weight)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # generate() must not build a DynamicCache: prepare_inputs_for_generation builds a RATPlusCache.
        return False


def _check_unpadded(attention_mask: Optional[torch.Tensor]) -> None:
    """Every position must be attended: the mask may only be all ones (one read per step)."""
    if attention_mask is None:
        return
    if attention_mask.dim() != 2:
        raise ValueError(f"RATPlus models take a 2-D attention_mask [batch, tokens] of ones; got "
                         f"{attention_mask.dim()}-D (the attention pattern is fixed by the model)")
    if not bool(attention_mask.bool().all()):
        raise ValueError("RATPlus models do not support padded batches: the recurrence runs over every "
                         "position. Generate unpadded prompts (equal lengths, or one at a time).")


class RATPlusModel(RATPlusPreTrainedModel):
    """Embedding, the RAT+ blocks and the final RMSNorm."""

    def __init__(self, config: RATPlusConfig):
        super().__init__(config)
        config.check_pattern()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(RATPlusDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RATPlusRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention_mode = config.attention_mode
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def set_attention_mode(self, mode: str) -> None:
        """Switch every layer between ``"dense"`` and ``"sparse"`` attention."""
        if mode not in ("dense", "sparse"):
            raise ValueError(f"attention mode must be 'dense' or 'sparse', got {mode!r}")
        self.attention_mode = mode
        self.config.attention_mode = mode

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[RATPlusCache] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        **kwargs,
    ):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        output_hidden_states = bool(output_hidden_states if output_hidden_states is not None
                                    else self.config.output_hidden_states)
        return_dict = getattr(self.config, "return_dict", True) if return_dict is None else return_dict
        if past_key_values is not None and not isinstance(past_key_values, RATPlusCache):
            raise TypeError(f"past_key_values must be a RATPlusCache, got {type(past_key_values).__name__}")
        if use_cache and past_key_values is None:
            past_key_values = RATPlusCache(self.config, self.attention_mode)
        if past_key_values is not None and past_key_values.attention_mode != self.attention_mode:
            raise ValueError(f"the cache was built for {past_key_values.attention_mode} attention but the "
                             f"model runs in {self.attention_mode} mode")
        if past_key_values is not None and len(past_key_values) != len(self.layers):
            raise ValueError(f"the cache has {len(past_key_values)} layers but the model {len(self.layers)}; "
                             f"it belongs to another model")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        T = x.shape[1]
        if T == 0:
            raise ValueError("the input has no tokens")
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        _check_unpadded(attention_mask)
        positions = torch.arange(past, past + T, device=x.device)
        if position_ids is not None and position_ids.shape[-1] == T:
            expected = positions.to(position_ids.device).expand_as(position_ids)
            if not torch.equal(position_ids, expected):
                raise ValueError("RATPlus models use the absolute positions of the tokens in the cache; "
                                 "custom position_ids (padding, packing) are not supported")
        hidden = (x,) if output_hidden_states else None
        for i, layer in enumerate(self.layers):
            x = layer(x, positions, self.attention_mode,
                      past_key_values.layers[i] if past_key_values is not None else None)
            if output_hidden_states:
                hidden = hidden + (x,)
        x = self.norm(x)
        if output_hidden_states:
            hidden = hidden[:-1] + (x,)
        out_cache = past_key_values if use_cache else None
        if not return_dict:
            return tuple(t for t in (x, out_cache, hidden) if t is not None)
        return BaseModelOutputWithPast(last_hidden_state=x, past_key_values=out_cache, hidden_states=hidden)


class RATPlusForCausalLM(RATPlusPreTrainedModel, GenerationMixin):
    """RAT+ language model: :class:`RATPlusModel` plus an untied LM head."""

    def __init__(self, config: RATPlusConfig):
        super().__init__(config)
        self.model = RATPlusModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    @property
    def attention_mode(self) -> str:
        return self.model.attention_mode

    def set_attention_mode(self, mode: str) -> None:
        """Switch between ``"dense"`` and ``"sparse"`` (the config's D/W/P) attention."""
        self.model.set_attention_mode(mode)

    def new_cache(self, attention_mode: Optional[str] = None) -> RATPlusCache:
        return RATPlusCache(self.config, attention_mode or self.model.attention_mode)

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[RATPlusCache] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        logits_to_keep: int = 0,
        **kwargs,
    ):
        return_dict = getattr(self.config, "return_dict", True) if return_dict is None else return_dict
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=past_key_values, inputs_embeds=inputs_embeds,
                             use_cache=use_cache, output_hidden_states=output_hidden_states,
                             return_dict=True)
        h = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            h = h[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            h = h[:, logits_to_keep]
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            if labels.shape[1] != logits.shape[1]:
                raise ValueError(f"labels cover {labels.shape[1]} positions but logits {logits.shape[1]}; "
                                 f"pass labels for every input token (and no logits_to_keep)")
            shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
            shift_labels = labels[:, 1:].reshape(-1).to(logits.device)
            loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100)
        if not return_dict:
            out = (logits, outputs.past_key_values, outputs.hidden_states)
            out = tuple(t for t in out if t is not None)
            return ((loss,) + out) if loss is not None else out
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=outputs.past_key_values,
                                      hidden_states=outputs.hidden_states)

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None,
                                      inputs_embeds=None, use_cache=None, **kwargs):
        """Feed only the tokens the cache has not seen (works with transformers 4.x and 5.x)."""
        use_cache = self.config.use_cache if use_cache is None else use_cache
        inputs = {"attention_mask": attention_mask, "use_cache": use_cache}
        if not use_cache:
            if inputs_embeds is not None:
                raise ValueError("generation from inputs_embeds needs use_cache=True")
            inputs["input_ids"] = input_ids
            return inputs
        if past_key_values is None:
            past_key_values = self.new_cache()
        seen = past_key_values.get_seq_length()
        inputs["past_key_values"] = past_key_values
        next_len = kwargs.get("next_sequence_length")
        if inputs_embeds is not None and seen < inputs_embeds.shape[1]:
            inputs["inputs_embeds"] = inputs_embeds[:, seen:]
        elif inputs_embeds is not None:       # prompt given as embeddings: input_ids = generated only
            inputs["input_ids"] = input_ids[:, seen - inputs_embeds.shape[1]:]
        elif next_len is not None:
            inputs["input_ids"] = input_ids[:, -next_len:]
        elif input_ids.shape[1] > seen:
            inputs["input_ids"] = input_ids[:, seen:]
        else:
            # generate() appends each new token to input_ids, so "only the new tokens" cannot be
            # told apart from a stale cache after the first step: refuse instead of re-feeding them
            raise ValueError(
                f"the cache already holds {seen} tokens but input_ids has {input_ids.shape[1]}: pass the "
                f"tokens the cache was filled with followed by at least one new token")
        if kwargs.get("logits_to_keep") is not None:
            inputs["logits_to_keep"] = kwargs["logits_to_keep"]
        for key in ("output_hidden_states", "return_dict"):
            if key in kwargs:
                inputs[key] = kwargs[key]
        return inputs


# save_pretrained of these classes (built here, or loaded from an export) copies this file and
# configuration_ratplus.py next to the weights and writes config.auto_map, so the folder loads
# again with AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).
RATPlusModel.register_for_auto_class("AutoModel")
RATPlusForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["RATPlusCache", "RATPlusForCausalLM", "RATPlusModel", "RATPlusPreTrainedModel",
           "compact_cache_entries", "allowed_keys"]

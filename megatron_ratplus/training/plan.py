"""Training plan for ``ratplus-pretrain --dry-run``: layout, batch, budget, FLOPs, memory, time.

:func:`make_plan` resolves a :class:`~megatron_ratplus.training.config.RunConfig` for a world size
without touching a GPU or torch.distributed, and :func:`format_plan` renders it. Impossible layouts
(world size not divisible by TP×PP, layers not divisible by PP, heads not divisible by TP, global
batch not divisible by micro-batch×DP, …) and a memory estimate above the GPU's size raise
:class:`~megatron_ratplus.training.config.ConfigError`; the memory error says by how much and lists
single changes (micro-batch, recompute, TP+SP, PP) that would fit.

Counting conventions
--------------------
* **Steps**: ``RunConfig.total_steps()`` — ``ceil(max_tokens / (global_batch × seq_len))`` or
  ``max_steps``, whichever is smaller. Tokens per step = ``global_batch × seq_len``.
* **Model FLOPs**: ``RATPlusModelArgs.flops_per_token(seq_len, padded_vocab)`` (DESIGN.md §4:
  ``3·(2·N_matmul·L + 2·d·V + 2·T·d·L)``, attention counted at full ``T`` in every mode, the
  convention of the anchor's MFU). **Joint training runs two forward/backward passes per batch**
  (sparse, then dense), so a joint step counts ``2 × flops_per_token × tokens_per_step``.
* **Parameters per GPU** (the largest pipeline stage): the sharded matrices of a layer
  (``W_in``: ``blocks·d²``, ``W_out``: ``d²``, FFN ``2·d·f`` or ``3·d·f``) divided by TP, the two
  norm weights (``2d``) replicated, times ``L / PP`` layers; the embedding (``V_pad·d / TP``) on
  the first stage, the LM head (``V_pad·d / TP``) and the final norm on the last stage.

Memory model (bytes per GPU, for the first and the last pipeline stage; the plan reports the larger)
--------------------------------------------------------------------------------------------------
With ``P`` = parameters of the stage on this GPU:

* weights: ``2·P`` (bf16; ``4·P`` for fp32 runs);
* gradients: ``4·P`` — Megatron DDP keeps fp32 ``main_grad`` buffers (``grad_reduce_in_fp32``)
  for all local parameters, also with the distributed optimizer;
* optimizer: ``12·P`` (fp32 master copy + Adam ``m``, ``v``; ``8·P`` for fp32 runs, the master
  is the parameter itself), divided by DP with the distributed optimizer;
* activations: with ``s`` = seq_len, ``b`` = micro-batch, ``t`` = TP, ``e`` = 2 bytes (bf16) or
  4 (fp32), ``H`` heads, ``f`` = FFN width, per layer and micro-batch::

      A_layer = s·b·( e·(R / (t if SP else 1) + S / t) + 4·H / t )
      R = 4d                               inputs and outputs of the two RMSNorms (replicated
                                           over TP unless SP shards the sequence)
      S = n·d                              fused projection output (n = 5: o,q,k,v,g; 4 without g)
        + 2d   (recurrence on)             recurrence outputs k~, v~
        + 2d                               RoPE outputs q, k~ (saved by attention)
        + d                                attention output
        + d    (output gate on)            the gated product (input to W_out); the compiled
                                           gate recomputes sigmoid(o) from the saved o
        + 2f   (gelu; 3f for swiglu)       FFN fc1 output and activation output (f = 4d)
      4·H/t                                fp32 log-sum-exp of the flash-style attention

  RAT+ (gelu, f = 4d): ``R + S = 23d`` elements per token per layer, i.e. ``46·d`` bytes in bf16
  (the attention baseline: 20d).
  A stage holds ``A_layer × L/PP × m`` where ``m`` is the number of micro-batches in flight:
  1F1B keeps ``min(PP, accum)`` on the first stage and 1 on the last; the interleaved schedule
  (VPP chunks) keeps ``min(2(PP−1) + (VPP−1)·PP + 1, accum·VPP)`` chunk-micro-batches of
  ``L/(PP·VPP)`` layers on the first stage and ``(VPP−1)·PP + 1`` on the last (Megatron's warmup
  counts). With ``recompute="full"`` (uniform, one layer per checkpoint) only each layer's input
  is kept — ``s·b·e·d / (t if SP else 1)`` per layer and micro-batch — plus the full activations
  of the one layer being recomputed. ``recompute="selective"`` is counted as no recompute: it
  targets the attention score matrix, which the flash-style kernels never store.
  Joint training runs its two passes one after the other, so the peak is that of one pass.
* logits / loss buffers (last stage, one micro-batch): ``s·b·V_pad/t`` elements × 6 bytes in bf16
  (the fp32 copy that Megatron's vocab-parallel cross-entropy turns into the saved softmax, plus
  the bf16 logits or their bf16 gradient), × 8 in fp32; plus the final norm's input/output.
* runtime overhead: a fixed 2 GiB (CUDA context, cuBLAS/NCCL workspaces, allocator slack).
  Pipeline point-to-point buffers and DDP communication buckets are not counted separately.

Check against a measurement: DESIGN.md §4 reports 53 GB peak for the 1.5B model (24 layers,
d=2048) at B=2, T=4096, bf16, on one H100 without TP/PP (the reference code: fp32 weights, grads
and Adam state = 16 B/param, plus autocast's bf16 weight copies = 2 B/param — the same 18 B/param
this Megatron layout uses: 2 bf16 + 4 main grad + 12 optimizer). For that setting this model gives
27.7 GB of weights+grads+optimizer, 18.5 GB of activations (24 layers × 0.77 GB), 1.6 GB of
logits and 2.1 GB of overhead: **50.0 GB (46.6 GiB), 6% under the measured 53 GB** — a test keeps
it within ±15%. The gap is plausibly the reference code's extra saved tensors (fp32 recurrence
intermediates of its associative scan, the uncompiled gate's sigmoid) and allocator
fragmentation; it is a planning estimate, not a guarantee.

Throughput
----------
Without a measured ``tokens_per_sec_per_gpu``, the time to finish is estimated from this stack's
model-FLOP rate measured on one H100 for the 1.5B preset at T=4096 (docs/benchmarks.md, twentieth
session): 487 TFLOP/s dense and 524 joint with the recipes' 4 micro-batches per update, 530 sparse
(D=64) with one. The rate is carried over to other sizes (``tokens/s = rate / (flops_per_token ×
passes)``) and the pipeline bubble adds ``(PP−1) / (VPP·accum)``. Communication is not modelled, and
the rates were measured with CUDA graphs (eager sparse steps were 9% slower on an H200), so the
estimate is optimistic; it is printed as an estimate. The DESIGN.md §4 reference code reached
328 TFLOP/s dense and 336 joint on the same GPU.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from ..model.config import RATPlusModelArgs, pad_vocab_size
from ..model.presets import get_preset
from .config import ConfigError, RunConfig

GIB = float(1 << 30)
RUNTIME_OVERHEAD_BYTES = 2 * (1 << 30)

# This stack's model-FLOP rate per GPU on one H100 80GB, ratplus-1.5b at T=4096, micro-batch 2
# (docs/benchmarks.md, twentieth session, 2026-12-07; tools/bench/bench_training.py with CUDA graphs,
# no TE/apex, one GPU so no data-parallel communication). Dense and joint with 4 micro-batches per
# update, as the recipes run; sparse (D=64) with one micro-batch per update.
MEASURED_PRESET = "ratplus-1.5b"
MEASURED_H100_TFLOPS = {"dense": 487.1, "joint": 523.8, "sparse": 529.5}


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on one GPU of one pipeline stage."""

    stage: str                  # "only" (PP=1), "first" or "last"
    parameters: int             # parameters held by this GPU
    weights: float
    grads: float
    optimizer: float
    activations: float
    logits: float
    overhead: float
    microbatches_in_flight: float   # layer-stage micro-batches whose activations are held

    @property
    def total(self) -> float:
        return (self.weights + self.grads + self.optimizer + self.activations + self.logits
                + self.overhead)

    @property
    def total_gib(self) -> float:
        return self.total / GIB


@dataclass(frozen=True)
class Plan:
    # model
    preset: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    vocab_size: int
    padded_vocab_size: int
    recurrence: bool
    # layout
    world_size: int
    tensor_parallel: int
    pipeline_parallel: int
    virtual_pipeline_parallel: Optional[int]
    sequence_parallel: bool
    data_parallel: int
    distributed_optimizer: bool
    recompute: Optional[str]
    precision: str
    # batch and budget
    seq_len: int
    micro_batch_size: int
    global_batch_size: int
    grad_accum_steps: int           # micro-batches per step on each DP rank
    steps: int
    tokens_per_step: int
    total_tokens: int
    token_budget: Optional[int]
    max_steps: Optional[int]
    joint: bool
    mode: str
    passes_per_step: int            # forward/backward passes (and optimizer updates) per batch
    # size and compute
    num_parameters: int
    params_per_gpu: int
    params_first_stage: int
    params_last_stage: int
    flops_per_token: float          # one forward+backward pass
    flops_per_step: float           # all passes of a step
    total_flops: float
    # memory
    memory: MemoryEstimate          # the stage with the largest total
    memory_by_stage: Tuple[MemoryEstimate, ...]
    gpu_memory_gib: float
    # time
    tokens_per_sec_per_gpu: float
    throughput_estimated: bool
    throughput_note: str
    step_time_s: float
    total_time_s: float
    model_tflops_per_gpu: float
    mfu: float
    peak_tflops: float
    notes: List[str] = field(default_factory=list)

    @property
    def memory_gib(self) -> float:
        return self.memory.total_gib


# ---------------------------------------------------------------------------------------------
# pieces of the model
# ---------------------------------------------------------------------------------------------
def _layer_params(args: RATPlusModelArgs) -> Tuple[int, int]:
    """(TP-sharded, replicated) parameters of one block (RAT+ layer + FFN)."""
    d = args.hidden_size
    ffn_mats = 3 if args.ffn_type == "swiglu" else 2
    sharded = (args.num_projection_blocks + 1) * d * d + ffn_mats * d * args.ffn_size
    return sharded, 2 * d


def _layer_activation_elements(args: RATPlusModelArgs) -> Tuple[int, int]:
    """(replicated-unless-SP, TP-sharded) activation elements saved per token by one block."""
    d, f = args.hidden_size, args.ffn_size
    replicated = 4 * d
    sharded = args.num_projection_blocks * d + 2 * d + d
    if args.recurrence:
        sharded += 2 * d
    if args.output_gate:
        sharded += d
    sharded += (3 if args.ffn_type == "swiglu" else 2) * f
    return replicated, sharded


def _stage_params(args: RATPlusModelArgs, padded_vocab: int, tp: int, pp: int, stage: str) -> int:
    sharded, replicated = _layer_params(args)
    n = (args.num_layers // pp) * (sharded // tp + replicated)
    emb = padded_vocab * args.hidden_size // tp
    if stage in ("only", "first"):
        n += emb
    if stage in ("only", "last"):
        n += emb + args.hidden_size
    return n


def _inflight(pp: int, vpp: Optional[int], accum: int, stage: str) -> float:
    """Micro-batches (in units of a whole stage's layers) whose activations a stage holds."""
    if pp == 1:
        return 1.0
    if vpp:
        if stage == "first":
            chunks = min(2 * (pp - 1) + (vpp - 1) * pp + 1, accum * vpp)
        else:
            chunks = min((vpp - 1) * pp + 1, accum * vpp)
        return chunks / vpp
    return float(min(pp, accum)) if stage == "first" else 1.0


def _memory(cfg: RunConfig, args: RATPlusModelArgs, padded_vocab: int, dp: int, accum: int,
            stage: str) -> MemoryEstimate:
    p, t = cfg.parallel, cfg.train
    tp, pp, vpp, sp = p.tensor_parallel, p.pipeline_parallel, p.virtual_pipeline_parallel, \
        p.sequence_parallel
    bf16 = t.precision == "bf16"
    e = 2 if bf16 else 4
    n = _stage_params(args, padded_vocab, tp, pp, stage)
    weights = e * n
    grads = 4 * n
    opt = (12 if bf16 else 8) * n
    if p.distributed_optimizer:
        opt /= dp
    tokens = t.seq_len * t.micro_batch_size
    seq_div = tp if sp else 1
    rep, shd = _layer_activation_elements(args)
    per_layer = tokens * (e * (rep / seq_div + shd / tp) + 4 * args.num_attention_heads / tp)
    layers = args.num_layers // pp
    inflight = _inflight(pp, vpp, accum, stage)
    if t.recompute == "full":
        kept = tokens * e * args.hidden_size / seq_div
        activations = kept * layers * inflight + per_layer
    else:
        activations = per_layer * layers * inflight
    logits = 0.0
    if stage in ("only", "last"):
        logits = tokens * padded_vocab / tp * (6 if bf16 else 8) \
            + tokens * e * 2 * args.hidden_size / seq_div
    return MemoryEstimate(stage=stage, parameters=n, weights=float(weights), grads=float(grads),
                          optimizer=float(opt), activations=float(activations), logits=float(logits),
                          overhead=float(RUNTIME_OVERHEAD_BYTES), microbatches_in_flight=inflight)


def _resolve(cfg: RunConfig, world_size: int, vocab_size: Optional[int]):
    if not isinstance(world_size, int) or world_size < 1:
        raise ConfigError(f"world size must be a positive integer, got {world_size!r}")
    cfg.validate()
    dp, accum = cfg.layout_for(world_size)
    args = cfg.model.model_args(vocab_size=vocab_size, seq_len=cfg.train.seq_len)
    padded = pad_vocab_size(args.vocab_size, cfg.parallel.tensor_parallel)
    stages = ("only",) if cfg.parallel.pipeline_parallel == 1 else ("first", "last")
    mems = tuple(_memory(cfg, args, padded, dp, accum, s) for s in stages)
    return dp, accum, args, padded, mems


def _peak(mems) -> MemoryEstimate:
    return max(mems, key=lambda m: m.total)


def _suggestions(cfg: RunConfig, world_size: int, vocab_size: Optional[int], limit: float) -> List[str]:
    """Single changes to the recipe that bring the estimate under ``limit`` bytes."""
    out: List[str] = []

    def attempt(label: str, mutate) -> bool:
        alt = copy.deepcopy(cfg)
        mutate(alt)
        try:
            mems = _resolve(alt, world_size, vocab_size)[-1]
        except ConfigError:
            return False
        total = _peak(mems).total
        if total <= limit:
            out.append(f"{label} (≈{total / GIB:.1f} GiB)")
            return True
        return False

    t, p = cfg.train, cfg.parallel
    mb = t.micro_batch_size // 2
    while mb >= 1:
        if attempt(f"train.micro_batch_size={mb}",
                   lambda c, mb=mb: setattr(c.train, "micro_batch_size", mb)):
            break
        mb //= 2
    if t.recompute != "full":
        attempt("train.recompute=full", lambda c: setattr(c.train, "recompute", "full"))
    for tp in (2, 4, 8):
        if tp <= p.tensor_parallel:
            continue

        def set_tp(c, tp=tp):
            c.parallel.tensor_parallel = tp
            c.parallel.sequence_parallel = True
        if attempt(f"parallel.tensor_parallel={tp} parallel.sequence_parallel=true", set_tp):
            break
    for pp in (2, 4, 8):
        if pp <= p.pipeline_parallel:
            continue
        if attempt(f"parallel.pipeline_parallel={pp}",
                   lambda c, pp=pp: setattr(c.parallel, "pipeline_parallel", pp)):
            break
    return out


def _throughput(cfg: RunConfig, args: RATPlusModelArgs, padded: int, flops_per_token: float,
                passes: int, accum: int) -> Tuple[float, str]:
    t, p = cfg.train, cfg.parallel
    kind = "joint" if t.joint else t.mode
    measured = get_preset(MEASURED_PRESET)
    rate = MEASURED_H100_TFLOPS[kind] * 1e12
    tps = rate / (flops_per_token * passes)
    bubble = (p.pipeline_parallel - 1) / ((p.virtual_pipeline_parallel or 1) * accum)
    tps /= 1.0 + bubble
    note = (f"estimate: this stack's {kind} rate measured on 1 H100 (1.5B, T=4096, CUDA graphs: "
            f"{MEASURED_H100_TFLOPS[kind]:.0f} TFLOP/s of model FLOPs; docs/benchmarks.md) scaled by model "
            f"FLOPs per token")
    if bubble:
        note += f", pipeline bubble +{bubble:.1%}"
    note += "; communication not modelled"
    if t.precision != "bf16":
        note += (f"; UNRELIABLE for {t.precision} training (the rate was measured in bf16; an H100's fp32 "
                 f"and TF32 peaks are far below it: pass a measured tokens/s per GPU)")
    ratio = args.num_parameters(padded) / measured.num_parameters(pad_vocab_size(measured.vocab_size))
    if not 1 / 3 <= ratio <= 3:
        note += ("; UNRELIABLE for a model this far from the measured model's size "
                 "(pass a measured tokens/s per GPU)")
    return tps, note


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------
def make_plan(cfg: RunConfig, world_size: int, *, gpu_memory_gib: float = 80.0,
              tokens_per_sec_per_gpu: float | None = None, peak_tflops: float = 989.0,
              vocab_size: Optional[int] = None) -> Plan:
    """Resolve ``cfg`` for ``world_size`` GPUs (see the module docstring for every formula).

    ``vocab_size`` overrides the model's vocabulary (e.g. the tokenizer's, when known).
    ``tokens_per_sec_per_gpu`` counts batch tokens (a joint step's two passes see each token
    once); without it the time is estimated from this stack's rate measured on one H100.
    Raises :class:`ConfigError` for impossible layouts or an estimate above ``gpu_memory_gib``.
    """
    dp, accum, args, padded, mems = _resolve(cfg, world_size, vocab_size)
    p, t = cfg.parallel, cfg.train
    peak = _peak(mems)
    limit = gpu_memory_gib * GIB
    if peak.total > limit:
        over = (peak.total - limit) / GIB
        fixes = _suggestions(cfg, world_size, vocab_size, limit)
        hint = ("; each of these alone would fit: " + "; ".join(fixes)) if fixes else \
            "; no single change (micro-batch, recompute, TP+SP, PP) fits: combine them"
        raise ConfigError(
            f"estimated memory per GPU {peak.total_gib:.1f} GiB exceeds the GPU's "
            f"{gpu_memory_gib:g} GiB by {over:.1f} GiB ({peak.stage} stage: weights "
            f"{peak.weights / GIB:.1f}, grads {peak.grads / GIB:.1f}, optimizer "
            f"{peak.optimizer / GIB:.1f}, activations {peak.activations / GIB:.1f}, logits "
            f"{peak.logits / GIB:.1f}, overhead {peak.overhead / GIB:.1f} GiB) at "
            f"TP={p.tensor_parallel} PP={p.pipeline_parallel} micro_batch_size="
            f"{t.micro_batch_size} recompute={t.recompute or 'none'}{hint}")

    passes = 2 if t.joint else 1
    steps = cfg.total_steps()
    tokens_per_step = t.global_batch_size * t.seq_len
    fpt = args.flops_per_token(t.seq_len, padded)
    flops_per_step = fpt * tokens_per_step * passes

    if tokens_per_sec_per_gpu is not None:
        if tokens_per_sec_per_gpu <= 0:
            raise ConfigError(f"tokens per second per GPU must be positive, got {tokens_per_sec_per_gpu}")
        tps, estimated = float(tokens_per_sec_per_gpu), False
        note = "given"
    else:
        tps, note = _throughput(cfg, args, padded, fpt, passes, accum)
        estimated = True
    step_time = tokens_per_step / (tps * world_size)
    tflops = tps * fpt * passes / 1e12

    notes = []
    if t.joint:
        pats = set(args.patterns())
        if len(pats) == 1:
            pat = next(iter(pats))
            sparse = f"D={pat.dilation}, W={pat.window}, P={pat.initial}"
        else:
            sparse = "per-layer hybrid patterns"
        notes.append(f"joint training: each batch runs a sparse pass ({sparse}) and a dense pass, "
                     f"each with its own optimizer update; FLOPs count both passes, memory peaks "
                     f"in one")
    if t.recompute == "selective":
        notes.append("recompute=selective is counted as no recompute (flash-style attention keeps "
                     "no score matrix to drop)")
    if world_size > 1 and not p.distributed_optimizer:
        notes.append("distributed optimizer off: optimizer state is replicated on every DP rank")

    first = next(m for m in mems if m.stage in ("only", "first"))
    last = next(m for m in mems if m.stage in ("only", "last"))
    return Plan(
        preset=cfg.model.preset, num_layers=args.num_layers, hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads, vocab_size=args.vocab_size,
        padded_vocab_size=padded, recurrence=args.recurrence,
        world_size=world_size, tensor_parallel=p.tensor_parallel, pipeline_parallel=p.pipeline_parallel,
        virtual_pipeline_parallel=p.virtual_pipeline_parallel, sequence_parallel=p.sequence_parallel,
        data_parallel=dp, distributed_optimizer=p.distributed_optimizer, recompute=t.recompute,
        precision=t.precision, seq_len=t.seq_len, micro_batch_size=t.micro_batch_size,
        global_batch_size=t.global_batch_size, grad_accum_steps=accum, steps=steps,
        tokens_per_step=tokens_per_step, total_tokens=steps * tokens_per_step,
        token_budget=t.max_tokens, max_steps=t.max_steps, joint=t.joint, mode=t.mode,
        passes_per_step=passes, num_parameters=args.num_parameters(padded),
        params_per_gpu=max(first.parameters, last.parameters),
        params_first_stage=first.parameters, params_last_stage=last.parameters,
        flops_per_token=fpt, flops_per_step=flops_per_step, total_flops=flops_per_step * steps,
        memory=peak, memory_by_stage=mems, gpu_memory_gib=gpu_memory_gib,
        tokens_per_sec_per_gpu=tps, throughput_estimated=estimated, throughput_note=note,
        step_time_s=step_time, total_time_s=step_time * steps, model_tflops_per_gpu=tflops,
        mfu=tflops / peak_tflops, peak_tflops=peak_tflops, notes=notes,
    )


def _si(x: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:g}"


def _duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def format_plan(plan: Plan) -> str:
    """Human-readable plan (what ``--dry-run`` prints)."""
    p = plan
    kind = "RAT+" if p.recurrence else "attention baseline"
    lines = [
        f"Training plan: {p.preset} ({kind}; {p.num_layers} layers, d={p.hidden_size}, "
        f"{p.num_attention_heads} heads, vocab {p.vocab_size} padded to {p.padded_vocab_size}), "
        f"seq_len {p.seq_len}, {p.precision}",
        f"  layout        world {p.world_size} = TP {p.tensor_parallel} × PP {p.pipeline_parallel} × "
        f"DP {p.data_parallel}; VPP {p.virtual_pipeline_parallel or '-'}, SP "
        f"{'on' if p.sequence_parallel else 'off'}, distributed optimizer "
        f"{'on' if p.distributed_optimizer else 'off'}, recompute {p.recompute or 'none'}",
        f"  batch         micro-batch {p.micro_batch_size} × DP {p.data_parallel} × "
        f"{p.grad_accum_steps} accumulation steps = global batch {p.global_batch_size} sequences "
        f"= {p.tokens_per_step:,} tokens/step",
        "  training      " + (f"joint: {p.passes_per_step} forward/backward passes and optimizer "
                               f"updates per batch (sparse, then dense); LR advances once per batch"
                               if p.joint else f"{p.mode} mode, 1 pass per batch"),
    ]
    budget = []
    if p.token_budget is not None:
        budget.append(f"token budget {_si(p.token_budget)}")
    if p.max_steps is not None:
        budget.append(f"max_steps {p.max_steps:,}")
    lines.append(f"  steps         {p.steps:,} ({', '.join(budget)}) → {p.total_tokens:,} tokens "
                 f"({_si(p.total_tokens)})")
    stage_params = (f"first stage {_si(p.params_first_stage)}, last stage {_si(p.params_last_stage)}"
                    if p.pipeline_parallel > 1 else "one stage")
    lines.append(f"  parameters    {p.num_parameters:,} ({_si(p.num_parameters)}); per GPU "
                 f"{p.params_per_gpu:,} ({stage_params})")
    lines.append(f"  model FLOPs   {p.flops_per_token:.4g}/token/pass × {p.tokens_per_step:,} tokens × "
                 f"{p.passes_per_step} pass{'es' if p.passes_per_step > 1 else ''} = "
                 f"{p.flops_per_step:.4g}/step; {p.total_flops:.4g} total")
    m = p.memory
    opt_label = "optimizer (fp32 master + Adam m, v" if p.precision == "bf16" else \
        "optimizer (Adam m, v"
    opt_label += f", /DP {p.data_parallel})" if p.distributed_optimizer else ", not sharded)"
    w = "weights (bf16)" if p.precision == "bf16" else "weights (fp32)"
    lines.append(f"  memory/GPU    estimate, GiB ({m.stage} stage"
                 + (f"; other stage {min(p.memory_by_stage, key=lambda x: x.total).total_gib:.1f}"
                    if len(p.memory_by_stage) > 1 else "") + ")")
    rows = [
        (w, m.weights),
        ("gradients (fp32 main grads)", m.grads),
        (opt_label, m.optimizer),
        (f"activations ({p.num_layers // p.pipeline_parallel} layers × "
         f"{m.microbatches_in_flight:.3g} micro-batches in flight"
         + (", full recompute" if p.recompute == "full" else "") + ")", m.activations),
        ("logits / loss buffers", m.logits),
        ("runtime overhead (context, workspaces)", m.overhead),
    ]
    for label, value in rows:
        lines.append(f"    {label:<58s}{value / GIB:8.2f}")
    lines.append(f"    {'total':<58s}{m.total_gib:8.2f}  of {p.gpu_memory_gib:g} GiB "
                 f"({m.total_gib / p.gpu_memory_gib:.0%})")
    lines.append(f"  throughput    {p.tokens_per_sec_per_gpu / 1e3:.1f}K tokens/s/GPU → "
                 f"{p.model_tflops_per_gpu:.0f} TFLOP/s/GPU of model FLOPs, MFU {p.mfu:.1%} of "
                 f"{p.peak_tflops:g} TFLOP/s ({'given' if not p.throughput_estimated else 'estimate'})")
    if p.throughput_estimated:
        lines.append(f"                ({p.throughput_note})")
    lines.append(f"  time          {_duration(p.step_time_s)}/step → {_duration(p.total_time_s)} "
                 f"for {p.steps:,} steps on {p.world_size} GPU(s)"
                 + (" (estimate)" if p.throughput_estimated else ""))
    for note in p.notes:
        lines.append(f"  note          {note}")
    return "\n".join(lines)


__all__ = ["MemoryEstimate", "Plan", "format_plan", "make_plan"]

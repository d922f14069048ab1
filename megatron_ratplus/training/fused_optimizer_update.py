"""One-pass AdamW update that also writes the model's bf16 weights, for Megatron's mixed-precision
optimizers without Transformer-Engine or apex.

Megatron-core's step for a bf16 model is: torch's AdamW over the fp32 master weights
(``self.optimizer.step()``), then ``_copy_main_params_to_model_params`` (one copy per tensor into
the bf16 weights). For the 1.5B model on an H200 that is 12.4 + 2.6 ms of a ~180 ms training step,
repeated for each of the two updates of a joint step. With TE, Megatron's precision-aware
optimizer fuses the copy into TE's FusedAdam; without it, :mod:`ratplus_kernels.optimizer` does the
same in one multi-tensor Triton launch per parameter group (11.2 ms, near the device's copy
bandwidth; docs/benchmarks.md).

:func:`install` swaps the two calls, per Megatron optimizer instance, for the duration of
``step_with_ready_grads`` only, so everything else of Megatron's step stays its own: the gradient
norm and clipping before it, the distributed optimizer's parameter all-gather after it, timers.
Other users of the torch optimizer's ``step`` (Megatron fills optimizer state with a dummy step when
it loads a checkpoint) keep torch's. The moments and step counts live in the torch optimizer's
state with torch's names and dtypes, so checkpoints are the same as without this module.

Gradient clipping's scale is deferred into the update: while the norm exceeds ``clip_grad``,
Megatron's ``clip_grad_by_total_norm_fp32`` rewrites every fp32 main gradient (read + write, 3.4 ms
a step for the 1.5B model on an H200) only for the AdamW step to read them once more. For the
parameters of an optimizer that runs the fused update, :func:`_clip_or_defer` (in place of that
function in Megatron's optimizer module) computes Megatron's coefficient and hands it to the
update, which multiplies each gradient by it in registers: the same fp32 product, one pass fewer.
The stored main gradients are therefore left unscaled after the step (Megatron zeroes them before
the next backward; nothing of its step reads them after the update). The coefficient lives from the
clip to the next update of the same step: each ``prepare_grads`` (the start of every Megatron step)
clears it, so a step that stops early cannot pass it on.

The update's host work (the tensor lists, the launch tables keyed by every tensor's address) is done
in ``prepare_grads``, before Megatron reads the gradient norm. The training loop queues the step
without waiting for the backward, so this host time overlaps the GPU's backward instead of adding to
the gap between the norm read and the update's launch. The update checks (by object identity) that
the prepared lists still name the optimizer's state, groups, parameters and gradients, and prepares
again if not. The preparation creates no AdamW state: on the first step, whose update may still be
skipped, the update prepares itself.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Dict, List, Optional

import torch

from ..checkpoint.state import inner_optimizers
from ..cpu_mode import cpu_mode_enabled


def _model_copies(opt) -> Dict[int, torch.Tensor]:
    """Master weight address -> the low-precision tensor Megatron's ``_copy_main_params_to_model_params``
    writes from it (the model weight, or the distributed optimizer's shard of the param buffer).
    Keyed by address: Megatron hands out ``.data`` views, new objects over the master weights."""
    model_data, main_data = opt._get_model_and_main_params_data_float16()
    return {main.data_ptr(): model for model, main in zip(model_data, main_data) if main is not None}


def _distributed_copies_are_param_buffer_shards(opt, copies: Dict[int, torch.Tensor]) -> bool:
    """The distributed optimizer copies each master shard into its bucket's ``param_data`` (which the
    all-gather sends). Its shard views of the model weights must be that memory, or writing them
    would not reach the all-gather; checked once, against Megatron's own mapping."""
    for model_group, main_group in zip(opt.model_float16_groups, opt.shard_fp32_from_float16_groups):
        for model_param, main in zip(model_group, main_group):
            world_range = opt._get_model_param_range_map(model_param)["gbuf_world_in_bucket"]
            gbuf_index, _, bucket_id = opt.model_param_gbuf_map[model_param]
            bucket = opt.buffers[gbuf_index].buckets[bucket_id].param_data
            target = bucket.view(-1)[world_range.start:world_range.end]
            copy = copies.get(main.data_ptr())
            if copy is None or copy.data_ptr() != target.data_ptr() or copy.numel() != target.numel():
                return False
    return True


def why_not_applicable(opt) -> Optional[str]:
    """None if the fused update can replace ``opt``'s AdamW step and weight copy, else the reason."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    import ratplus_kernels.optimizer as kernels
    if not hasattr(kernels, "fused_adamw_update"):
        return "the Triton kernel is unavailable (triton does not import)"
    if not isinstance(opt, (Float16OptimizerWithFloat16Params, DistributedOptimizer)):
        return f"{type(opt).__name__} is not a bf16/fp16 mixed-precision optimizer"
    if getattr(opt, "is_stub_optimizer", False):
        return "a stub optimizer (no parameters on this rank)"
    config = opt.config
    if getattr(config, "use_precision_aware_optimizer", False):
        return "Megatron's precision-aware optimizer (TE FusedAdam) already fuses the copy"
    if getattr(config, "reuse_grad_buf_for_mxfp8_param_ag", False):
        return "fp8 parameters (the weight copy goes through the gradient buffer) are not supported"
    ddp_config = getattr(opt, "ddp_config", None)
    if ddp_config is not None and getattr(ddp_config, "use_megatron_fsdp", False):
        return "Megatron FSDP manages its own weight copies"
    inner = opt.optimizer
    groups = inner.param_groups
    if not isinstance(inner, torch.optim.AdamW) and not (
            isinstance(inner, torch.optim.Adam) and all(g.get("decoupled_weight_decay") for g in groups)):
        return f"the inner optimizer is {type(inner).__module__}.{type(inner).__name__}, not torch AdamW"
    for g in groups:
        if g.get("amsgrad") or g.get("maximize") or g.get("differentiable"):
            return "AdamW with amsgrad / maximize / differentiable is not supported"
        if not all(0.0 < float(beta) < 1.0 for beta in g.get("betas", (0.9, 0.999))):
            return f"betas {tuple(g['betas'])} outside (0, 1) (the kernel's bias correction takes log2(beta))"
        if not all(p.dtype == torch.float32 and p.is_contiguous() for p in g["params"]):
            return "master weights are not all contiguous fp32"
    copies = _model_copies(opt)
    if any(c.dtype not in (torch.bfloat16, torch.float16) or not c.is_contiguous() for c in copies.values()):
        return "model weights are not all contiguous bf16/fp16 (fp8?)"
    if isinstance(opt, DistributedOptimizer) and not _distributed_copies_are_param_buffer_shards(opt, copies):
        return "the distributed optimizer's weight shards are not views of its param buffers"
    return None


class FusedUpdate:
    """The replacement of ``opt.optimizer.step()`` + ``opt._copy_main_params_to_model_params()``."""

    def __init__(self, opt):
        self.opt = opt
        self.pending_grad_scale = 1.0   # clipping's coefficient, deferred by _clip_or_defer
        self.prepared: Optional[list] = None   # [(param group, PreparedAdamWUpdate)], from prepare()
        self._prepared_state = None             # the torch optimizer's state dict they were made from

    def owns_exactly(self, parameters) -> bool:
        """Whether ``parameters`` are this optimizer's master weights (the list Megatron clips)."""
        mine = [p for group in self.opt.optimizer.param_groups for p in group["params"]]
        return len(mine) == len(parameters) and {id(p) for p in mine} == {id(p) for p in parameters}

    def prepare(self, create_state: bool = True) -> None:
        """The update's host work that needs the gradients but not the norm: done right after
        Megatron's ``prepare_grads``, while the GPU may still run the backward, so that once the
        host has read the gradient norm only the launches remain (docs/benchmarks.md: that read
        was followed by the step's longest GPU idle gap). With ``create_state=False`` (ahead of the
        update, which may yet be skipped) a parameter without AdamW state leaves nothing prepared:
        the first update creates the state and prepares itself."""
        from ratplus_kernels.optimizer import PreparedAdamWUpdate

        inner = self.opt.optimizer
        self.prepared = None
        # Megatron's current pairing, looked up each step as its own copy does (a checkpoint load
        # may replace master weights): a master weight is never left without its model weight
        copies = _model_copies(self.opt)
        prepared = []
        for group in inner.param_groups:
            params: List[torch.Tensor] = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            states = [self._state(inner, p, create_state) for p in params]
            if any(state is None for state in states):
                return
            prepared.append((group, PreparedAdamWUpdate(
                params, [p.grad for p in params], [s["exp_avg"] for s in states],
                [s["exp_avg_sq"] for s in states], [s["step"] for s in states],
                [copies.get(p.data_ptr()) for p in params])))
        self.prepared = prepared
        self._prepared_state = inner.state

    def _prepared_is_current(self) -> bool:
        """Whether the prepared launches still name the optimizer's state, groups, parameters and
        gradients (object identity, cheap). torch's ``load_state_dict`` installs a new state dict and
        new group dicts, so a load between prepare and step, or a gradient replaced, gets the
        launches built again."""
        groups = self.opt.optimizer.param_groups
        if self.prepared is None or self.opt.optimizer.state is not self._prepared_state \
                or len(self.prepared) > len(groups):
            return False
        by_group = {id(group): update for group, update in self.prepared}
        for group in groups:
            update = by_group.get(id(group))
            with_grad = [p for p in group["params"] if p.grad is not None]
            if update is None:
                if with_grad:
                    return False
                continue
            if len(update.params) != len(with_grad) or any(
                    p is not q or p.grad is not g for p, q, g in zip(with_grad, update.params, update.grads)):
                return False
        return True

    @torch.no_grad()
    def step(self, closure=None) -> None:
        if closure is not None:
            raise ValueError("the fused optimizer update takes no closure")
        grad_scale, self.pending_grad_scale = self.pending_grad_scale, 1.0
        if not self._prepared_is_current():
            self.prepare()
        prepared, self.prepared = self.prepared, None
        for group, update in prepared:
            beta1, beta2 = group["betas"]
            update.launch(lr=float(group["lr"]), beta1=float(beta1), beta2=float(beta2), eps=float(group["eps"]),
                          weight_decay=float(group["weight_decay"]), grad_scale=grad_scale)

    @staticmethod
    def _state(inner, p: torch.Tensor, create: bool = True) -> Optional[dict]:
        """torch AdamW's state for ``p``, created as torch's fused AdamW creates it (None where it
        does not exist yet and ``create`` is False)."""
        state = inner.state.get(p)
        if not state and not create:
            return None
        state = inner.state[p]
        if len(state) == 0:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @contextlib.contextmanager
    def in_place_of_megatron_step(self):
        """Inside: the torch optimizer's step is this update, and Megatron's weight copy is a no-op
        (instance attributes, removed on exit)."""
        inner = self.opt.optimizer
        inner.step = self.step
        self.opt._copy_main_params_to_model_params = lambda: None
        try:
            yield
        finally:
            del inner.step
            del self.opt._copy_main_params_to_model_params


_UPDATES: "weakref.WeakSet[FusedUpdate]" = weakref.WeakSet()   # installed updates, for _clip_or_defer


def _clip_or_defer(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """Megatron's ``clip_grad_by_total_norm_fp32``, except that for one fused-update optimizer's
    parameters the coefficient goes to its next update instead of into the gradients."""
    from megatron.core.optimizer import clip_grads

    owner = None if use_decoupled_grad else next((u for u in _UPDATES if u.owns_exactly(parameters)), None)
    if owner is None:
        return clip_grads.clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad)
    clip_coeff = max_norm / (total_norm + 1.0e-6)   # Megatron's formula and threshold
    owner.pending_grad_scale = clip_coeff if clip_coeff < 1.0 else 1.0
    return None


def _defer_clipping_to_fused_updates() -> None:
    """Route the clipping calls of Megatron's optimizer module (``MixedPrecisionOptimizer.clip_grad_norm``
    and ``ChainedOptimizer.step``) through :func:`_clip_or_defer`; idempotent."""
    from megatron.core.optimizer import clip_grads, optimizer as megatron_optimizer

    current = megatron_optimizer.clip_grad_by_total_norm_fp32
    if current is not _clip_or_defer:
        if current is not clip_grads.clip_grad_by_total_norm_fp32:
            raise RuntimeError("megatron.core.optimizer.optimizer.clip_grad_by_total_norm_fp32 was already "
                               f"replaced by {current!r}; the fused optimizer update cannot defer clipping")
        megatron_optimizer.clip_grad_by_total_norm_fp32 = _clip_or_defer


def _wrap(opt, update: FusedUpdate) -> None:
    megatron_prepare_grads = opt.prepare_grads
    megatron_step_with_ready_grads = opt.step_with_ready_grads

    def prepare_grads() -> bool:
        update.pending_grad_scale = 1.0    # a new step: no coefficient from an unfinished one
        update.prepared = None
        found_inf = megatron_prepare_grads()
        if not found_inf:
            update.prepare(create_state=False)    # the update may yet be skipped (non-finite loss)
        return found_inf

    def step_with_ready_grads() -> bool:
        with update.in_place_of_megatron_step():
            return megatron_step_with_ready_grads()

    opt.prepare_grads = prepare_grads
    opt.step_with_ready_grads = step_with_ready_grads
    opt.ratplus_fused_update = update
    _UPDATES.add(update)
    _defer_clipping_to_fused_updates()


def install(optimizer, requested: Optional[bool]) -> None:
    """Resolve ``train.fused_optimizer_update`` for a Megatron optimizer and install the fused update
    on every inner optimizer it applies to. None: automatic (GPU, where it applies), True: required
    (raises ValueError naming why it cannot apply), False: off. :func:`describe` reports the outcome."""
    if requested is False:
        return
    if cpu_mode_enabled():
        from ratplus_kernels._env import interpreting
        if requested is None:
            return
        if not interpreting():
            raise ValueError("train.fused_optimizer_update=true in CPU mode needs TRITON_INTERPRET=1 "
                             "(the Triton kernel then runs on CPU); set it to null or false")
    for opt in inner_optimizers(optimizer):
        reason = why_not_applicable(opt)
        if reason is not None:
            if requested:
                raise ValueError(f"train.fused_optimizer_update=true, but it cannot apply: {reason}; "
                                 "set it to null (automatic) or false")
            continue
        if getattr(opt, "ratplus_fused_update", None) is None:
            _wrap(opt, FusedUpdate(opt))


def installed_count(optimizer) -> int:
    """How many of the inner optimizers run the fused update."""
    return sum(getattr(o, "ratplus_fused_update", None) is not None for o in inner_optimizers(optimizer))


def describe(optimizer) -> str:
    """One line for the run log: how the optimizer updates the master and model weights."""
    fused = installed_count(optimizer)
    if fused:
        return (f"fused AdamW + bf16 weight write (ratplus_kernels.optimizer) on {fused} of "
                f"{len(inner_optimizers(optimizer))} optimizer(s)")
    return "Megatron's (the inner optimizer's step; in bf16/fp16 training then its master-to-model weight copy)"

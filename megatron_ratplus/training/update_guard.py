"""Skip an optimizer update whose loss or gradient norm is not finite, reading the loss as late as
possible.

Why: reading the loss (``.item()``) before ``optimizer.step()`` makes the host wait for the whole
forward/backward before it queues any of the step's work: Megatron's gradient collection, the
norm's launches and the update's preparation then run with the GPU idle. The decision only has to
be made before the weights change, that is when Megatron's step calls ``step_with_ready_grads``
(every Megatron optimizer's ``step`` does, after the gradient norm and clipping). By then the host
has read the gradient norm, so the GPU has finished the backward and the read costs no extra wait.

What a skipped update leaves behind is what Megatron's own early exit (``found_inf`` in
``prepare_grads``) leaves: main gradients collected and possibly the norm computed, but no
parameter, moment or step count changed. The next step zeroes the gradients.
"""
from __future__ import annotations

import contextlib
import math

import torch


class LossRead:
    """The loss of one forward/backward, a device tensor until :meth:`value` first reads it."""

    def __init__(self, loss: torch.Tensor):
        self._tensor = loss
        self._value = None

    def value(self) -> float:
        if self._value is None:
            self._value = float(self._tensor.item())
        return self._value

    def is_finite(self) -> bool:
        return math.isfinite(self.value())


# The optimizer methods that return the gradient norm, each called before the update: Megatron's
# chained optimizer computes it with ``get_grad_norm``, a single one with ``clip_grad_norm``.
_NORM_METHODS = ("get_grad_norm", "clip_grad_norm")


@contextlib.contextmanager
def update_only_if_finite(optimizer, loss: LossRead):
    """Inside: ``optimizer.step()`` updates nothing (``step_with_ready_grads`` returns False) when
    ``loss`` or the gradient norm computed by that step is not finite; the loss is read at that
    point. A finite loss can still come with an infinite or NaN gradient (an overflow in the
    backward): clipping by an infinite norm turns the gradient into NaN, and the update would
    put NaN into the weights and Adam moments for good. The norm is only checked when the step
    computes one (Megatron's chained optimizer always does; a single one when clipping).

    The attributes are put back on exit, including one that was already an instance attribute
    (the fused update wraps ``step_with_ready_grads`` on a non-chained optimizer)."""
    norms = []
    wrapped = {}

    def wrap(name, replacement):
        wrapped[name] = vars(optimizer).get(name)
        setattr(optimizer, name, replacement)

    def recording(method):
        def record(*args, **kwargs):
            norm = method(*args, **kwargs)
            norms.append(norm)
            return norm
        return record

    step_with_ready_grads = optimizer.step_with_ready_grads

    def guarded() -> bool:
        return (loss.is_finite() and all(math.isfinite(float(n)) for n in norms if n is not None)
                and step_with_ready_grads())

    for name in _NORM_METHODS:
        if hasattr(optimizer, name):
            wrap(name, recording(getattr(optimizer, name)))
    wrap("step_with_ready_grads", guarded)
    try:
        yield
    finally:
        for name, own in wrapped.items():
            if own is None:
                delattr(optimizer, name)
            else:
                setattr(optimizer, name, own)

"""Skip an optimizer update whose loss is not finite, reading the loss as late as possible.

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


@contextlib.contextmanager
def update_only_if_finite(optimizer, loss: LossRead):
    """Inside: ``optimizer.step()`` updates nothing (``step_with_ready_grads`` returns False) when
    ``loss`` is not finite; the loss is read at that point. The attribute is put back on exit,
    including one that was already an instance attribute (the fused update wraps the same method
    on a non-chained optimizer)."""
    own = vars(optimizer).get("step_with_ready_grads")
    step_with_ready_grads = optimizer.step_with_ready_grads

    def guarded() -> bool:
        return loss.is_finite() and step_with_ready_grads()

    optimizer.step_with_ready_grads = guarded
    try:
        yield
    finally:
        if own is None:
            del optimizer.step_with_ready_grads
        else:
            optimizer.step_with_ready_grads = own

"""training/update_guard.py: the update is skipped for a non-finite loss, the loss is read only when
the optimizer is about to change the weights, and the optimizer's attribute is restored."""
import math

import pytest
import torch

from megatron_ratplus.training.update_guard import LossRead, update_only_if_finite


class RecordingOptimizer:
    """Megatron's step shape: gradients and norm first, then ``step_with_ready_grads``."""

    def __init__(self, events):
        self.events = events

    def step(self):
        self.events.append("norm")
        success = self.step_with_ready_grads()
        return success, 1.0, None

    def step_with_ready_grads(self):
        self.events.append("update")
        return True


class RecordingLoss(LossRead):
    def __init__(self, value, events):
        super().__init__(torch.tensor(value))
        self.events = events

    def value(self):
        self.events.append("read")
        return super().value()


@pytest.mark.parametrize("value, updated", [(2.5, True), (math.nan, False), (math.inf, False)])
def test_update_runs_only_for_a_finite_loss_read_after_the_norm(value, updated):
    events = []
    opt = RecordingOptimizer(events)
    loss = RecordingLoss(value, events)
    with update_only_if_finite(opt, loss):
        success, _, _ = opt.step()
    assert success is updated
    assert events == (["norm", "read", "update"] if updated else ["norm", "read"])
    assert "step_with_ready_grads" not in vars(opt)      # the class method is back


def test_an_instance_attribute_is_restored():
    """On an optimizer whose method is already an instance attribute (the fused update wraps it on a
    non-chained optimizer), the guard wraps that one and puts it back."""
    events = []
    opt = RecordingOptimizer(events)
    own = lambda: (events.append("own"), True)[1]  # noqa: E731
    opt.step_with_ready_grads = own
    with update_only_if_finite(opt, LossRead(torch.tensor(1.0))):
        assert opt.step()[0] is True
    assert events == ["norm", "own"] and opt.step_with_ready_grads is own
    with pytest.raises(RuntimeError, match="boom"):
        with update_only_if_finite(opt, LossRead(torch.tensor(1.0))):
            raise RuntimeError("boom")
    assert opt.step_with_ready_grads is own


def test_the_loss_is_read_once():
    reads = []
    loss = LossRead(torch.tensor(3.0))
    original = loss._tensor
    loss._tensor = type("T", (), {"item": lambda self: (reads.append(1), original.item())[1]})()
    assert loss.value() == 3.0 and loss.is_finite() and loss.value() == 3.0
    assert reads == [1]


class NormOptimizer(RecordingOptimizer):
    """Megatron's chained step: ``get_grad_norm`` computes the norm before the update."""

    def __init__(self, events, norm):
        super().__init__(events)
        self.norm = norm

    def get_grad_norm(self):
        return self.norm

    def step(self):
        norm = self.get_grad_norm()
        return self.step_with_ready_grads(), norm, None


@pytest.mark.parametrize("norm, updated", [(0.7, True), (math.inf, False), (math.nan, False),
                                           (torch.tensor(math.inf), False), (None, True)])
def test_a_finite_loss_with_a_non_finite_gradient_norm_is_not_applied(norm, updated):
    events = []
    opt = NormOptimizer(events, norm)
    with update_only_if_finite(opt, LossRead(torch.tensor(1.0))):
        success, reported, _ = opt.step()
    assert success is updated and reported is norm
    assert events == (["update"] if updated else [])
    assert not {"get_grad_norm", "step_with_ready_grads"} & set(vars(opt))

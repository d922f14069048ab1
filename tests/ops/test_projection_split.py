"""split_projection: the gradient of the fused projection assembled in place from its blocks'
gradients, equal to autograd's unbind whichever consumers write their slots."""
import pytest
import torch

from megatron_ratplus.ops.projection_split import split_projection

S, B, H, NB, DH = 5, 2, 3, 4, 8


def _projected(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(S, B, H * NB * DH, generator=gen, dtype=torch.float64).requires_grad_()


def _reference_grad(x, consume):
    blocks = x.view(S, B, H, NB, DH).unbind(3)
    return torch.autograd.grad(consume(blocks, None), x)[0]


class _WritesSlots(torch.autograd.Function):
    """A consumer of blocks (i, j) whose backward writes 2 * upstream into their slots."""

    @staticmethod
    def forward(ctx, a, b, destination):
        ctx.destination = destination
        return a * 2, b * 2

    @staticmethod
    def backward(ctx, da, db):
        slots = ctx.destination() if ctx.destination is not None else None
        if slots is None:
            return da * 2, db * 2, None
        slots[0].copy_(da * 2)
        slots[1].copy_(db * 2)
        return slots[0], slots[1], None


def _consume(blocks, gradient, twice=False):
    """o * q-like product, a slot-writing consumer of blocks 1 and 2, block 3 unused, block 1
    used a second time by a slot writer when ``twice``."""
    dest = gradient.destination([1, 2]) if gradient is not None else None
    a, b = _WritesSlots.apply(blocks[1], blocks[2], dest)
    loss = (blocks[0].sin() * a).sum() + (b ** 2).sum()
    if twice:
        dest2 = gradient.destination([1, 0]) if gradient is not None else None
        c, d = _WritesSlots.apply(blocks[1], blocks[0], dest2)
        loss = loss + (c * d).sum()
    return loss


@pytest.mark.parametrize("twice", [False, True])
def test_gradient_equals_unbind(twice):
    x = _projected()
    want = _reference_grad(x, lambda blocks, g: _consume(blocks, g, twice))
    blocks, gradient = split_projection(x, H, NB, DH)
    got = torch.autograd.grad(_consume(blocks, gradient, twice), x)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert got.view(S, B, H, NB, DH)[:, :, :, 3].abs().max() == 0      # the unused block


def test_no_slot_writer_stacks_like_unbind():
    """No consumer asks for slots (blocks 0 and 2 used plainly, 1 and 3 unused): the gradient is
    the stack of the blocks' gradients, zeros for the unused ones."""
    x = _projected()

    def consume(blocks, _gradient):
        return (blocks[0].sin() * blocks[2]).sum()
    want = _reference_grad(x, consume)
    blocks, gradient = split_projection(x, H, NB, DH)
    got = torch.autograd.grad(consume(blocks, gradient), x)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert got.view(S, B, H, NB, DH)[:, :, :, [1, 3]].abs().max() == 0


def test_slots_are_the_returned_gradient_no_copy():
    x = _projected()
    blocks, gradient = split_projection(x, H, NB, DH)
    seen = {}
    provide = gradient.destination([2, 1])

    def spy():
        slots = provide()
        seen["ptr"] = slots[0].data_ptr() - 2 * DH * slots[0].element_size()
        return slots
    a, b = _WritesSlots.apply(blocks[2], blocks[1], spy)
    grad = torch.autograd.grad((a * b).sum() + blocks[0].sum(), x)[0]
    assert grad.data_ptr() == seen["ptr"]                   # the buffer itself, not a stacked copy
    assert gradient._buffer is None                         # released to autograd


def test_retain_graph_second_backward_is_correct():
    x = _projected()
    blocks, gradient = split_projection(x, H, NB, DH)
    loss = _consume(blocks, gradient)
    first = torch.autograd.grad(loss, x, retain_graph=True)[0].clone()
    second = torch.autograd.grad(loss, x)[0]
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(first, _reference_grad(x, _consume), rtol=0, atol=0)


def test_width_mismatch_is_rejected():
    with pytest.raises(ValueError, match="heads x blocks x head_dim"):
        split_projection(torch.zeros(2, 1, 10), 3, 4, 8)

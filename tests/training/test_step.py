"""training/step.py: the loss and the gradients of one global batch (several micro-batches) against the
token-mean next-token cross-entropy computed directly from the model's logits."""
import pytest
import torch
import torch.nn.functional as F

from megatron_ratplus.training.step import forward_backward

from .test_loop import VOCAB, make


def test_loss_and_gradients_are_the_token_mean_next_token_cross_entropy(megatron_single_process):
    cfg, objs, data, _ = make(megatron_single_process, "train.joint=false", "logging.eval_interval=null", steps=1)
    model = objs.model[0].module                     # the GPTModel inside DDP (fp32: no Float16Module)
    gen = torch.Generator().manual_seed(3)
    microbatches = [torch.randint(0, VOCAB, (2, 33), generator=gen) for _ in range(2)]

    # Reference: all four sequences at once, labels = the next token, mean over every token.
    tokens = torch.cat(microbatches)
    logits = model(tokens[:, :-1], torch.arange(32).expand(4, -1), None)          # [b, s, V]
    want_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), tokens[:, 1:].reshape(-1))
    params = list(model.parameters())
    want_grads = torch.autograd.grad(want_loss, params)

    for chunk in objs.model:
        chunk.zero_grad_buffer()
    loss = forward_backward(objs.model, microbatches, seq_len=32)
    assert loss.item() == pytest.approx(want_loss.item(), rel=1e-6)
    for (name, p), g in zip(model.named_parameters(), want_grads):
        torch.testing.assert_close(p.main_grad, g.float(), rtol=1e-4, atol=1e-7, msg=lambda m: f"{name}: {m}")

"""An independent, deliberately literal RAT+ forward pass (loops over t and j) used as the oracle.

It reads the Megatron TP=1 state dict and shares no code with the package: the math is written
again from DESIGN.md §1 so a bug in the package cannot hide in a shared helper.
"""
import math

import torch


def rms_norm(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def rope(x, pos, base):
    """Rotate-half RoPE over the whole head dim; x: [H, dh]."""
    dh = x.shape[-1]
    half = dh // 2
    inv = 1.0 / (base ** (torch.arange(0, dh, 2, dtype=torch.float64) / dh))
    ang = pos * inv                                       # [half]
    ang = torch.cat([ang, ang])                          # [dh]
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * torch.cos(ang).to(x.dtype) + rot * torch.sin(ang).to(x.dtype)


def allowed(t, j, pattern):
    if pattern is None:
        return j <= t
    D, W, P = pattern
    if j > t:
        return False
    return (t - j <= W) or (j < P) or (D > 0 and (j + 1) % D == 0)


def reference_logits(sd, tokens, *, num_layers, hidden, heads, recurrence, output_gate=True,
                     patterns=None, eps=1e-6, base=10000.0, ffn="gelu"):
    """tokens: [B, T] -> logits [B, T, V] in the dtype of the state dict."""
    dh = hidden // heads
    blocks = (["o"] if output_gate else []) + ["q", "k", "v"] + (["g"] if recurrence else [])
    B, T = tokens.shape
    x = sd["embedding.word_embeddings.weight"][tokens]                 # [B, T, d]
    for layer in range(num_layers):
        pre = f"decoder.layers.{layer}."
        pattern = None if patterns is None else patterns[layer]
        u = rms_norm(x, sd[pre + "input_layernorm.weight"], eps)
        w_in = sd[pre + "self_attention.linear_in.weight"]              # [H*nb*dh, d]
        proj = (u @ w_in.t()).view(B, T, heads, len(blocks), dh)
        part = {name: proj[:, :, :, i] for i, name in enumerate(blocks)}
        q, k, v = part["q"], part["k"], part["v"]
        if recurrence:
            a = torch.sigmoid(part["g"])
            hk = torch.zeros_like(k[:, 0])
            hv = torch.zeros_like(v[:, 0])
            ks, vs = [], []
            for t in range(T):
                hk = a[:, t] * hk + (1 - a[:, t]) * k[:, t]
                hv = a[:, t] * hv + (1 - a[:, t]) * v[:, t]
                ks.append(hk)
                vs.append(hv)
            k, v = torch.stack(ks, 1), torch.stack(vs, 1)
        q = torch.stack([rope(q[:, t], t, base) for t in range(T)], 1)
        k = torch.stack([rope(k[:, t], t, base) for t in range(T)], 1)
        out = torch.zeros_like(q)
        for t in range(T):
            js = [j for j in range(T) if allowed(t, j, pattern)]
            scores = torch.stack([(q[:, t] * k[:, j]).sum(-1) for j in js], -1) / math.sqrt(dh)   # [B,H,n]
            p = torch.softmax(scores, -1)
            out[:, t] = sum(p[..., n:n + 1] * v[:, j] for n, j in enumerate(js))
        out = out.reshape(B, T, hidden)
        if output_gate:
            out = out * torch.sigmoid(part["o"].reshape(B, T, hidden))
        x = x + out @ sd[pre + "self_attention.linear_out.weight"].t()
        u = rms_norm(x, sd[pre + "pre_mlp_layernorm.weight"], eps)
        h = u @ sd[pre + "mlp.linear_fc1.weight"].t()
        if ffn == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = torch.nn.functional.silu(gate) * up
        else:
            h = torch.nn.functional.gelu(h)
        x = x + h @ sd[pre + "mlp.linear_fc2.weight"].t()
    x = rms_norm(x, sd["decoder.final_layernorm.weight"], eps)
    return x @ sd["output_layer.weight"].t()

"""A literal, loop-based RAT+ forward pass on Hugging Face weight names (fp64), for tests only.

Written from DESIGN.md §1 independently of ``modeling_ratplus.py``: explicit loops over time for
the recurrence and over queries/keys for attention, RoPE from its definition.
"""
import math

import torch


def rms_norm(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def rope_vector(x, pos, theta):
    """Rotate-half RoPE of one vector x [D] at position pos."""
    D = x.shape[-1]
    half = D // 2
    out = torch.empty_like(x)
    for i in range(half):
        angle = pos * theta ** (-2.0 * i / D)
        c, s = math.cos(angle), math.sin(angle)
        out[i] = x[i] * c - x[i + half] * s
        out[i + half] = x[i + half] * c + x[i] * s
    return out


def key_allowed(t, j, pattern):
    if j > t:
        return False
    if pattern is None:
        return True
    D, W, P = pattern
    return t - j <= W or j < P or (D > 0 and (j + 1) % D == 0)


def reference_logits(sd, tokens, *, layers, heads, recurrence, output_gate, ffn, patterns=None,
                     eps=1e-6, theta=10000.0):
    """``patterns``: None (dense) or a list with one (D, W, P) per layer (D=1 means dense)."""
    sd = {k: v.double() for k, v in sd.items()}
    B, T = tokens.shape
    out = []
    for b in range(B):
        x = sd["model.embed_tokens.weight"][tokens[b]]                 # [T, d]
        d = x.shape[1]
        dh = d // heads
        for i in range(layers):
            p = f"model.layers.{i}."
            pattern = None if patterns is None or patterns[i][0] == 1 else patterns[i]
            u = rms_norm(x, sd[p + "input_layernorm.weight"], eps)
            q = u @ sd[p + "self_attn.q_proj.weight"].T
            k = u @ sd[p + "self_attn.k_proj.weight"].T
            v = u @ sd[p + "self_attn.v_proj.weight"].T
            if recurrence:
                a = torch.sigmoid(u @ sd[p + "self_attn.recurrence_gate_proj.weight"].T)
                kt, vt = torch.zeros(d, dtype=x.dtype), torch.zeros(d, dtype=x.dtype)
                ks, vs = [], []
                for t in range(T):
                    kt = a[t] * kt + (1 - a[t]) * k[t]
                    vt = a[t] * vt + (1 - a[t]) * v[t]
                    ks.append(kt)
                    vs.append(vt)
                k, v = torch.stack(ks), torch.stack(vs)
            attn = torch.zeros(T, d, dtype=x.dtype)
            for h in range(heads):
                sl = slice(h * dh, (h + 1) * dh)
                qr = [rope_vector(q[t, sl], t, theta) for t in range(T)]
                kr = [rope_vector(k[t, sl], t, theta) for t in range(T)]
                for t in range(T):
                    js = [j for j in range(T) if key_allowed(t, j, pattern)]
                    scores = torch.stack([qr[t] @ kr[j] for j in js]) / math.sqrt(dh)
                    w = torch.softmax(scores, 0)
                    attn[t, sl] = sum(w[n] * v[j, sl] for n, j in enumerate(js))
            if output_gate:
                attn = attn * torch.sigmoid(u @ sd[p + "self_attn.output_gate_proj.weight"].T)
            x = x + attn @ sd[p + "self_attn.o_proj.weight"].T
            y = rms_norm(x, sd[p + "post_attention_layernorm.weight"], eps)
            if ffn == "swiglu":
                hdn = torch.nn.functional.silu(y @ sd[p + "mlp.gate_proj.weight"].T) * (y @ sd[p + "mlp.up_proj.weight"].T)
            else:
                hdn = torch.nn.functional.gelu(y @ sd[p + "mlp.up_proj.weight"].T)
            x = x + hdn @ sd[p + "mlp.down_proj.weight"].T
        x = rms_norm(x, sd["model.norm.weight"], eps)
        out.append(x @ sd["lm_head.weight"].T)
    return torch.stack(out)

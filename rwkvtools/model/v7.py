"""RWKV-7 (Goose, x070): generalized delta rule with a diagonal + rank-1 transition, value
residual from layer 0, bounded decay, sigmoid-LoRA output gate, r_k bonus."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .common import add_linears, add_ln_x, group_norm, param, token_shift

DECAY_SCALE = math.exp(-0.5)  # log-decay = -e^{-0.5} * sigmoid(w0 + lora) in (-0.6065, 0)


class TimeMix(nn.Module):
    def __init__(self, ctx, spec, i):
        super().__init__()
        p = f"blocks.{i}.att."
        C, H, N = spec.n_embd, spec.n_head, spec.head_size
        self.H, self.N = H, N
        self.layer_id = i
        for c in ("r", "w", "k", "v", "a", "g"):
            setattr(self, f"x_{c}", param(ctx, p + f"x_{c}", shape=(C,)))
        self.w0 = param(ctx, p + "w0", torch.float32, shape=(C,))
        self.w1, self.w2 = param(ctx, p + "w1"), param(ctx, p + "w2")
        self.a0 = param(ctx, p + "a0", shape=(C,))
        self.a1, self.a2 = param(ctx, p + "a1"), param(ctx, p + "a2")
        if i > 0:
            self.v0 = param(ctx, p + "v0", shape=(C,))
            self.v1, self.v2 = param(ctx, p + "v1"), param(ctx, p + "v2")
        self.g1, self.g2 = param(ctx, p + "g1"), param(ctx, p + "g2")
        self.k_k = param(ctx, p + "k_k", shape=(C,))
        self.k_a = param(ctx, p + "k_a", shape=(C,))
        self.r_k = param(ctx, p + "r_k", torch.float32, shape=(H, N))
        add_linears(self, ctx, p, "receptance", "key", "value", "output")
        add_ln_x(self, ctx, p)

    def forward(self, xx, st, v_first):
        B, T, C = xx.shape
        H, N = self.H, self.N
        prev = token_shift(xx, st["att_x"])
        d = prev - xx
        xr, xw, xk = torch.addcmul(xx, d, self.x_r), torch.addcmul(xx, d, self.x_w), torch.addcmul(xx, d, self.x_k)
        xv, xa, xg = torch.addcmul(xx, d, self.x_v), torch.addcmul(xx, d, self.x_a), torch.addcmul(xx, d, self.x_g)
        r = self.receptance(xr).float()
        k = self.key(xk).float()
        v = self.value(xv).float()
        z = self.w0 + (torch.tanh(xw @ self.w1) @ self.w2).float()
        logw = -DECAY_SCALE * torch.sigmoid(z)
        a = torch.sigmoid((self.a0 + (xa @ self.a1) @ self.a2).float())
        gate = (torch.sigmoid(xg @ self.g1) @ self.g2).float()
        kk = F.normalize((k * self.k_k.float()).view(B, T, H, N), dim=-1, p=2.0, eps=1e-12)
        k = k * (1 + (a - 1) * self.k_a.float())
        if self.layer_id == 0:
            v_first = v
        else:
            v = v + (v_first - v) * torch.sigmoid((self.v0 + (xv @ self.v1) @ self.v2).float())
        kh, vh, rh = k.view(B, T, H, N), v.view(B, T, H, N), r.view(B, T, H, N)
        y, S = ops.wkv7(rh, logw.view(B, T, H, N), kh, vh, -kk, kk * a.view(B, T, H, N), st["wkv"])
        y = group_norm(y.reshape(B, T, C), H, self.ln_x_w, self.ln_x_b)
        y = y + ((rh * kh * self.r_k).sum(-1, keepdim=True) * vh).reshape(B, T, C)
        return self.output((y * gate).to(xx.dtype)), {"att_x": xx[:, -1], "wkv": S}, v_first


class ChannelMix(nn.Module):
    def __init__(self, ctx, spec, i):
        super().__init__()
        p = f"blocks.{i}.ffn."
        self.x_k = param(ctx, p + "x_k", shape=(spec.n_embd,))
        add_linears(self, ctx, p, "key", "value")

    def forward(self, xx, prev_state):
        prev = token_shift(xx, prev_state)
        k = torch.relu(self.key(torch.addcmul(xx, prev - xx, self.x_k))).square()
        return self.value(k), xx[:, -1]

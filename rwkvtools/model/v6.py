"""RWKV-6 (Finch): data-dependent token shift (ddlerp) and data-dependent per-token decay."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .common import add_linears, add_ln_x, group_norm, param, token_shift

# v6 log-decay floor (reference notes §9.4 item 2): a step with log-decay <= -60 multiplies the
# state by <= 9e-27 either way; the clamp keeps every path finite and changes outputs < 1e-14.
LOGDECAY_MIN = -60.0


class TimeMix(nn.Module):
    def __init__(self, ctx, spec, i):
        super().__init__()
        p = f"blocks.{i}.att."
        C, H, N = spec.n_embd, spec.n_head, spec.head_size
        self.H, self.N = H, N
        for c in ("x", "w", "k", "v", "r", "g"):
            setattr(self, f"maa_{c}", param(ctx, p + f"time_maa_{c}", shape=(C,)))
        self.maa_w1 = param(ctx, p + "time_maa_w1")                 # (C, 5D)
        self.maa_w2 = param(ctx, p + "time_maa_w2")                 # (5, D, C)
        self.time_decay = param(ctx, p + "time_decay", torch.float32, shape=(H * N,))
        self.decay_w1 = param(ctx, p + "time_decay_w1")             # (C, Dd)
        self.decay_w2 = param(ctx, p + "time_decay_w2")             # (Dd, A)
        self.bonus = param(ctx, p + "time_faaaa", torch.float32, shape=(H, N))
        add_linears(self, ctx, p, "key", "value", "receptance", "gate", "output")
        add_ln_x(self, ctx, p)

    def forward(self, xx, st, v_first):
        B, T, C = xx.shape
        H, N = self.H, self.N
        prev = token_shift(xx, st["att_x"])
        d = prev - xx
        z = torch.tanh((xx + d * self.maa_x) @ self.maa_w1)                     # (B,T,5D)
        z = z.view(B * T, 5, -1).transpose(0, 1)                                  # (5,BT,D)
        m = torch.bmm(z, self.maa_w2).view(5, B, T, C)                            # w,k,v,r,g
        xw = xx + d * (self.maa_w + m[0])
        xk = xx + d * (self.maa_k + m[1])
        xv = xx + d * (self.maa_v + m[2])
        xr = xx + d * (self.maa_r + m[3])
        xg = xx + d * (self.maa_g + m[4])
        r = self.receptance(xr).float().view(B, T, H, N)
        k = self.key(xk).float().view(B, T, H, N)
        v = self.value(xv).float().view(B, T, H, N)
        g = F.silu(self.gate(xg).float())
        ww = self.time_decay + (torch.tanh(xw @ self.decay_w1) @ self.decay_w2).float()
        logw = (-torch.exp(ww)).clamp(min=LOGDECAY_MIN).view(B, T, H, N)
        y, S = ops.wkv_diag(r, k, v, logw, self.bonus, st["wkv"])
        y = group_norm(y.reshape(B, T, H * N), H, self.ln_x_w, self.ln_x_b) * g
        return self.output(y.to(xx.dtype)), {"att_x": xx[:, -1], "wkv": S}, v_first


class ChannelMix(nn.Module):
    def __init__(self, ctx, spec, i):
        super().__init__()
        p = f"blocks.{i}.ffn."
        C = spec.n_embd
        self.maa_k = param(ctx, p + "time_maa_k", shape=(C,))
        self.maa_r = param(ctx, p + "time_maa_r", shape=(C,))
        add_linears(self, ctx, p, "key", "value", "receptance")

    def forward(self, xx, prev_state):
        prev = token_shift(xx, prev_state)
        d = prev - xx
        k = torch.relu(self.key(xx + d * self.maa_k)) ** 2
        r = torch.sigmoid(self.receptance(xx + d * self.maa_r))
        return r * self.value(k), xx[:, -1]

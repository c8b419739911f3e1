"""RWKV-5 (5.0 no gate and per-head decay; 5.1 gate + per-head decay; 5.2 gate + per-channel
decay): matrix-valued state per head, linear bonus, group norm (eps 64e-5)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .common import add_linears, add_ln_x, group_norm, param, token_shift
from .linear import make_linear
from .v4 import ChannelMix, mix  # noqa: F401  (v5 channel-mix is v4's)


class TimeMix(nn.Module):
    def __init__(self, ctx, spec, i):
        super().__init__()
        p = f"blocks.{i}.att."
        C, H, N = spec.n_embd, spec.n_head, spec.head_size
        self.H, self.N = H, N
        self.mix_k = param(ctx, p + "time_mix_k", shape=(C,))
        self.mix_v = param(ctx, p + "time_mix_v", shape=(C,))
        self.mix_r = param(ctx, p + "time_mix_r", shape=(C,))
        self.has_gate = spec.has_gate
        if self.has_gate:
            self.mix_g = param(ctx, p + "time_mix_g", shape=(C,))
            self.gate = make_linear(ctx, p + "gate")
        td = ctx.get(p + "time_decay", torch.float32)
        self.time_decay = nn.Parameter(td.reshape(H, -1), requires_grad=False)  # (H,1) or (H,N)
        if spec.bonus == "time_faaaa":
            self.bonus_log = False
            self.bonus = nn.Parameter(ctx.get(p + "time_faaaa", torch.float32).reshape(H, -1), requires_grad=False)
        else:
            self.bonus_log = True  # time_first: exp() gives the linear bonus
            self.bonus = nn.Parameter(ctx.get(p + "time_first", torch.float32).reshape(H, -1), requires_grad=False)
        add_linears(self, ctx, p, "key", "value", "receptance", "output")
        add_ln_x(self, ctx, p)

    def forward(self, xx, st, v_first):
        B, T, _ = xx.shape
        H, N = self.H, self.N
        prev = token_shift(xx, st["att_x"])
        r = self.receptance(mix(xx, prev, self.mix_r)).float().view(B, T, H, N)
        k = self.key(mix(xx, prev, self.mix_k)).float().view(B, T, H, N)
        v = self.value(mix(xx, prev, self.mix_v)).float().view(B, T, H, N)
        logw = (-torch.exp(self.time_decay)).expand(H, N)
        u = (torch.exp(self.bonus) if self.bonus_log else self.bonus).expand(H, N)
        y, S = ops.wkv_diag(r, k, v, logw, u, st["wkv"])
        y = group_norm(y.reshape(B, T, H * N), H, self.ln_x_w, self.ln_x_b)
        if self.has_gate:
            y = y * F.silu(self.gate(mix(xx, prev, self.mix_g)).float())
        return self.output(y.to(xx.dtype)), {"att_x": xx[:, -1], "wkv": S}, v_first

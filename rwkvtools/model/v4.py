"""RWKV-4: time-mix with the (aa, bb, pp) numerator/denominator recurrence, sigmoid receptance."""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from .common import add_linears, param, token_shift


def mix(xx, prev, mu):
    """v4/v5 token shift: x*mu + x'*(1-mu)."""
    return xx * mu + prev * (1 - mu)


class TimeMix(nn.Module):
    def __init__(self, ctx, spec, i):
        super().__init__()
        p = f"blocks.{i}.att."
        C = spec.n_embd
        self.mix_k = param(ctx, p + "time_mix_k", shape=(C,))
        self.mix_v = param(ctx, p + "time_mix_v", shape=(C,))
        self.mix_r = param(ctx, p + "time_mix_r", shape=(C,))
        self.time_decay = param(ctx, p + "time_decay", torch.float32)
        self.time_first = param(ctx, p + "time_first", torch.float32)
        add_linears(self, ctx, p, "key", "value", "receptance", "output")

    def forward(self, xx, st, v_first):
        prev = token_shift(xx, st["att_x"])
        r = torch.sigmoid(self.receptance(mix(xx, prev, self.mix_r)))
        k = self.key(mix(xx, prev, self.mix_k)).float()
        v = self.value(mix(xx, prev, self.mix_v)).float()
        y, (aa, bb, pp) = ops.wkv4(torch.exp(self.time_decay), self.time_first, k, v,
                                   (st["aa"], st["bb"], st["pp"]))
        out = self.output((r.float() * y).to(xx.dtype))
        return out, {"att_x": xx[:, -1], "aa": aa, "bb": bb, "pp": pp}, v_first


class ChannelMix(nn.Module):
    """v4/v5 channel-mix: sigma(W_r x_r) * W_v relu(W_k x_k)^2."""

    def __init__(self, ctx, spec, i):
        super().__init__()
        p = f"blocks.{i}.ffn."
        C = spec.n_embd
        self.mix_k = param(ctx, p + "time_mix_k", shape=(C,))
        self.mix_r = param(ctx, p + "time_mix_r", shape=(C,))
        add_linears(self, ctx, p, "key", "value", "receptance")

    def forward(self, xx, prev_state):
        prev = token_shift(xx, prev_state)
        k = torch.relu(self.key(mix(xx, prev, self.mix_k))) ** 2
        r = torch.sigmoid(self.receptance(mix(xx, prev, self.mix_r)))
        return r * self.value(k), xx[:, -1]

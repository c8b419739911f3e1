"""Shared pieces of the reference model: embedding + LN0, pre-norm blocks, token shift, head,
state handling. Version-specific time-mix and channel-mix live in v4.py .. v7.py.

One forward serves both forms: ``forward(tokens[B, T], state) -> (logits[B, T, V], state)``;
T = 1 is the RNN step, T > 1 the parallel form (chunked WKV)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SpecError
from ..spec import ModelSpec
from .linear import BuildContext, make_linear

LN_EPS = 1e-5
GN_EPS = 64e-5  # official v5/v6/v7 group-norm eps (= GN(y/8, 1e-5)); rwkv.cpp uses 1e-5 for v5


def check_call(tokens, state, vocab: int, shapes: dict, dtypes: dict | None = None, device=None) -> torch.Tensor:
    """A forward call's inputs as a model needs them, else a ValueError saying what is wrong (not
    an IndexError or a shape mismatch from deep inside): ``tokens`` integer ids (batch, time),
    time >= 1, each in [0, vocab); ``state``, when given, exactly the model's state tensors at
    ``shapes`` (for this batch). Returns the tokens as int64 (int32 kept)."""
    tokens = torch.as_tensor(tokens)
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be (batch, time), got shape {tuple(tokens.shape)}")
    if tokens.dtype == torch.bool or tokens.dtype.is_floating_point or tokens.dtype.is_complex:
        raise ValueError(f"tokens must be integer ids, got {tokens.dtype}")
    if tokens.shape[1] == 0:
        raise ValueError("tokens must hold at least one position")
    if tokens.numel():
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= vocab:
            raise ValueError(f"token id {lo if lo < 0 else hi} is outside the model's vocabulary (0..{vocab - 1})")
    if tokens.dtype not in (torch.int64, torch.int32):
        tokens = tokens.long()
    if state is not None:
        if not isinstance(state, dict) or set(state) != set(shapes):
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"state must be a dict of {sorted(shapes)}, got {got}")
        for k, shp in shapes.items():
            if not hasattr(state[k], "shape"):
                raise ValueError(f"state['{k}'] must be a tensor, got {type(state[k]).__name__}")
            if tuple(state[k].shape) != tuple(shp):
                raise ValueError(f"state['{k}'] has shape {tuple(state[k].shape)}, this model expects {tuple(shp)} "
                                 f"for a batch of {tokens.shape[0]} (init_state(batch_size) makes an empty one)")
            if dtypes is not None and state[k].dtype != dtypes[k]:
                raise ValueError(f"state['{k}'] is {state[k].dtype}, this model keeps it in {dtypes[k]} "
                                 "(init_state makes an empty one)")
            if device is not None and state[k].device != device:
                raise ValueError(f"state['{k}'] is on {state[k].device}, the model on {device}")
    return tokens


def check_batch_size(batch_size) -> None:
    """init_state's batch size: a whole number >= 0, else one ValueError (not torch's error)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 0:
        raise ValueError(f"batch_size must be a whole number >= 0, got {batch_size!r}")


def token_shift(xx: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """x~' for every position: the previous position's x~, the carried state at position 0."""
    if xx.shape[1] == 1:
        return prev.unsqueeze(1)
    return torch.cat([prev.unsqueeze(1), xx[:, :-1]], 1)


class LayerNorm(nn.Module):
    def __init__(self, ctx: BuildContext, prefix: str):
        super().__init__()
        self.weight = nn.Parameter(ctx.get(f"{prefix}.weight"), requires_grad=False)
        self.bias = nn.Parameter(ctx.get(f"{prefix}.bias"), requires_grad=False)

    def forward(self, x):
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, LN_EPS)


def param(ctx: BuildContext, name: str, dtype=None, shape=None) -> nn.Parameter:
    t = ctx.get(name, dtype)
    if shape is not None:
        if t.numel() != math.prod(shape):
            raise SpecError(f"tensor '{name}' has shape {tuple(t.shape)}, expected {math.prod(shape)} values "
                            f"(shape {tuple(shape)})")
        t = t.reshape(shape)
    return nn.Parameter(t, requires_grad=False)


def add_linears(mod: nn.Module, ctx: BuildContext, prefix: str, *names: str) -> None:
    """mod.<name> = the linear stored under prefix + name, for each name (in this order)."""
    for n in names:
        setattr(mod, n, make_linear(ctx, prefix + n))


def add_ln_x(mod: nn.Module, ctx: BuildContext, prefix: str) -> None:
    """The per-head group norm's affine of v5-v7 (fp32): mod.ln_x_w, mod.ln_x_b."""
    mod.ln_x_w = param(ctx, prefix + "ln_x.weight", torch.float32)
    mod.ln_x_b = param(ctx, prefix + "ln_x.bias", torch.float32)


def group_norm(y: torch.Tensor, n_head: int, weight, bias, eps: float = GN_EPS) -> torch.Tensor:
    """Per-head normalisation of the WKV output y (B, T, A), fp32."""
    B, T, A = y.shape
    y = F.group_norm(y.reshape(B * T, A), n_head, weight, bias, eps)
    return y.reshape(B, T, A)


class Block(nn.Module):
    def __init__(self, ctx: BuildContext, spec: ModelSpec, i: int, tmix_cls, cmix_cls):
        super().__init__()
        p = f"blocks.{i}."
        self.layer_id = i
        self.ln1 = LayerNorm(ctx, p + "ln1")
        self.ln2 = LayerNorm(ctx, p + "ln2")
        self.att = tmix_cls(ctx, spec, i)
        self.ffn = cmix_cls(ctx, spec, i)

    def forward(self, x, st: dict, v_first=None):
        dx, st_att, v_first = self.att(self.ln1(x), st, v_first)
        x = x + dx
        dx, ffn_x = self.ffn(self.ln2(x), st["ffn_x"])
        x = x + dx
        st_att["ffn_x"] = ffn_x
        return x, st_att, v_first


class RWKV(nn.Module):
    """The reference RWKV model for every version."""

    def __init__(self, ctx: BuildContext, spec: ModelSpec, tmix_cls, cmix_cls, rescale_every: int = 0,
                 layer_map: list[int] | None = None):
        super().__init__()
        self.spec = spec
        self.dtype = ctx.dtype
        self.emb = nn.Parameter(ctx.get("emb.weight"), requires_grad=False)
        self.ln0 = LayerNorm(ctx, "blocks.0.ln0")
        self.blocks = nn.ModuleList([Block(ctx, spec, i, tmix_cls, cmix_cls) for i in range(spec.n_layer)])
        self.ln_out = LayerNorm(ctx, "ln_out")
        self.head = make_linear(ctx, "head")
        self.rescale_every = rescale_every
        self.manifest = ctx.manifest

    # ----------------------------------------------------------------------------- state
    def state_shapes(self, batch_size: int) -> dict[str, tuple]:
        s = self.spec
        L, C = s.n_layer, s.n_embd
        if s.major == 4:
            return {"att_x": (L, batch_size, C), "ffn_x": (L, batch_size, C),
                    "aa": (L, batch_size, s.dim_att), "bb": (L, batch_size, s.dim_att),
                    "pp": (L, batch_size, s.dim_att)}
        return {"att_x": (L, batch_size, C), "ffn_x": (L, batch_size, C),
                "wkv": (L, batch_size, s.n_head, s.head_size, s.head_size)}

    def init_state(self, batch_size: int = 1) -> dict[str, torch.Tensor]:
        """The empty state: all zeros for every version (v4's bb == 0 marks 'nothing seen')."""
        check_batch_size(batch_size)
        dev = self.emb.device
        return {k: torch.zeros(shp, dtype=self._state_dtype(k), device=dev)
                for k, shp in self.state_shapes(batch_size).items()}

    def _state_dtype(self, name: str) -> torch.dtype:
        return torch.float32 if name not in ("att_x", "ffn_x") else self.dtype

    # ---------------------------------------------------------------------------- forward
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.ln0(F.embedding(tokens, self.emb))

    def forward_hidden(self, tokens: torch.Tensor, state: dict | None = None):
        """Final hidden states after ln_out (B, T, C) and the new state."""
        if not isinstance(tokens, torch.Tensor):
            tokens = torch.as_tensor(tokens, device=self.emb.device)
        shapes = self.state_shapes(tokens.shape[0] if tokens.dim() else 0)
        tokens = check_call(tokens, state, self.spec.vocab, shapes, {k: self._state_dtype(k) for k in shapes},
                            self.emb.device)
        B = tokens.shape[0]
        if state is None:
            state = self.init_state(B)
        x = self.embed(tokens)
        new = {k: [] for k in state}
        v_first = None
        for i, blk in enumerate(self.blocks):
            st = {k: state[k][i] for k in state}
            x, st_new, v_first = blk(x, st, v_first)
            for k in new:
                new[k].append(st_new[k])
            if self.rescale_every and (i + 1) % self.rescale_every == 0:
                x = x / 2
        x = self.ln_out(x)
        return x, {k: torch.stack(v, 0) for k, v in new.items()}

    def forward(self, tokens: torch.Tensor, state: dict | None = None):
        x, state = self.forward_hidden(tokens, state)
        return self.head(x).float(), state

"""Linear layers built from whatever representation a checkpoint stores under a prefix.

The representation is chosen by the tensor names present, never by flags:
* ``P.weight`` (out, in): dense;
* ``P.weight_u`` (out, r) and ``P.weight_v`` (r, in): low-rank, two thin matmuls;
* further representations (quantized, shared + LoRA) register a builder with
  ``register_linear`` from their transform module.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SpecError


class DenseLinear(nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)

    @property
    def out_features(self):
        return self.weight.shape[0]

    def forward(self, x):
        return F.linear(x, self.weight)

    def dense_weight(self) -> torch.Tensor:
        return self.weight


class LowRankLinear(nn.Module):
    """W = U V with U (out, r), V (r, in): y = (x V^T) U^T."""

    def __init__(self, u: torch.Tensor, v: torch.Tensor):
        super().__init__()
        self.weight_u = nn.Parameter(u, requires_grad=False)
        self.weight_v = nn.Parameter(v, requires_grad=False)

    @property
    def out_features(self):
        return self.weight_u.shape[0]

    def forward(self, x):
        return F.linear(F.linear(x, self.weight_v), self.weight_u)

    def dense_weight(self) -> torch.Tensor:
        return self.weight_u @ self.weight_v


# (predicate(tensors, prefix) -> bool, builder(ctx, prefix) -> nn.Module), tried in order
_BUILDERS: list[tuple[Callable, Callable]] = []


def register_linear(predicate: Callable, builder: Callable) -> None:
    _BUILDERS.insert(0, (predicate, builder))


class BuildContext:
    """What a linear builder may need: tensors, manifest, target dtype/device and a cache for
    modules shared between layers (recursive models)."""

    def __init__(self, tensors, manifest, dtype, device):
        self.tensors = tensors
        self.manifest = manifest
        self.dtype = dtype
        self.device = device
        self.shared: dict = {}

    def get(self, name: str, dtype=None) -> torch.Tensor:
        if name not in self.tensors:
            raise SpecError(f"expected tensor '{name}', which is missing")
        t = self.tensors[name]
        return t.to(device=self.device, dtype=dtype or self.dtype)


def make_linear(ctx: BuildContext, prefix: str, optional: bool = False) -> nn.Module | None:
    """Build the linear stored under ``prefix``; the module remembers its checkpoint prefix in
    ``module.prefix`` (calibration hooks and transforms address linears by it)."""
    mod = _build_linear(ctx, prefix)
    if mod is None:
        if optional:
            return None
        raise SpecError(f"linear '{prefix}': expected '{prefix}.weight' (dense) or '{prefix}.weight_u' + "
                        f"'{prefix}.weight_v' (low-rank), found neither")
    mod.prefix = prefix
    return mod


def _build_linear(ctx: BuildContext, prefix: str) -> nn.Module | None:
    t = ctx.tensors
    for pred, build in _BUILDERS:
        if pred(t, prefix):
            return build(ctx, prefix)
    if f"{prefix}.weight" in t:
        return DenseLinear(ctx.get(f"{prefix}.weight"))
    if f"{prefix}.weight_u" in t and f"{prefix}.weight_v" in t:
        return LowRankLinear(ctx.get(f"{prefix}.weight_u"), ctx.get(f"{prefix}.weight_v"))
    return None


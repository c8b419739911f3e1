"""Shared (recursive) linears with per-layer LoRA relaxation, and the view that lets every layer
read the small tensors a recursive checkpoint ties across layers.

Storage (written by transforms/recursive.py; names decide, see spec.shared_source):
* ``shared.map`` int64 (L,): the shared block each layer runs, -1 for a layer with its own tensors;
* ``shared.B.att.key.weight`` (out, in): block B's matrix, stored once;
* ``blocks.i.att.key.lora_a`` (r, in) and ``blocks.i.att.key.lora_b`` (out, r): layer i's
  relaxation, W_i = W_B + lora_b @ lora_a (absent: rank 0, the pure recursive model);
* ``shared.B.att.time_maa_w1`` etc.: small tensors tied across the layers of block B
  (``--share lora,vectors``); every layer of the block reads the same tensor.

The model builds one ``SharedLoRALinear`` per layer (it keeps its own ``prefix`` for calibration
and healing), all of a block holding the same ``nn.Parameter`` for the shared matrix (cached in
``BuildContext.shared``), so the shared weights exist once in memory.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import Checkpoint, LazyTensors, tensor_shape
from ..errors import SpecError
from ..spec import SHARED_MAP, shared_map, shared_source
from .linear import BuildContext, register_linear


class SharedLoRALinear(nn.Module):
    """y = x W_shared^T + (x A^T) B^T, W_shared one Parameter shared by every layer of a block;
    A (r, in) and B (out, r) this layer's LoRA (None at rank 0)."""

    def __init__(self, shared_weight: nn.Parameter, lora_a: torch.Tensor | None, lora_b: torch.Tensor | None,
                 shared_name: str = ""):
        super().__init__()
        self.shared_weight = shared_weight
        self.shared_name = shared_name
        if lora_a is not None:
            self.lora_a = nn.Parameter(lora_a, requires_grad=False)
            self.lora_b = nn.Parameter(lora_b, requires_grad=False)
        else:
            self.lora_a = self.lora_b = None
        self.register_buffer("out_scale", None)

    @property
    def out_features(self):
        return self.shared_weight.shape[0]

    @property
    def rank(self) -> int:
        return 0 if self.lora_a is None else self.lora_a.shape[0]

    def forward(self, x):
        if self.out_scale is not None:  # fp16 rescale of this layer (the shared weight is not touched)
            x = x * self.out_scale
        y = F.linear(x, self.shared_weight)
        if self.lora_a is not None:
            y = y + F.linear(F.linear(x, self.lora_a), self.lora_b)
        return y

    def dense_weight(self) -> torch.Tensor:
        w = self.shared_weight
        if self.lora_a is not None:
            w = w + self.lora_b @ self.lora_a
        if self.out_scale is not None:
            w = w * self.out_scale
        return w

    def scale_output_params(self):
        """For build_model's fp16 rescale: per-layer tensors whose in-place division scales this
        layer's output (a scalar applied to the input), never the shared matrix."""
        if self.out_scale is None:
            self.out_scale = torch.ones((), dtype=self.shared_weight.dtype, device=self.shared_weight.device)
        return [self.out_scale]


def _is_shared_linear(tensors, prefix: str) -> bool:
    return SHARED_MAP in tensors and f"{prefix}.weight" not in tensors and \
        shared_source(tensors, f"{prefix}.weight") is not None


def _build_shared_linear(ctx: BuildContext, prefix: str) -> nn.Module:
    t = ctx.tensors
    src = shared_source(t, f"{prefix}.weight")
    out_f, in_f = _matrix_shape(t, src)
    w = ctx.shared.get(src)
    if w is None:
        w = nn.Parameter(ctx.get(src), requires_grad=False)
        ctx.shared[src] = w
    a_name, b_name = f"{prefix}.lora_a", f"{prefix}.lora_b"
    has_a, has_b = a_name in t, b_name in t
    if has_a != has_b:
        raise SpecError(f"linear '{prefix}': found '{a_name if has_a else b_name}' without "
                        f"'{b_name if has_a else a_name}' (a LoRA needs both factors)")
    a = b = None
    if has_a:
        sa, sb = tensor_shape(t, a_name), tensor_shape(t, b_name)
        if len(sa) != 2 or len(sb) != 2 or sa[1] != in_f or sb[0] != out_f or sa[0] != sb[1]:
            raise SpecError(f"linear '{prefix}': LoRA factors {a_name} {tuple(sa)} and {b_name} {tuple(sb)} do not "
                            f"fit the shared matrix {src} ({out_f}, {in_f}): expected (r, {in_f}) and ({out_f}, r)")
        if sa[0] > 0:
            a, b = ctx.get(a_name), ctx.get(b_name)
    return SharedLoRALinear(w, a, b, src)


def _matrix_shape(t, name: str) -> tuple[int, int]:
    s = tensor_shape(t, name)
    if len(s) != 2:
        raise SpecError(f"shared matrix '{name}' must be 2-D (out, in), found shape {tuple(s)}")
    return s[0], s[1]


register_linear(_is_shared_linear, _build_shared_linear)


# --------------------------------------------------------------------------- tied small tensors
def is_shared_matrix(name: str, shape: tuple) -> bool:
    """A shared block tensor that is a linear's matrix (relaxed by LoRA), not a tied tensor."""
    return name.endswith(".weight") and len(shape) == 2


def layer_lacks(i: int, rest: str) -> bool:
    """Per-layer tensors a layer never has even when its block holds them (v7 layer 0 has no
    value-residual mix: it defines v_first)."""
    return i == 0 and rest in ("att.v0", "att.v1", "att.v2")


def tied_aliases(tensors) -> dict[str, str]:
    """'blocks.i.REST' -> 'shared.B.REST' for every tied small tensor of a recursive checkpoint."""
    mp = shared_map(tensors)
    if mp is None:
        return {}
    by_block: dict[int, list[str]] = {}
    for k in tensors:
        if not k.startswith("shared.") or k == SHARED_MAP:
            continue
        parts = k.split(".", 2)
        if len(parts) < 3 or not parts[1].isdigit():
            raise SpecError(f"tensor '{k}': shared tensors are named 'shared.<block>.<name>'")
        if is_shared_matrix(k, tensor_shape(tensors, k)):
            continue
        by_block.setdefault(int(parts[1]), []).append(parts[2])
    out = {}
    for i, b in enumerate(mp):
        for rest in by_block.get(b, ()):
            name = f"blocks.{i}.{rest}"
            if name not in tensors and not layer_lacks(i, rest):
                out[name] = f"shared.{b}.{rest}"
    return out


class TiedView(LazyTensors):
    """The tensors of a recursive checkpoint plus, under each layer's own names, the small tensors
    it ties (the same tensor objects: no copies). ``base`` is the stored mapping."""

    def __init__(self, base, aliases: dict[str, str]):
        self.base = base
        self.aliases = aliases
        names = list(base) + [k for k in aliases if k not in base]
        shapes = {k: tensor_shape(base, k) for k in base} if isinstance(base, LazyTensors) else {}
        for k, src in aliases.items():
            if src in shapes:
                shapes[k] = shapes[src]
        super().__init__(names, self._load, shapes)

    def _load(self, name):
        return self.base[self.aliases.get(name, name)]


def tied_view(ckpt: Checkpoint) -> Checkpoint:
    """The checkpoint the reference model and the spec read: unchanged unless it ties small
    tensors across layers, then a TiedView over the same tensors."""
    if isinstance(ckpt.tensors, TiedView) or SHARED_MAP not in ckpt.tensors:
        return ckpt
    aliases = tied_aliases(ckpt.tensors)
    if not aliases:
        return ckpt
    return Checkpoint(TiedView(ckpt.tensors, aliases), ckpt.manifest, ckpt.source)


# ----------------------------------------------------------------------------------- ONNX
def emit_onnx(em, mod: SharedLoRALinear, x: str) -> str:
    """ONNX nodes of a SharedLoRALinear for rwkvtools.export (registered there): the shared
    matrix is one initializer however many layers use it (the exporter stores a tensor once)."""
    if mod.out_scale is not None:
        x = em.g.op("Mul", x, em.weight(mod.out_scale.reshape(1), f"{mod.prefix}.out_scale"))
    y = em.g.op("MatMul", x, em.weight(mod.shared_weight, mod.shared_name or f"{mod.prefix}.shared", transpose=True))
    if mod.lora_a is not None:
        a = em.weight(mod.lora_a, f"{mod.prefix}.lora_a", transpose=True)   # (in, r)
        b = em.weight(mod.lora_b, f"{mod.prefix}.lora_b", transpose=True)   # (r, out)
        y = em.g.op("Add", y, em.g.op("MatMul", em.g.op("MatMul", x, a), b))
    return y

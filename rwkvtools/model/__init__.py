"""Build the reference model from a checkpoint."""
from __future__ import annotations

import torch

from ..checkpoint import Checkpoint
from ..errors import RwkvToolsError
from ..spec import ModelSpec, detect
from . import quantized, shared, v4, v5, v6, v7  # noqa: F401  (quantized/shared register linear kinds)
from .common import RWKV
from .linear import BuildContext

_MIXERS = {"4": (v4.TimeMix, v4.ChannelMix), "5.0": (v5.TimeMix, v5.ChannelMix),
           "5.1": (v5.TimeMix, v5.ChannelMix), "5.2": (v5.TimeMix, v5.ChannelMix),
           "6": (v6.TimeMix, v6.ChannelMix), "7": (v7.TimeMix, v7.ChannelMix)}

FP16_RESCALE_EVERY = 6  # ChatRWKV's default for fp16 (v4-v6)


def build_model(ckpt: Checkpoint, device="cpu", dtype=torch.float32, spec: ModelSpec | None = None) -> RWKV:
    from ..transforms import prepare_for_model
    from ..transforms.convert import canonical_vectors, check_layout
    ckpt = prepare_for_model(ckpt)
    spec = spec or detect(ckpt.tensors, ckpt.manifest)
    check_layout(ckpt)  # a tensor of the wrong shape or an unknown one: named now, not a matmul error later
    ckpt = canonical_vectors(ckpt, spec)
    ctx = BuildContext(ckpt.tensors, ckpt.manifest, dtype, torch.device(device))
    tm, cm = _MIXERS[spec.version]
    rescale = FP16_RESCALE_EVERY if (dtype == torch.float16 and spec.major < 7) else 0
    model = RWKV(ctx, spec, tm, cm, rescale_every=rescale)
    if rescale:
        with torch.no_grad():
            for i, blk in enumerate(model.blocks):
                s = 2.0 ** (i // rescale)
                for lin in (blk.att.output, blk.ffn.value):
                    for p_ in _output_params(lin):
                        p_.div_(s)
    model.eval()
    return model


def _output_params(lin):
    """Parameters whose scaling scales the linear's output (the out-side factor)."""
    if hasattr(lin, "weight_u"):
        return [lin.weight_u]
    if hasattr(lin, "scale_output_params"):
        return lin.scale_output_params()
    return [lin.weight]


def load(path: str, device="cpu", dtype=torch.float32) -> RWKV:
    """Load any checkpoint rwkvtools reads and build the reference model (eval mode)."""
    from ..io import read_checkpoint
    if isinstance(dtype, str):
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(dtype)
        if dtype is None:
            raise RwkvToolsError("dtype must be fp32, fp16 or bf16")
    return build_model(read_checkpoint(path), device=device, dtype=dtype)

"""rwkvtools: convert, compress and validate RWKV language models (v4, v5, v6, v7)."""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["load", "read_checkpoint", "detect", "__version__"]


def load(path, device="cpu", dtype=None):
    """Load a checkpoint (.pth, .safetensors, rwkv.cpp .bin, ...) as the reference model:
    ``model.init_state(batch)`` and ``model(tokens[B, T], state) -> (logits[B, T, V], state)``."""
    import torch

    from .model import load as _load
    return _load(path, device=device, dtype=dtype or torch.float32)


def read_checkpoint(path, format=None):
    from .io import read_checkpoint as _r
    return _r(path, format)


def detect(tensors):
    from .spec import detect as _d
    return _d(tensors)

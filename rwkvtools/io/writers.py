"""Pick a writer from the output path (or an explicit format)."""
from __future__ import annotations

import os

from ..checkpoint import Checkpoint
from ..errors import RwkvToolsError


def format_from_path(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    return {".pth": "pth", ".pt": "pth", ".safetensors": "safetensors", ".bin": "rwkvcpp",
            ".gguf": "gguf"}.get(ext, "hf" if ext == "" else "safetensors")


def write_checkpoint(ckpt: Checkpoint, path: str, format: str | None = None) -> str:
    fmt = format or format_from_path(path)
    if fmt == "pth":
        from .pth import write_pth
        write_pth(ckpt, path)
    elif fmt == "safetensors":
        from .safetensors_io import write_safetensors
        write_safetensors(ckpt, path)
    else:
        raise RwkvToolsError(f"writing format '{fmt}' is not available here; use .pth or .safetensors")
    return fmt

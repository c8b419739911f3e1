"""Pick a writer from the output path (or an explicit format)."""
from __future__ import annotations

import os

from ..checkpoint import Checkpoint
from ..errors import RwkvToolsError

WRITABLE = ("pth", "safetensors", "rwkvcpp", "hf", "gguf")


def format_from_path(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext == "" and os.path.isfile(path):
        return "safetensors"
    return {".pth": "pth", ".pt": "pth", ".safetensors": "safetensors", ".bin": "rwkvcpp",
            ".gguf": "gguf"}.get(ext, "hf" if ext == "" else "safetensors")


def write_checkpoint(ckpt: Checkpoint, path: str, format: str | None = None, **options) -> str:
    """Write ``ckpt`` to ``path`` in ``format`` (default: from the extension: .pth, .safetensors,
    .bin = rwkv.cpp, .gguf, no extension = Hugging Face folder). ``options`` go to the format's
    writer (rwkvcpp: data_type, blocks, base_type, version; gguf: its own; all: progress)."""
    fmt = format or format_from_path(path)
    if fmt == "pth":
        from .pth import write_pth
        _no_options(fmt, options)
        write_pth(ckpt, path)
    elif fmt == "safetensors":
        from .safetensors_io import write_safetensors
        write_safetensors(ckpt, path, **options)
    elif fmt == "rwkvcpp":
        from .rwkvcpp import write_rwkvcpp
        write_rwkvcpp(ckpt, path, **options)
    elif fmt == "hf":
        from .hf import write_hf
        write_hf(ckpt, path, **options)
    elif fmt == "gguf":
        try:
            from .gguf_io import write_gguf
        except ImportError:
            raise RwkvToolsError("writing GGUF is not available in this build") from None
        write_gguf(ckpt, path, **options)
    else:
        raise RwkvToolsError(f"unknown output format '{fmt}'; known: {', '.join(WRITABLE)}")
    return fmt


def _no_options(fmt: str, options: dict) -> None:
    options = {k: v for k, v in options.items() if k != "progress" and v is not None}
    if options:
        raise RwkvToolsError(f"the {fmt} writer takes no options ({', '.join(sorted(options))})")

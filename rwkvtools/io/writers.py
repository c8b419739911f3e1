"""Pick a writer from the output path (or an explicit format)."""
from __future__ import annotations

import os

from ..checkpoint import Checkpoint
from ..errors import FormatError, RwkvToolsError

WRITABLE = ("pth", "safetensors", "rwkvcpp", "hf", "gguf")


EXTENSIONS = {".pth": "pth", ".pt": "pth", ".safetensors": "safetensors", ".bin": "rwkvcpp", ".gguf": "gguf"}


def format_from_path(path: str) -> str:
    """The output format DST's name asks for: its extension, a folder (existing, or a name without
    extension) = Hugging Face; an extension no format has is an error (it used to mean
    safetensors, so `x.onnx` or `RWKV-7-1.5B` got a safetensors file)."""
    given = os.path.splitext(os.path.basename(os.path.normpath(path)))[1]
    ext = given.lower()
    if ext in EXTENSIONS:
        return EXTENSIONS[ext]
    if os.path.isdir(path):
        return "hf"
    if ext == "":
        return "safetensors" if os.path.isfile(path) else "hf"
    onnx = " (ONNX files are written by `rwkvtools export-onnx`)" if ext == ".onnx" else ""
    raise FormatError(f"{path}: cannot tell the output format from the extension '{given}'{onnx}: name it "
                      ".pth/.pt, .safetensors, .bin (rwkv.cpp), .gguf or a folder without extension "
                      "(Hugging Face), or give the format (convert --format)")


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

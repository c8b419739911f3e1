"""Readers and writers, one module per format. ``read_checkpoint`` sniffs the format from the
file's first bytes (never from the extension alone)."""
from __future__ import annotations

import os
import struct

from ..checkpoint import Checkpoint
from ..errors import FormatError, RwkvToolsError

FORMATS = ("pth", "safetensors", "rwkvcpp", "hf", "gguf")


def is_onnx_file(path: str) -> bool:
    """An exported model (`export-onnx`) rather than a checkpoint: eval and inspect take it."""
    return str(path).lower().endswith(".onnx") and os.path.isfile(path)


def sniff(path: str) -> str:
    if not os.path.exists(path):
        raise RwkvToolsError(f"{path}: no such file or folder")
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "config.json")):
            return "hf"
        raise FormatError(f"{path}: a folder without config.json is not a Hugging Face model folder")
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise RwkvToolsError(f"{path}: cannot read ({e.strerror})") from None
    if len(head) == 0:
        raise FormatError(f"{path}: empty file")
    if head[:4] == b"fmgg":
        return "rwkvcpp"
    if head[:4] == b"GGUF":
        return "gguf"
    # safetensors before pickles: for one header size in 256 its length (8 bytes, little-endian)
    # starts with 0x80, the pickle protocol byte; a pickle passes this test only if its first 8
    # bytes happen to read as a length the file can hold and byte 8 is '{'
    if len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] <= os.path.getsize(path) - 8:
        return "safetensors"
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return "pth"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if is_onnx_file(path):
        raise FormatError(f"{path}: an ONNX model is not a checkpoint (eval accepts it; transforms need a checkpoint)")
    raise FormatError(f"{path}: not a checkpoint rwkvtools can read (expected a .pth, .safetensors, "
                      f"rwkv.cpp .bin, GGUF file or a Hugging Face folder; first bytes {head[:8].hex()})")


def _check_path(path: str, fmt: str) -> None:
    """For an explicit format (no sniffing): the path exists, is a folder for 'hf' and a readable
    file otherwise."""
    if not os.path.exists(path):
        raise RwkvToolsError(f"{path}: no such file or folder")
    if fmt == "hf" or fmt not in FORMATS:
        return
    if os.path.isdir(path):
        raise FormatError(f"{path}: a folder, not a {fmt} file")
    try:
        open(path, "rb").close()
    except OSError as e:
        raise RwkvToolsError(f"{path}: cannot read ({e.strerror})") from None


def read_checkpoint(path: str, format: str | None = None) -> Checkpoint:
    try:
        return _read(path, format)
    except OSError as e:  # a file the reader opens (a Hugging Face folder's weights, ...) unreadable
        raise RwkvToolsError(f"{e.filename or path}: cannot read ({e.strerror or e})") from None


def _read(path: str, format: str | None) -> Checkpoint:
    from .paths import check_name
    check_name(path)
    if format:
        _check_path(path, format)
    fmt = format or sniff(path)
    if fmt == "pth":
        from .pth import read_pth
        return read_pth(path)
    if fmt == "safetensors":
        from .safetensors_io import read_safetensors
        return read_safetensors(path)
    if fmt == "rwkvcpp":
        from .rwkvcpp import read_rwkvcpp
        return read_rwkvcpp(path)
    if fmt == "hf":
        from .hf import read_hf
        return read_hf(path)
    if fmt == "gguf":
        from .gguf_io import read_gguf
        return read_gguf(path)
    raise RwkvToolsError(f"unknown format '{fmt}'; known: {', '.join(FORMATS)}")

"""safetensors: lazy, memory-mapped reading; the manifest lives in the metadata as JSON under
the key ``rwkvtools``."""
from __future__ import annotations

import json
import struct

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..checkpoint import Checkpoint, LazyTensors, default_manifest
from ..errors import FormatError
from .atomic import atomic_path

META_KEY = "rwkvtools"
_MAX_HEADER = 100 * 1024 * 1024


def read_safetensors(path: str) -> Checkpoint:
    import os
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise FormatError(f"{path}: truncated safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise FormatError(f"{path}: safetensors header length {n} exceeds the file ({size} bytes): truncated or corrupt")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FormatError(f"{path}: safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: safetensors header is not a JSON object")
    data_len = size - 8 - n
    for k, v in header.items():
        if k == "__metadata__":
            continue
        try:
            b, e = v["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise FormatError(f"{path}: tensor '{k}' has no valid data_offsets") from None
        if not (0 <= b <= e <= data_len):
            raise FormatError(f"{path}: tensor '{k}' data [{b}, {e}) lies outside the file's data ({data_len} bytes): truncated")
    try:
        handle = safe_open(path, framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error types
        raise FormatError(f"{path}: not a readable safetensors file ({e})") from None
    meta = handle.metadata() or {}
    manifest = default_manifest()
    if META_KEY in meta:
        try:
            manifest = json.loads(meta[META_KEY])
        except json.JSONDecodeError:
            raise FormatError(f"{path}: the '{META_KEY}' metadata is not valid JSON") from None
    names = list(handle.keys())
    shapes = {k: tuple(header[k]["shape"]) for k in names}
    return Checkpoint(LazyTensors(names, handle.get_tensor, shapes), manifest, source=path)


def write_safetensors(ckpt: Checkpoint, path: str) -> None:
    meta = {META_KEY: json.dumps(ckpt.manifest, sort_keys=True)}
    tensors = {k: ckpt.tensors[k].contiguous() for k in ckpt.tensors}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=meta)

"""safetensors: lazy, memory-mapped reading; the manifest lives in the metadata as JSON under
the key ``rwkvtools``."""
from __future__ import annotations

import json
import struct

import torch
from safetensors import safe_open

from ..checkpoint import Checkpoint, LazyTensors, default_manifest, load_json, parse_manifest
from ..errors import FormatError
from .atomic import atomic_path

META_KEY = "rwkvtools"
_MAX_HEADER = 16 * 1024 * 1024  # a 14B model's header and manifest: well under 1 MB


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
        header = load_json(f.read(n), path, "safetensors header")
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
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in (b, e)):
            raise FormatError(f"{path}: tensor '{k}' has data_offsets {[b, e]!r}, not two integers")
        if not (0 <= b <= e <= data_len):
            raise FormatError(f"{path}: tensor '{k}' data [{b}, {e}) lies outside the file's data ({data_len} bytes): truncated")
    try:
        handle = safe_open(path, framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error types
        raise FormatError(f"{path}: not a readable safetensors file ({e})") from None
    meta = handle.metadata() or {}
    manifest = default_manifest()
    if META_KEY in meta:
        manifest = parse_manifest(meta[META_KEY], f"{path} (metadata '{META_KEY}')")
        # what an earlier reader said of the file it read (rwkv.cpp, HF, GGUF): not this file (written
        # into safetensors metadata by earlier builds; rwkv.cpp's writer and quantize decide by it)
        manifest.pop("source_format", None)
    # keep the writer's order (data offsets), not the library's alphabetical one
    names = sorted(handle.keys(), key=lambda k: (header[k]["data_offsets"][0], header[k]["data_offsets"][1], k))
    shapes = {k: tuple(header[k]["shape"]) for k in names}
    dtypes = {k: _ST_NAMES[header[k].get("dtype")] for k in names if header[k].get("dtype") in _ST_NAMES}
    return Checkpoint(LazyTensors(names, handle.get_tensor, shapes, dtypes), manifest, source=path)


_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


def write_safetensors(ckpt: Checkpoint, path: str, progress: bool | None = None,
                      extra_metadata: dict[str, str] | None = None) -> None:
    """Stream the tensors into a safetensors file one at a time (the header is computed from
    shapes and dtypes first), so peak memory stays near one tensor beyond what the reader holds.
    The manifest goes into the metadata under ``rwkvtools``."""
    import sys

    from ..checkpoint import tensor_dtype, tensor_shape
    t = ckpt.tensors
    names = list(t)
    manifest = {k: v for k, v in ckpt.manifest.items() if k != "source_format"}  # the reader's, not this file's
    header: dict = {"__metadata__": {**(extra_metadata or {}), META_KEY: json.dumps(manifest, sort_keys=True)}}
    off = 0
    for k in names:
        dt = tensor_dtype(t, k)
        if dt not in _ST_DTYPES:
            raise FormatError(f"tensor '{k}' has dtype {dt}, which safetensors cannot store")
        shape = [int(d) for d in tensor_shape(t, k)]
        n = 1
        for d in shape:
            n *= d
        nbytes = n * torch.empty((), dtype=dt).element_size()
        header[k] = {"dtype": _ST_DTYPES[dt], "shape": shape, "data_offsets": [off, off + nbytes]}
        off += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    bar = None
    if progress or (progress is None and sys.stderr.isatty() and off > 1 << 30):
        try:
            from tqdm import tqdm
            bar = tqdm(total=off, unit="B", unit_scale=True, file=sys.stderr, desc="safetensors", leave=False)
        except ImportError:  # pragma: no cover
            bar = None
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for k in names:
                x = t[k]
                want = header[k]
                if tuple(x.shape) != tuple(want["shape"]) or _ST_DTYPES.get(x.dtype) != want["dtype"]:
                    raise FormatError(f"tensor '{k}' is {tuple(x.shape)} {x.dtype}, its reader announced "
                                      f"{tuple(want['shape'])} {want['dtype']}")
                x = x.detach().to("cpu").contiguous().reshape(-1)
                if x.numel():
                    f.write(memoryview(x.view(torch.uint8).numpy()))
                if bar is not None:
                    bar.update(want["data_offsets"][1] - want["data_offsets"][0])
                del x
    if bar is not None:
        bar.close()

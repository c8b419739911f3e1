"""rwkv.cpp ``.bin`` files (docs/FILE_FORMAT.md of rwkv.cpp).

Layout (little-endian int32, no padding): header ``magic 0x67676d66, version (100|101), n_vocab,
n_embed, n_layer, data_type``; then records ``dim_count (1..3), key_length, data_type,
dims[dim_count] (reversed w.r.t. torch), key bytes, data`` until EOF.

rwkv.cpp's converter stores some tensors pre-transformed for its RNN graph. The reader undoes
those transforms so the result is the BlinkDL training form (see docs/FORMS.md):
v4 ``time_decay = -exp(td)``; v5 ``time_decay = exp(-exp(td))`` (recovered in float64, lossy near
1), ``time_first = exp(tf)``; squeezed ``.time_`` vectors; v6/v7 LoRA matrices transposed; v7
``x_rwkvag`` concatenation. Every header field and size is bounds-checked against the file before
anything is allocated.
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass

import numpy as np
import torch

from ..checkpoint import Checkpoint, LazyTensors, default_manifest
from ..errors import FormatError
from . import ggml_quants

MAGIC = 0x67676D66
TYPE_NAMES = {0: "FP32", 1: "FP16", 2: "Q4_0", 3: "Q4_1", 7: "Q5_0", 8: "Q5_1", 9: "Q8_0"}
TYPE_IDS = {v: k for k, v in TYPE_NAMES.items()}
_REMOVED = {4: "Q4_1_O", 5: "Q4_2", 6: "Q4_3"}
MAX_KEY = 1024

V7_MIX = ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g")
V7_LORA = ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2")


@dataclass
class Record:
    name: str
    dtype: int
    shape: tuple  # torch order
    offset: int
    nbytes: int


def _nbytes(dtype: int, n: int, name: str, path: str) -> int:
    if dtype == 0:
        return 4 * n
    if dtype == 1:
        return 2 * n
    qname = TYPE_NAMES[dtype]
    if n % ggml_quants.QK:
        raise FormatError(f"{path}: tensor '{name}' is {qname} but has {n} elements, not a multiple of 32")
    return n // ggml_quants.QK * ggml_quants.block_bytes(qname)


def scan(path: str) -> tuple[dict, list[Record]]:
    """Parse and bounds-check the header and every record header; no tensor data is read."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(24)
        if len(head) < 24:
            raise FormatError(f"{path}: too short for an rwkv.cpp header ({size} bytes)")
        magic, version, n_vocab, n_embed, n_layer, dtype = struct.unpack("<6i", head)
        if magic != MAGIC:
            raise FormatError(f"{path}: bad magic 0x{magic & 0xFFFFFFFF:08x}, expected 0x{MAGIC:08x} ('ggmf'): not an rwkv.cpp file")
        if version not in (100, 101):
            raise FormatError(f"{path}: unsupported rwkv.cpp file version {version} (100 or 101 expected)")
        for what, v in (("n_vocab", n_vocab), ("n_embed", n_embed), ("n_layer", n_layer)):
            if not (0 < v < 1 << 24):
                raise FormatError(f"{path}: header {what} = {v} is out of range")
        header = {"version": version, "n_vocab": n_vocab, "n_embed": n_embed, "n_layer": n_layer,
                  "data_type": TYPE_NAMES.get(dtype, str(dtype))}
        records: list[Record] = []
        pos = 24
        seen = set()
        while pos < size:
            if size - pos < 12:
                raise FormatError(f"{path}: truncated record header at byte {pos}")
            f.seek(pos)
            dim_count, key_len, rtype = struct.unpack("<3i", f.read(12))
            if not 1 <= dim_count <= 3:
                raise FormatError(f"{path}: record at byte {pos} has dim_count {dim_count} (1..3 expected): corrupt file")
            if not 0 < key_len <= MAX_KEY:
                raise FormatError(f"{path}: record at byte {pos} has key length {key_len}: corrupt file")
            if rtype in _REMOVED:
                raise FormatError(f"{path}: data type {_REMOVED[rtype]} was removed from rwkv.cpp; re-quantize from an FP16/FP32 file")
            if rtype not in TYPE_NAMES:
                raise FormatError(f"{path}: record at byte {pos} has unknown data type {rtype}")
            need = 12 + 4 * dim_count + key_len
            if size - pos < need:
                raise FormatError(f"{path}: truncated record header at byte {pos}")
            dims = struct.unpack(f"<{dim_count}i", f.read(4 * dim_count))
            if any(d <= 0 or d > 1 << 31 for d in dims):
                raise FormatError(f"{path}: record at byte {pos} has invalid dims {dims}")
            try:
                name = f.read(key_len).decode("utf-8")
            except UnicodeDecodeError:
                raise FormatError(f"{path}: record at byte {pos} has a key that is not UTF-8") from None
            if name in seen:
                raise FormatError(f"{path}: tensor '{name}' appears twice")
            seen.add(name)
            n = 1
            for d in dims:
                n *= d
            nbytes = _nbytes(rtype, n, name, path)
            off = pos + need
            if off + nbytes > size:
                raise FormatError(f"{path}: tensor '{name}' needs {nbytes} bytes at byte {off}, the file has {size - off}: truncated")
            records.append(Record(name, rtype, tuple(reversed(dims)), off, nbytes))
            pos = off + nbytes
    if not records:
        raise FormatError(f"{path}: rwkv.cpp header but no tensors")
    return header, records


def cpp_version(names) -> str:
    """rwkv.cpp's own version decision (python/convert_pytorch_to_ggml.py), from key names."""
    names = set(names)
    if "blocks.0.att.x_rwkvag" in names or "blocks.0.att.k_k" in names:
        return "7"
    if "blocks.0.att.time_maa_x" in names:
        return "6"
    if "blocks.0.att.ln_x.weight" in names:
        return "5"
    return "4"


class _Raw:
    def __init__(self, path: str):
        self.path = path
        self._f = open(path, "rb")
        self._mm = mmap.mmap(self._f.fileno(), 0, access=mmap.ACCESS_READ)

    def tensor(self, r: Record) -> torch.Tensor:
        buf = np.frombuffer(self._mm, dtype=np.uint8, count=r.nbytes, offset=r.offset)
        n = r.nbytes
        if r.dtype == 0:
            arr = buf.view(np.float32).copy()
        elif r.dtype == 1:
            arr = buf.view(np.float16).copy()
        else:
            n = 1
            for d in r.shape:
                n *= d
            arr = ggml_quants.dequantize(TYPE_NAMES[r.dtype], buf, n)
        return torch.from_numpy(arr).reshape(r.shape)


def read_rwkvcpp(path: str, raw: bool = False) -> Checkpoint:
    """Read an rwkv.cpp file. With ``raw=True`` return its tensors exactly as stored (torch-order
    shapes, dequantized), without undoing rwkv.cpp's transforms."""
    header, records = scan(path)
    src = _Raw(path)
    by_name = {r.name: r for r in records}
    version = cpp_version(by_name)
    manifest = default_manifest()
    manifest["source_format"] = {"format": "rwkvcpp", **header,
                                 "tensor_types": sorted({TYPE_NAMES[r.dtype] for r in records})}
    if raw:
        return Checkpoint(LazyTensors(list(by_name), lambda k: src.tensor(by_name[k]),
                                      {k: r.shape for k, r in by_name.items()}), manifest, source=path)
    plan = _inverse_plan(version, by_name, header, path)
    if version == "5":
        manifest["notes"] = ["v5 time_decay recovered from rwkv.cpp's exp(-exp(td)) in float64 (lossy near decay 1)"]
    names = list(plan)
    shapes = {k: plan[k][1] for k in names}
    return Checkpoint(LazyTensors(names, lambda k: plan[k][0](src), shapes), manifest, source=path)


def _inverse_plan(version: str, recs: dict[str, Record], header: dict, path: str) -> dict:
    """name -> (loader(src) -> tensor, training-form shape)."""
    plan: dict = {}
    n_head = None
    if version in ("5", "6"):
        key = "blocks.0.att.time_decay"
        if key in recs:
            n_head = recs[key].shape[0]

    def plain(r: Record, shape=None, fn=None):
        shape = tuple(shape) if shape is not None else r.shape

        def load(src):
            t = src.tensor(r)
            if fn is not None:
                t = fn(t)
            return t.reshape(shape)
        return load, shape

    for name, r in recs.items():
        sh = r.shape
        last = name.rsplit(".", 1)[-1]
        is_time = ".time_" in name
        if version == "7" and last == "x_rwkvag":
            if sh[0] != 6:
                raise FormatError(f"{path}: '{name}' has shape {sh}, expected (6, 1, C)")
            prefix = name[: -len("x_rwkvag")]
            c = sh[-1]
            for i, m in enumerate(V7_MIX):
                plan[prefix + m] = (lambda src, r=r, i=i, c=c: src.tensor(r).reshape(6, c)[i].reshape(1, 1, c).clone(), (1, 1, c))
            continue
        if version == "7" and last in V7_LORA and ".att." in name:
            plan[name] = plain(r, (sh[1], sh[0]), lambda t: t.t().contiguous())
            continue
        if version == "6" and last in ("time_maa_w1", "time_decay_w1", "time_decay_w2"):
            plan[name] = plain(r, (sh[1], sh[0]), lambda t: t.t().contiguous())
            continue
        if version == "6" and last == "time_maa_w2":
            plan[name] = plain(r, (sh[0], sh[2], sh[1]), lambda t: t.transpose(1, 2).contiguous())
            continue
        if is_time:
            n = 1
            for d in sh:
                n *= d
            if last.startswith("time_mix") or last.startswith("time_maa"):
                plan[name] = plain(r, (1, 1, n))
            elif version == "4" and last == "time_decay":
                plan[name] = plain(r, (n,), lambda t: torch.log(-t.double()).to(t.dtype))
            elif version == "4":
                plan[name] = plain(r, (n,))
            elif version == "5" and last == "time_decay":
                shape = (sh[0],) if (len(sh) == 1 or sh[1] == 1) else (sh[0], sh[1])
                plan[name] = plain(r, shape, _v5_decay_inverse)
            elif version == "5" and last == "time_first":
                plan[name] = plain(r, (sh[0],), lambda t: torch.log(t.double()).to(t.dtype))
            elif last == "time_faaaa":
                h = sh[0]
                plan[name] = plain(r, (h, n // h))
            elif version == "6" and last == "time_decay":
                plan[name] = plain(r, (1, 1, n))
            else:
                plan[name] = plain(r)
            continue
        plan[name] = plain(r)
    return plan


def _v5_decay_inverse(w: torch.Tensor) -> torch.Tensor:
    """td = log(-log(w)) in float64; clamped so that w in {0, 1} stays finite."""
    wd = w.double().clamp(min=5e-324, max=1.0 - 2.0 ** -53)
    return torch.log(-torch.log(wd)).to(w.dtype)

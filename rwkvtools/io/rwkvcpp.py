"""rwkv.cpp ``.bin`` files (docs/FILE_FORMAT.md of rwkv.cpp).

Layout (little-endian int32, no padding): header ``magic 0x67676d66, version (100|101), n_vocab,
n_embed, n_layer, data_type``; then records ``dim_count (1..3), key_length, data_type,
dims[dim_count] (reversed w.r.t. torch), key bytes, data`` until EOF.

rwkv.cpp's converter stores some tensors pre-transformed for its RNN graph. The reader undoes
those transforms so the result is the BlinkDL training form (see docs/FORMS.md):
v4 ``time_decay = -exp(td)``; v5 ``time_decay = exp(-exp(td))``, ``time_first = exp(tf)`` (each
inverted to the float32 value the same float32 transform maps to the stored one, so a rewrite is
byte-identical; near decay 1 not the unique original); squeezed ``.time_`` vectors; v6/v7 LoRA
matrices transposed; v7 ``x_rwkvag`` concatenation. Every header field and size is bounds-checked
against the file before anything is allocated.

The writer (``write_rwkvcpp``) produces the bytes rwkv.cpp's converter (FP32/FP16) and quantizer
(Q4_0..Q8_0) write; API in docs/FORMS.md.
"""
from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass

import numpy as np
import torch

from ..checkpoint import Checkpoint, LazyTensors, default_manifest
from ..errors import FormatError
from ..transforms.rnn_form import invert_value
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
        manifest["notes"] = ["v5 time_decay recovered from rwkv.cpp's exp(-exp(td)): the float32 value that maps "
                             "back to the stored decay (exact for rewriting; near decay 1 not unique)"]
    names = list(plan)
    shapes = {k: plan[k][1] for k in names}
    # dtypes known without loading (a query loaded and dequantized the tensor): FP16 records load
    # as fp16 unless a value is recomputed (decays, bonuses: float32); FP32 and quantized as float32
    dtypes = {k: plan[k][2] for k in names}
    ck = Checkpoint(LazyTensors(names, lambda k: plan[k][0](src), shapes, dtypes), manifest, source=path)
    from ..spec import detect
    spec = detect(ck.tensors)
    said = {"n_vocab": spec.vocab, "n_embed": spec.n_embd, "n_layer": spec.n_layer}
    wrong = [f"{k} = {header[k]} (the tensors: {v})" for k, v in said.items() if header[k] != v]
    if wrong:  # rwkv.cpp sizes its model by the header: a file whose header disagrees does not load there
        raise FormatError(f"{path}: the header says {', '.join(wrong)}; a damaged or hand-edited file")
    return ck


def _loaded_dtype(r: Record, recomputed: bool = False) -> torch.dtype:
    """The dtype _Raw.tensor gives a record (FP16 stays fp16; FP32 and block types: float32), or
    float32 where the loader recomputes the value."""
    return torch.float16 if r.dtype == 1 and not recomputed else torch.float32


def _inverse_plan(version: str, recs: dict[str, Record], header: dict, path: str) -> dict:
    """name -> (loader(src) -> tensor, training-form shape, dtype it loads as)."""
    plan: dict = {}

    def plain(r: Record, shape=None, fn=None, recomputed: bool = False):
        shape = tuple(shape) if shape is not None else r.shape
        if math.prod(shape) != math.prod(r.shape):
            raise FormatError(f"{path}: tensor '{r.name}' has shape {r.shape}, which does not fit its "
                              f"training-form shape {shape}")

        def load(src):
            t = src.tensor(r)
            if fn is not None:
                t = fn(t)
            return t.reshape(shape)
        return load, shape, _loaded_dtype(r, recomputed)

    def dims(r: Record, n: int) -> tuple:
        if len(r.shape) != n:
            raise FormatError(f"{path}: tensor '{r.name}' has shape {r.shape}, expected {n} dimensions")
        return r.shape

    for name, r in recs.items():
        sh = r.shape
        last = name.rsplit(".", 1)[-1]
        is_time = ".time_" in name
        if version == "7" and last == "x_rwkvag":
            if sh[0] != 6 or math.prod(sh) != 6 * sh[-1]:
                raise FormatError(f"{path}: '{name}' has shape {sh}, expected (6, 1, C)")
            prefix = name[: -len("x_rwkvag")]
            c = sh[-1]
            for i, m in enumerate(V7_MIX):
                plan[prefix + m] = (lambda src, r=r, i=i, c=c: src.tensor(r).reshape(6, c)[i].reshape(1, 1, c).clone(),
                                    (1, 1, c), _loaded_dtype(r))
            continue
        if (version == "7" and last in V7_LORA and ".att." in name) or \
                (version == "6" and last in ("time_maa_w1", "time_decay_w1", "time_decay_w2")):
            a, b = dims(r, 2)
            plan[name] = plain(r, (b, a), lambda t: t.t().contiguous())
            continue
        if version == "6" and last == "time_maa_w2":
            a, b, c = dims(r, 3)
            plan[name] = plain(r, (a, c, b), lambda t: t.transpose(1, 2).contiguous())
            continue
        if is_time:
            n = 1
            for d in sh:
                n *= d
            if last.startswith("time_mix") or last.startswith("time_maa"):
                plan[name] = plain(r, (1, 1, n))
            elif version == "4" and last == "time_decay":
                plan[name] = plain(r, (n,), lambda t: invert_value("neg_exp", t)[0], recomputed=True)
            elif version == "4":
                plan[name] = plain(r, (n,))
            elif version == "5" and last == "time_decay":
                shape = (sh[0],) if (len(sh) == 1 or sh[1] == 1) else (sh[0], sh[1])
                plan[name] = plain(r, shape, lambda t: invert_value("exp_neg_exp", t)[0], recomputed=True)
            elif version == "5" and last == "time_first":
                plan[name] = plain(r, (sh[0],), lambda t: invert_value("exp", t)[0], recomputed=True)
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



# ============================================================================ writer
# rwkv.cpp's quantizer (rwkv_quantize.inc) leaves these alone even when they are 2-D
_NO_QUANT_SUBSTR = ("att.v1", "att.v2", "att.g1", "att.g2", "att.a1", "att.a2", "att.w1", "att.w2", "att.r_k")
# rwkv.cpp's converter keeps these in FP32 in an FP16 file (besides every 1-D tensor)
_FP32_SUBSTR = (".time_", ".k_k", ".k_a", ".r_k", ".x_rwkvag", ".x_k", ".w0", ".a0", ".v0")
DATA_TYPES = ("FP32", "FP16") + tuple(ggml_quants.BLOCK_TYPES)


def needs_quant(name: str, ndim: int) -> bool:
    """rwkv.cpp's quantizer rule: 2-D tensors (in the file's layout) except emb/head and the
    v7 LoRA / r_k tensors."""
    return ndim == 2 and name not in ("emb.weight", "head.weight") and not any(s in name for s in _NO_QUANT_SUBSTR)


def fp16_eligible(name: str, ndim: int) -> bool:
    return ndim > 1 and not any(s in name for s in _FP32_SUBSTR)


def _data_type(name: str) -> str:
    key = str(name).upper().replace("FLOAT32", "FP32").replace("FLOAT16", "FP16")
    if key not in DATA_TYPES:
        raise FormatError(f"rwkv.cpp data type '{name}' is not supported; choose one of {', '.join(DATA_TYPES)}")
    return key


def file_records(ckpt: Checkpoint):
    """The records rwkv.cpp's converter would write for a training-form checkpoint, in order:
    yields (name, producer) where producer() returns the float32 tensor in the file's layout
    (decays transformed, vectors squeezed, LoRA transposed, v7 x_* concatenated)."""
    from ..spec import detect
    t = ckpt.tensors
    spec = detect(t)
    v = spec.major
    H = spec.n_head
    names = list(t)
    done_mix: set[int] = set()
    for name in names:
        last = name.rsplit(".", 1)[-1]
        if v == 7 and ".att.x_" in name and last in V7_MIX:
            layer = int(name.split(".")[1])
            if layer in done_mix:
                continue
            done_mix.add(layer)
            pre = f"blocks.{layer}.att."

            def mix(pre=pre):
                parts = [t[pre + m].float().reshape(1, 1, -1) for m in V7_MIX]
                return torch.cat(parts, 0)
            yield pre + "x_rwkvag", mix
            continue
        yield name, (lambda name=name, last=last: _file_tensor(t[name].float(), name, last, v, spec, H))


def _file_tensor(x: torch.Tensor, name: str, last: str, v: int, spec, H: int) -> torch.Tensor:
    from ..transforms.rnn_form import forward_value
    is_time = ".time_" in name
    if is_time:
        n = x.numel()
        x = x.reshape(-1) if n == 1 else x.squeeze()
    if v == 7:
        if ".att." in name and last in V7_LORA:
            x = x.t()
    elif v == 6:
        if last == "time_faaaa":
            x = x.reshape(H, -1, 1)
        elif last in ("time_maa_w1", "time_decay_w1", "time_decay_w2"):
            x = x.t()
        elif last == "time_maa_w2":
            x = x.transpose(1, 2)
        elif last == "time_decay":
            x = x.reshape(H, -1, 1)
    elif v == 5:
        if last == "time_decay":
            x = forward_value("exp_neg_exp", x)
            # (H, N, 1) per head (a single head too: squeezing left (N, 1), read back as v5.1's per-channel decay)
            x = x.reshape(H, -1, 1) if spec.version == "5.2" else x.reshape(-1, 1, 1)
        elif last == "time_first":
            x = forward_value("exp", x).reshape(-1, 1, 1)
        elif last == "time_faaaa":
            x = x.reshape(H, -1, 1)
    elif last == "time_decay":
        x = forward_value("neg_exp", x)
    return x.contiguous()


def layout_refusal(spec) -> str | None:
    """Why rwkv.cpp cannot load this RWKV layout (None: it can, v4 to v7 but v5.1 and some v5)."""
    if spec.version == "5.1":
        return ("rwkv.cpp cannot load the RWKV 5.1 layout (gate with per-head decay); "
                "write .safetensors or .pth instead")
    if spec.version == "5.0" and spec.bonus != "time_first":
        return ("rwkv.cpp's v5 without gate ('5.1' there) needs 'time_first'; this checkpoint has "
                "'time_faaaa'; write .safetensors or .pth instead")
    if spec.version == "5.2" and spec.bonus != "time_faaaa":
        return "rwkv.cpp's v5.2 needs 'time_faaaa'; this checkpoint has 'time_first'"
    return None


def check_writable(ckpt: Checkpoint):
    """Refuse (FormatError) a training-form checkpoint rwkv.cpp cannot load; returns its spec."""
    from ..spec import detect, layout, linear_prefixes
    t = ckpt.tensors
    spec = detect(t)
    why = layout_refusal(spec)
    if why:
        raise FormatError(why)
    lay = layout(spec)
    for p in linear_prefixes(spec):
        if f"{p}.weight" not in t:
            from ..transforms.lowrank import merge_hint
            if f"{p}.weight_u" in t:
                way = f"merge the low-rank factors first ({merge_hint(t)})"
            elif f"{p}.weight_int8" in t or f"{p}.weight_int4" in t:
                way = ("quantize the dense original straight to rwkv.cpp (rwkvtools quantize DENSE OUT.bin "
                       "--scheme Q5_1), or write .gguf (dequantized)")
            else:
                way = "start from a dense checkpoint"
            raise FormatError(f"rwkv.cpp needs dense matrices, but '{p}' is stored in another representation "
                              f"({', '.join(k for k in t if k.startswith(p + '.'))}); rwkv.cpp's loader only knows "
                              f"dense tensors: {way}, or keep this checkpoint in .safetensors")
    unknown = [k for k in t if k not in lay]
    if unknown:
        raise FormatError(f"rwkv.cpp's loader does not know {len(unknown)} tensor(s) of this checkpoint, e.g. "
                          f"{', '.join(unknown[:5])}; write .safetensors instead")
    missing = [k for k, (_, req) in lay.items() if req and k not in t]
    if missing:
        raise FormatError(f"checkpoint lacks {len(missing)} tensor(s) rwkv.cpp needs, e.g. {', '.join(missing[:5])}")
    return spec


def source_data_type(ckpt: Checkpoint) -> str:
    """The rwkv.cpp data type that keeps ``ckpt``'s matrices as they are: FP16 when every 2-D
    weight is fp16, else FP32 (an fp16 model is not widened to FP32, doubling the file)."""
    mats = [k for k in ckpt.tensors if k.endswith(".weight") and len(ckpt.shape(k)) == 2]
    return "FP16" if mats and all(ckpt.dtype(k) == torch.float16 for k in mats) else "FP32"


def write_rwkvcpp(ckpt: Checkpoint, path: str, data_type: str | None = None,
                  blocks: dict | None = None, base_type: str | None = None,
                  version: int | None = None, progress: bool | None = None) -> None:
    """Write an rwkv.cpp ``.bin`` with the bytes rwkv.cpp's own tools write.

    * ``data_type`` "FP32" / "FP16": as python/convert_pytorch_to_ggml.py (same record order as the
      checkpoint's tensors, same transforms, same FP32 exceptions in FP16 files).
    * a block type ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"): as rwkv.cpp's quantizer applied to the
      ``base_type`` file ("FP32" default, or "FP16"): 2-D tensors except emb/head and v7 LoRA/r_k
      are quantized with ggml's reference quantizer; the others keep the base type.
    * ``blocks``: optional {name: (type name, uint8 block bytes)} for tensors the quantizer would
      quantize, written as given (e.g. GPTQ results). Names are file names (BlinkDL names); the
      bytes are in the file's layout (rows = the stored tensor's rows; v6 ``time_maa_w1``,
      ``time_decay_w1/w2`` are stored transposed).
    * ``version``: file version; default 101, or the version of the rwkv.cpp file the checkpoint
      was read from (so reading and writing a file again gives the same bytes). Quantized files
      are always 101.
    The checkpoint may be in either form (an RNN-form checkpoint is brought back first). Written
    tensor by tensor to a temporary file renamed at the end (peak memory ~ one tensor)."""
    import sys

    from ..transforms import prepare_for_model
    from .atomic import atomic_path

    dt = _data_type(data_type or source_data_type(ckpt))  # default: the matrices' own (fp16 stays FP16)
    base = "FP16" if dt == "FP16" else _data_type(base_type or "FP32")
    if base not in ("FP32", "FP16"):
        raise FormatError(f"base_type must be FP32 or FP16, got {base_type}")
    ckpt = prepare_for_model(ckpt)
    spec = check_writable(ckpt)
    blocks = dict(blocks or {})
    quantized = dt in ggml_quants.BLOCK_TYPES or bool(blocks)
    if version is None:
        sf = ckpt.manifest.get("source_format") or {}
        version = sf.get("version", 101) if sf.get("format") == "rwkvcpp" else 101
    if version not in (100, 101):
        raise FormatError(f"rwkv.cpp file version must be 100 or 101, got {version}")
    if quantized:
        version = 101
    records = list(file_records(ckpt))
    file_names = {n for n, _ in records}
    stray = sorted(set(blocks) - file_names)
    if stray:
        raise FormatError(f"blocks given for tensor(s) not in the file: {', '.join(stray[:5])}")
    bar = None
    if progress or (progress is None and sys.stderr.isatty() and len(records) > 200):
        try:
            from tqdm import tqdm
            bar = tqdm(total=len(records), unit="tensor", file=sys.stderr, desc="rwkv.cpp", leave=False)
        except ImportError:  # pragma: no cover
            bar = None
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<6i", MAGIC, version, spec.vocab, spec.n_embd, spec.n_layer, TYPE_IDS[dt]))
            for name, make in records:
                x = make()
                shape = tuple(x.shape)
                if name in blocks:
                    rtype, payload = _given_blocks(name, shape, blocks[name])
                elif dt in ggml_quants.BLOCK_TYPES and needs_quant(name, x.dim()):
                    if shape[-1] % ggml_quants.QK:
                        raise FormatError(f"cannot quantize '{name}' to {dt}: its rows have {shape[-1]} values, "
                                          f"not a multiple of {ggml_quants.QK} (rwkv.cpp's requirement)")
                    # rwkv.cpp quantizes each record from its stored values: FP16 base files keep
                    # some 2-D tensors (v6 time_maa_w1, time_decay_w1/w2) in FP32
                    vals = x.half().float() if base == "FP16" and fp16_eligible(name, x.dim()) else x
                    rtype, payload = dt, ggml_quants.quantize(dt, vals.numpy())
                elif base == "FP16" and fp16_eligible(name, x.dim()):
                    rtype, payload = "FP16", x.half().numpy()
                else:
                    rtype, payload = "FP32", x.numpy()
                key = name.encode("utf-8")
                f.write(struct.pack("<3i", len(shape), len(key), TYPE_IDS[rtype]))
                f.write(struct.pack(f"<{len(shape)}i", *reversed(shape)))
                f.write(key)
                f.write(memoryview(np.ascontiguousarray(payload)).cast("B"))
                del x, payload
                if bar is not None:
                    bar.update(1)
    if bar is not None:
        bar.close()


def _given_blocks(name: str, shape: tuple, given) -> tuple[str, np.ndarray]:
    try:
        qtype, payload = given
    except (TypeError, ValueError):
        raise FormatError(f"blocks['{name}'] must be a (type name, uint8 array) pair") from None
    qtype = str(qtype).upper()
    if qtype not in ggml_quants.BLOCK_TYPES:
        raise FormatError(f"blocks['{name}']: unknown block type '{qtype}'; known: {', '.join(ggml_quants.BLOCK_TYPES)}")
    if not needs_quant(name, len(shape)):
        raise FormatError(f"blocks['{name}']: rwkv.cpp does not quantize this tensor (shape {shape})")
    if shape[-1] % ggml_quants.QK:
        raise FormatError(f"blocks['{name}']: rows of {shape[-1]} values are not a multiple of {ggml_quants.QK}")
    arr = np.ascontiguousarray(payload)
    if arr.dtype != np.uint8:
        raise FormatError(f"blocks['{name}'] must be uint8 bytes, got {arr.dtype}")
    n = math.prod(shape)
    need = n // ggml_quants.QK * ggml_quants.block_bytes(qtype)
    if arr.size != need:
        raise FormatError(f"blocks['{name}']: {qtype} for shape {shape} needs {need} bytes, got {arr.size}")
    return qtype, arr.reshape(-1)

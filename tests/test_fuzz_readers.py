"""Fuzzing every checkpoint reader with corrupt files: for a small valid file of each format (made
from a random-weight model by the project's own writers), many deterministic corruptions
(truncations, byte flips in the headers, size / count / offset / dims fields overwritten with huge
or negative values, garbage JSON, pickles that name disallowed globals). Each must either load or
raise an RwkvToolsError; any other exception, an allocation beyond a sane bound (the address space
is limited while reading) or a hang is a defect. A sample also goes through ``rwkvtools inspect``
(exit code 2, no traceback, no 'internal error'). Then one regression test per defect the fuzzing
found."""
from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import pickletools
import random
import signal
import struct
import traceback
import zipfile

import pytest
import torch
from click.testing import CliRunner

from rwkvtools.errors import FormatError, RwkvToolsError
from rwkvtools.io import read_checkpoint

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")]  # corrupt pickles

# =============================================================================== valid files
KINDS = ("pth", "pth-legacy", "pth-rnn", "safetensors", "hf", "hf-bin", "rwkvcpp", "rwkvcpp-v6",
         "rwkvcpp-q", "gguf", "gguf-v6", "int4", "int8", "recursive")
EXT = {"pth": ".pth", "pth-legacy": ".pth", "pth-rnn": ".pth", "safetensors": ".safetensors",
       "rwkvcpp": ".bin", "rwkvcpp-v6": ".bin", "rwkvcpp-q": ".bin", "gguf": ".gguf", "gguf-v6": ".gguf",
       "int4": ".safetensors", "int8": ".safetensors", "recursive": ".safetensors"}
DEEP = ("int4", "int8", "recursive")  # also build the model: its quantized / shared linears read tensors


def _ck(version, vocab=64, n_layer=1, seed=1):
    from rwkvtools.random_init import random_checkpoint
    return random_checkpoint(version, n_layer=n_layer, n_embd=32, head_size=16, vocab=vocab, seed=seed)


def _written(ck, fmt, tmp, name, **opts):
    """The bytes (a file) or {file name: bytes} (a folder) the project's writer produces."""
    from rwkvtools.io.writers import write_checkpoint
    p = os.path.join(tmp, name)
    write_checkpoint(ck, p, fmt, **opts)
    if os.path.isdir(p):
        return {f: open(os.path.join(p, f), "rb").read() for f in sorted(os.listdir(p))}
    return open(p, "rb").read()


@functools.lru_cache(maxsize=None)
def valid(kind: str):
    """A small valid file (bytes) or Hugging Face folder ({name: bytes}) of ``kind``."""
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        if kind == "pth":
            return _written(_ck("7"), "pth", tmp, "m.pth")
        if kind == "pth-legacy":  # the pre-zip torch.save format: a sequence of pickles
            buf = io.BytesIO()
            torch.save(dict(_ck("4").tensors), buf, _use_new_zipfile_serialization=False)
            return buf.getvalue()
        if kind == "pth-rnn":  # carries its manifest as a JSON tensor
            from rwkvtools.transforms.rnn_form import to_rnn
            return _written(to_rnn(_ck("5.2")), "pth", tmp, "m.pth")
        if kind == "safetensors":
            return _written(_ck("6"), "safetensors", tmp, "m.safetensors")
        if kind == "hf":
            return _written(_ck("7"), "hf", tmp, "hf")
        if kind == "hf-bin":  # config.json + pytorch_model.bin
            from safetensors.torch import load
            files = _written(_ck("4"), "hf", tmp, "hf")
            buf = io.BytesIO()
            torch.save(load(files.pop("model.safetensors")), buf)
            return {**files, "pytorch_model.bin": buf.getvalue()}
        if kind == "rwkvcpp":
            return _written(_ck("7"), "rwkvcpp", tmp, "m.bin")
        if kind == "rwkvcpp-v6":
            return _written(_ck("6"), "rwkvcpp", tmp, "m.bin", data_type="FP16")
        if kind == "rwkvcpp-q":
            return _written(_ck("5.2"), "rwkvcpp", tmp, "m.bin", data_type="Q5_1")
        if kind == "gguf":
            return _written(_ck("7", vocab=256), "gguf", tmp, "m.gguf", quant="Q8_0")
        if kind == "gguf-v6":
            return _written(_ck("6"), "gguf", tmp, "m.gguf", tokenizer="none")
        if kind in ("int4", "int8"):
            from rwkvtools.transforms.quantize import QuantizeConfig, quantize
            cfg = QuantizeConfig("int4", group_size=32) if kind == "int4" else QuantizeConfig("int8")
            ck = quantize(_ck("5.2" if kind == "int4" else "7"), cfg)
            return _written(ck, "safetensors", tmp, "q.safetensors")
        if kind == "recursive":
            from rwkvtools.transforms.recursive import RecursiveConfig, recursive
            rec = recursive(_ck("7", n_layer=2), RecursiveConfig(blocks=1, lora_rank=2, share="all"))
            return _written(rec, "safetensors", tmp, "r.safetensors")
    raise KeyError(kind)


# =============================================================================== file layouts
# (offset, struct format) of the integer fields of each binary layout, and the byte ranges that
# hold headers (where flips hit structure rather than tensor values)
def _st_header_end(raw: bytes) -> int:
    return 8 + struct.unpack_from("<Q", raw, 0)[0]


def _st_fields(raw: bytes):
    return [(0, "<Q")], [(0, min(len(raw), _st_header_end(raw)))]


_QBYTES = {2: 18, 3: 20, 7: 22, 8: 24, 9: 34}  # bytes per block of 32 values, by rwkv.cpp type id


def _cpp_records(raw: bytes):
    """(position, dims, key length, name) of each record of a valid rwkv.cpp file."""
    out, pos = [], 24
    while pos + 12 <= len(raw):
        nd, kl, t = struct.unpack_from("<3i", raw, pos)
        dims = list(struct.unpack_from(f"<{nd}i", raw, pos + 12))
        name = raw[pos + 12 + 4 * nd:pos + 12 + 4 * nd + kl].decode()
        out.append((pos, dims, kl, name))
        n = 1
        for d in dims:
            n *= d
        pos += 12 + 4 * nd + kl + {0: 4 * n, 1: 2 * n}.get(t, n // 32 * _QBYTES.get(t, 0))
    return out


def _cpp_redim(raw: bytes, name: str, dims: list[int]) -> bytes:
    """``raw`` with the record ``name`` given ``dims`` (ggml order; same number of values)."""
    pos, old, _, _ = next(r for r in _cpp_records(raw) if r[3] == name)
    rec = struct.pack("<i", len(dims)) + raw[pos + 4:pos + 12] + struct.pack(f"<{len(dims)}i", *dims)
    return raw[:pos] + rec + raw[pos + 12 + 4 * len(old):]


def _cpp_fields(raw: bytes):
    fields = [(4 * i, "<i") for i in range(6)]
    spans = [(0, 24)]
    for pos, dims, kl, _ in _cpp_records(raw):
        nd = len(dims)
        fields += [(pos + 4 * i, "<i") for i in range(3 + nd)]  # dim count, key length, type, dims
        spans.append((pos, pos + 12 + 4 * nd + kl))
    return fields, spans


def _gguf_fields(raw: bytes, ne_positions: bool = False):
    """Integer fields and header span; or (``ne_positions``) the offsets of each tensor's dims."""
    infos = []
    fields = [(4, "<I"), (8, "<Q"), (16, "<Q")]
    n_tensors, n_kv = struct.unpack_from("<QQ", raw, 8)
    p = 24
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

    def value(p, vt, top):
        if vt in sizes:
            if top and sizes[vt] >= 4:
                fields.append((p, {4: "<I", 8: "<Q"}[sizes[vt]]))
            return p + sizes[vt]
        if vt == 8:
            if top:
                fields.append((p, "<Q"))
            return p + 8 + struct.unpack_from("<Q", raw, p)[0]
        et, cnt = struct.unpack_from("<IQ", raw, p)
        fields.extend([(p, "<I"), (p + 4, "<Q")])
        p += 12
        for j in range(cnt):
            p = value(p, et, top and j < 2)
        return p

    for _ in range(n_kv):
        fields.append((p, "<Q"))
        p += 8 + struct.unpack_from("<Q", raw, p)[0]
        fields.append((p, "<I"))
        vt = struct.unpack_from("<I", raw, p)[0]
        p = value(p + 4, vt, True)
    for _ in range(n_tensors):
        fields.append((p, "<Q"))
        p += 8 + struct.unpack_from("<Q", raw, p)[0]
        nd = struct.unpack_from("<I", raw, p)[0]
        fields.append((p, "<I"))
        fields.extend((p + 4 + 8 * i, "<Q") for i in range(nd))
        infos.append([p + 4 + 8 * i for i in range(nd)])
        p += 4 + 8 * nd
        fields.extend([(p, "<I"), (p + 4, "<Q")])
        p += 12
    return infos if ne_positions else (fields, [(0, p)])


def _zip_fields(raw: bytes):
    """Local headers, the pickle and the central directory of a torch zip."""
    z = zipfile.ZipFile(io.BytesIO(raw))
    spans, fields = [], []
    for info in z.infolist():
        start = info.header_offset
        n, extra = struct.unpack_from("<HH", raw, start + 26)
        data = start + 30 + n + extra
        spans.append((start, data))
        fields += [(start + 18, "<I"), (start + 22, "<I"), (start + 26, "<H"), (start + 28, "<H")]
        if info.filename.endswith("data.pkl"):
            spans.append((data, data + info.file_size))
    cd = raw.find(b"PK\x01\x02")
    spans.append((cd, len(raw)))
    while cd >= 0:  # central directory entries: sizes, name length, local header offset
        fields += [(cd + 20, "<I"), (cd + 24, "<I"), (cd + 28, "<H"), (cd + 42, "<I")]
        cd = raw.find(b"PK\x01\x02", cd + 4)
    eocd = raw.rfind(b"PK\x05\x06")
    if eocd >= 0:
        fields += [(eocd + 8, "<H"), (eocd + 10, "<H"), (eocd + 12, "<I"), (eocd + 16, "<I")]
    return fields, spans


def _layout(kind: str, raw: bytes):
    if kind in ("safetensors", "int4", "int8", "recursive"):
        return _st_fields(raw)
    if kind.startswith("rwkvcpp"):
        return _cpp_fields(raw)
    if kind.startswith("gguf"):
        return _gguf_fields(raw)
    if raw[:4] == b"PK\x03\x04":
        return _zip_fields(raw)
    return [], [(0, min(len(raw), 4096))]  # legacy pickle: the pickles come first


# =============================================================================== mutations
_LIMITS = {"<i": (-2**31, 2**31 - 1), "<I": (0, 2**32 - 1), "<H": (0, 2**16 - 1), "<Q": (0, 2**64 - 1)}


def _int_values(fmt: str, v: int, rng: random.Random) -> list[int]:
    lo, hi = _LIMITS[fmt]
    cands = [lo, hi, 0, 1, -1, v + 1, v - 1, v * 1024, hi // 2 + 1, 1 << 30, 1 << 40, 1 << 62,
             rng.randint(lo, hi)]
    return [c for c in cands if lo <= c <= hi and c != v]


def _flip(raw: bytes, positions, rng: random.Random) -> bytes:
    b = bytearray(raw)
    for p in positions:
        b[p] ^= rng.randint(1, 255)
    return bytes(b)


def byte_mutations(kind: str, raw: bytes, rng: random.Random, n: int):
    """``n`` (label, bytes) corruptions of a binary file: truncations (inside the headers and
    anywhere), single and multi-byte flips in header regions, integer fields overwritten."""
    fields, spans = _layout(kind, raw)
    head = [p for a, b in spans for p in range(a, min(b, len(raw)))] or list(range(len(raw)))
    out = []
    hdr_end = max(b for a, b in spans) if spans else len(raw)
    for _ in range(n):
        r = rng.random()
        if r < 0.2:
            cut = rng.randrange(0, hdr_end + 1) if rng.random() < 0.7 else rng.randrange(0, len(raw))
            out.append((f"truncate at {cut}", raw[:cut]))
        elif r < 0.45:
            p = rng.choice(head)
            out.append((f"flip byte {p}", _flip(raw, [p], rng)))
        elif r < 0.6:
            ps = sorted(rng.sample(head, min(len(head), rng.randint(2, 8))))
            out.append((f"flip bytes {ps}", _flip(raw, ps, rng)))
        elif r < 0.65:
            p = rng.randrange(len(raw))
            out.append((f"flip data byte {p}", _flip(raw, [p], rng)))
        elif fields:
            at, fmt = rng.choice(fields)
            (v,) = struct.unpack_from(fmt, raw, at)
            new = rng.choice(_int_values(fmt, v, rng))
            b = bytearray(raw)
            struct.pack_into(fmt, b, at, new)
            out.append((f"field at {at} {fmt} {v} -> {new}", bytes(b)))
        else:
            p = rng.choice(head)
            out.append((f"byte {p} -> 0xff", raw[:p] + b"\xff" + raw[p + 1:]))
    return out


# ---- safetensors headers as JSON
_HUGE = [2**31, 2**63, 2**64 + 5, 10**30, -1, -2**63]


def _st_parts(raw: bytes):
    n = struct.unpack_from("<Q", raw, 0)[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _st_join(header, data: bytes, text: bytes | None = None) -> bytes:
    blob = text if text is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + data


def _manifest_garbage(rng: random.Random) -> str:
    return rng.choice(['{"form": "rnn"', "[1, 2]", '"text"', "7", "null", '{"history": 5}',
                       '{"history": [5, "x", null]}', '{"history": [{"options": 3}]}', '{"form": 7}',
                       '{"form": "rnn"}', '{"form": "rnn", "rnn": 5}', '{"quantized": [1]}',
                       '{"format_version": "x", "history": [{"transform": 5, "options": {"a": [1]}}]}',
                       "[" * 100_000 + "]" * 100_000, '{"a": ' * 50_000 + "1" + "}" * 50_000])


def json_mutations(raw: bytes, rng: random.Random, n: int):
    """Corruptions of a safetensors header at the JSON level: shapes, offsets and dtypes replaced
    by huge, negative or ill-typed values; entries removed or replaced; garbage metadata; a header
    that is not JSON, not UTF-8, not an object or nested absurdly deep."""
    header, data = _st_parts(raw)
    names = [k for k in header if k != "__metadata__"]
    out = []
    for _ in range(n):
        h = json.loads(json.dumps(header))
        k = rng.choice(names)
        r = rng.randrange(13)
        if r == 0:
            sh = h[k]["shape"]
            h[k]["shape"] = rng.choice([[rng.choice(_HUGE)], [-1, 4], [0], ["a"], 5, None, [1.5, 2], [],
                                        sh + [rng.choice(_HUGE)], sh[::-1] + [1], [2**32, 2**32]])
            label = f"shape of {k} -> {h[k]['shape']}"
        elif r == 1:
            b, e = h[k]["data_offsets"]
            h[k]["data_offsets"] = rng.choice([[0, rng.choice(_HUGE)], [-5, e], [e, b], ["x", e],
                                               [b + 0.5, e], [b], [b, e, 1], None, {"a": 1},
                                               [b, 2**64 + 1], [b, e - 1], [b + 4, e + 4]])
            label = f"data_offsets of {k} -> {h[k]['data_offsets']}"
        elif r == 2:
            h[k]["dtype"] = rng.choice(["F64", "I8", "BOOL", "Q4", "", 5, None, "F8_E4M3", "U64", "C64"])
            label = f"dtype of {k} -> {h[k]['dtype']}"
        elif r == 3:
            del h[k][rng.choice(["dtype", "shape", "data_offsets"])]
            label = f"a field of {k} removed"
        elif r == 4:
            h[k] = rng.choice([[1, 2], "x", None, 5, {}])
            label = f"entry {k} -> {h[k]}"
        elif r == 5:
            h["__metadata__"] = rng.choice([[1], "x", 5, None, {"rwkvtools": 5}, {"a": {"b": 1}}])
            label = f"__metadata__ -> {h['__metadata__']}"
        elif r == 6:
            h.setdefault("__metadata__", {})["rwkvtools"] = _manifest_garbage(rng)
            label = f"manifest -> {h['__metadata__']['rwkvtools'][:40]}"
        elif r == 7:
            text = rng.choice([b"", b"{", b"[]", b"null", b"1", b'"x"', b"\xff\xfe{}", b"{\"a\": \xc3}",
                               b"[" * 200_000, b"{" * 10, json.dumps(header).encode()[:-3],
                               bytes(rng.randrange(256) for _ in range(64))])
            out.append((f"header text -> {text[:30]!r}", _st_join(None, data, text)))
            continue
        elif r == 8:
            new = rng.choice(["blocks.99.att.key.weight", "blocks.x.ffn.key.weight", "shared.map", "a" * 5000,
                              "blocks.0.att.key.weight.shape", "blocks.0.ffn.key.shape", "\u00e9\u0000"])
            h[new] = h.pop(k)
            label = f"{k} renamed {new[:40]}"
        elif r == 9:
            src = rng.choice(names)
            h[k]["shape"], h[k]["dtype"] = h[src]["shape"], h[src]["dtype"]
            label = f"{k} given the shape and dtype of {src}"
        elif r == 10:  # a shape with the same number of bytes, other dims
            sh = h[k]["shape"]
            n_el = 1
            for d in sh:
                n_el *= d
            h[k]["shape"] = rng.choice([[n_el], [1, n_el], [n_el, 1], [1, 1, n_el], [0] + sh])
            label = f"{k} reshaped {sh} -> {h[k]['shape']}"
        elif r == 11:
            h[k]["dtype"], h[k]["shape"] = "F32", [1] * rng.randint(1, 12)
            b = h[k]["data_offsets"][0]
            h[k]["data_offsets"] = [b, b + 4]
            label = f"{k} -> a scalar of {len(h[k]['shape'])} dims"
        else:
            dup = json.dumps(header)[:-1] + ', "' + k + '": ' + json.dumps(h[k]) + "}"
            out.append((f"duplicate key {k}", _st_join(None, data, dup.encode())))
            continue
        out.append((label, _st_join(h, data)))
    return out


# ---- Hugging Face folders
def config_mutations(cfg: bytes, rng: random.Random, n: int):
    base = json.loads(cfg)
    out = []
    for _ in range(n):
        r = rng.randrange(4)
        if r == 0:
            text = rng.choice([b"", b"{", b"[]", b"null", b"\xff\xfe", b"[" * 100_000, b'{"a": ' * 20_000])
            out.append((f"config.json -> {text[:20]!r}", text))
            continue
        c = dict(base)
        key = rng.choice(["model_type", "architectures", "hidden_size", "num_hidden_layers", "vocab_size"])
        c[key] = rng.choice([5, None, "x", [1], {"a": 1}, 10**30, -1, 1.5, ["RWKV7ForCausalLM", 3], True])
        if r == 1:
            del c[key]
        out.append((f"config.json {key} -> {c.get(key, '(removed)')}", json.dumps(c).encode()))
    return out


def index_mutations(files: dict, rng: random.Random, n: int):
    """Index files (model.safetensors.index.json) with garbage weight maps."""
    names = ["head.weight"]
    if "model.safetensors" in files:
        names = list(_st_parts(files["model.safetensors"])[0])
    out = []
    for _ in range(n):
        k = rng.choice(names)
        bad = rng.choice(["../x", "/etc/passwd", "", ".", "missing.safetensors", 5, None, ["a"],
                          "config.json"])
        idx = rng.choice([{"weight_map": {k: bad}},
                          {"weight_map": rng.choice([[], "x", None, 5, {}])}, [], "x",
                          {"weight_map": {name: "model.safetensors" for name in names[:3]}},
                          {"weight_map": {"zzz": "model.safetensors"}}])
        out.append((f"index -> {str(idx)[:60]}", json.dumps(idx).encode()))
    return out


# ---- pickles inside a torch zip
_DISALLOWED = [("os", "system"), ("builtins", "eval"), ("subprocess", "check_output"), ("posix", "system"),
               ("torch.nn.modules.linear", "Linear"), ("builtins", "getattr"),
               ("numpy.core.multiarray", "_reconstruct"),
               ("torch", "load"), ("__main__", "Evil"), ("torch._utils", "no_such_function")]


def _rezip(raw: bytes, mutate, member: str = "data.pkl") -> bytes:
    """The torch zip ``raw`` with the record whose name ends in ``member`` replaced by
    ``mutate(its bytes)`` (the archive itself stays sound)."""
    z = zipfile.ZipFile(io.BytesIO(raw))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as o:
        for info in z.infolist():
            data = z.read(info.filename)
            o.writestr(info.filename, mutate(data) if info.filename.endswith(member) else data)
    return buf.getvalue()


def _global_op(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def pickle_mutations(raw: bytes, rng: random.Random, n: int):
    """Corruptions of the pickle inside a torch zip (rezipped so the archive itself is sound):
    a global swapped for a disallowed one, integer arguments (storage sizes, shapes, strides,
    offsets) made huge or negative, byte flips and truncation of the pickle, a storage record cut."""
    z = zipfile.ZipFile(io.BytesIO(raw))
    pkl_name = next(i.filename for i in z.infolist() if i.filename.endswith("data.pkl"))
    pkl = z.read(pkl_name)
    ops = list(pickletools.genops(pkl))
    globs = [(pos, arg) for op, arg, pos in ops if op.name == "GLOBAL"]
    ints = _int_ops(pkl)
    storages = [i.filename for i in z.infolist() if "/data/" in i.filename]
    out = []
    for _ in range(n):
        r = rng.randrange(5)
        if r == 0:
            pos, arg = rng.choice(globs)
            mod, name = rng.choice(_DISALLOWED)
            old = _global_op(*arg.split(" ", 1))
            new = pkl[:pos] + _global_op(mod, name) + pkl[pos + len(old):]
            out.append((f"global {arg} -> {mod}.{name}", _rezip(raw, lambda _, new=new: new)))
        elif r == 1:
            op = rng.choice(ints)
            big = rng.choice([2**31 - 1, -1, -2**31, 2**30, 0, op[1] + 1, 2**40, 2**63 - 1, -2**63])
            new = _set_int(pkl, op, big)
            out.append((f"int {op[1]} at {op[2]} -> {big}", _rezip(raw, lambda _, new=new: new)))
        elif r == 2:
            ps = sorted(rng.sample(range(len(pkl)), rng.randint(1, 4)))
            new = _flip(pkl, ps, rng)
            out.append((f"pickle bytes {ps} flipped", _rezip(raw, lambda _, new=new: new)))
        elif r == 3:
            cut = rng.randrange(len(pkl))
            out.append((f"pickle cut at {cut}", _rezip(raw, lambda p, cut=cut: p[:cut])))
        else:
            member, cut = rng.choice(storages), rng.choice([0, 1, 3])
            cut_zip = _rezip(raw, lambda d, cut=cut: d[:cut], member)
            out.append((f"storage {member} cut to {cut} bytes", cut_zip))
    return out


def _reshapes(dims: list[int], rng: random.Random) -> list[int]:
    """Other dims with the same number of elements (the same bytes on disk)."""
    n = 1
    for d in dims:
        n *= d
    cands = [[n], [1, n], [n, 1], list(reversed(dims)), [1, 1, n], [n, 1, 1], dims + [1], [1] + dims]
    if len(dims) > 1:
        cands.append([dims[0] * dims[1]] + dims[2:])
    return rng.choice([c for c in cands if c != dims] or [[n]])


def dims_mutations(kind: str, raw: bytes, rng: random.Random, n: int):
    """A tensor of an rwkv.cpp or GGUF file given other dims with the same number of elements:
    in place when the dim count stays, else the record is rewritten (rwkv.cpp only)."""
    out = []
    if kind.startswith("rwkvcpp"):
        recs = _cpp_records(raw)
        for _ in range(n):
            pos, dims, _, name = rng.choice(recs)
            new = _reshapes(dims, rng)
            if len(new) > 3:
                new = [new[0] * new[1]] + new[2:]
            out.append((f"record {name} dims {dims} -> {new}", _cpp_redim(raw, name, new)))
        return out
    infos = _gguf_fields(raw, ne_positions=True)
    for _ in range(n):
        ne_at = rng.choice(infos)
        ne = [struct.unpack_from("<Q", raw, a)[0] for a in ne_at]
        n_el = 1
        for d in ne:
            n_el *= d
        cands = [c for c in (ne[::-1], [n_el] + [1] * (len(ne) - 1), [1] * (len(ne) - 1) + [n_el]) if c != ne]
        if not cands:
            continue
        new = rng.choice(cands)
        b = bytearray(raw)
        for a, v in zip(ne_at, new):
            struct.pack_into("<Q", b, a, v)
        out.append((f"tensor ne {ne} -> {new}", bytes(b)))
    return out


def _int_ops(pkl: bytes, start: int = 0, pickles: int = 1):
    """(opcode name, value, position) of the integer opcodes of ``pickles`` consecutive pickles."""
    f = io.BytesIO(pkl)
    f.seek(start)
    found = []
    for _ in range(pickles):
        found += [(op.name, arg, pos) for op, arg, pos in pickletools.genops(f)
                  if op.name in ("BININT", "BININT1", "BININT2", "LONG1")]
    return found


def _set_int(pkl: bytes, op: tuple, value: int) -> bytes:
    """Replace one integer opcode (BININT for 32-bit values, else LONG1 of 8 bytes)."""
    name, _, pos = op
    if -2**31 <= value < 2**31:
        enc = b"J" + struct.pack("<i", value)
    else:
        enc = b"\x8a\x08" + struct.pack("<q", value)
    width = {"BININT": 5, "BININT1": 2, "BININT2": 3}.get(name) or 2 + pkl[pos + 1]
    return pkl[:pos] + enc + pkl[pos + width:]


def legacy_int_mutations(raw: bytes, rng: random.Random, n: int):
    """Integers of a legacy file's pickles (storage sizes, shapes, strides, offsets) made huge or
    negative: its loader allocates each storage at the declared size before reading it."""
    ops = _int_ops(raw, pickles=4)
    out = []
    for _ in range(n):
        op = rng.choice(ops)
        big = rng.choice([2**31 - 1, -1, 2**30, 2**33, 2**40, 2**62, (op[1] * 1000 + 7) % 2**62])
        out.append((f"int {op[1]} at {op[2]} -> {big}", _set_int(raw, op, big)))
    return out


_GARBAGE = [None, 5, "x", [1], [-1], [2**40, 2], {"a": 1}, True, 1.5, [3, "a"], "neg_exp", []]


def manifest_mutations(raw: bytes, rng: random.Random, n: int):
    """An RNN-form .pth whose stored manifest (valid JSON) has a damaged 'rnn' section: a record's
    field replaced by garbage or removed, a record or the section replaced."""
    from rwkvtools.io.pth import MANIFEST_KEY
    sd = torch.load(io.BytesIO(raw), weights_only=True)
    man = json.loads(sd[MANIFEST_KEY].numpy().tobytes())
    names = list(man["rnn"]["tensors"])
    out = []
    for _ in range(n):
        m = json.loads(json.dumps(man))
        k = rng.choice(names)
        rec = m["rnn"]["tensors"][k]
        r = rng.randrange(6)
        if r < 3:
            field = rng.choice(["shape", "rnn_shape", "T", "value", "dtype", "kept", "rescale"])
            rec[field] = rng.choice(_GARBAGE + [list(reversed(rec["shape"])), rec["shape"] + [2], "bfloat16"])
            label = f"rnn record {k}.{field} -> {rec[field]}"
        elif r == 3:
            field = rng.choice(list(rec))
            del rec[field]
            label = f"rnn record {k}: {field} removed"
        elif r == 4:
            m["rnn"]["tensors"][k] = rng.choice(_GARBAGE)
            label = f"rnn record {k} -> {m['rnn']['tensors'][k]}"
        else:
            m["rnn"][rng.choice(["tensors", "version"])] = rng.choice(_GARBAGE)
            label = f"rnn section -> {m['rnn']}"[:100]
        blob = json.dumps(m).encode()
        buf = io.BytesIO()
        torch.save({**sd, MANIFEST_KEY: torch.frombuffer(bytearray(blob), dtype=torch.uint8)}, buf)
        out.append((label, buf.getvalue()))
    return out


def variants(kind: str, n: int, seed: int = 0):
    """``n`` deterministic corruptions of the valid ``kind`` file: [(label, bytes | {name: bytes})]."""
    rng = random.Random(f"{kind}/{seed}")
    base = valid(kind)
    if isinstance(base, dict):  # a Hugging Face folder
        weights = "model.safetensors" if "model.safetensors" in base else "pytorch_model.bin"
        wkind = "safetensors" if weights == "model.safetensors" else "pth"
        k = n // 4
        out = [(f"config: {lab}", {**base, "config.json": b})
               for lab, b in config_mutations(base["config.json"], rng, k)]
        out += [(f"index: {lab}", {**base, "model.safetensors.index.json": b})
                for lab, b in index_mutations(base, rng, k // 2)]
        wm = (json_mutations if wkind == "safetensors" else pickle_mutations)(base[weights], rng, k)
        wm += byte_mutations(wkind, base[weights], rng, n - len(out) - len(wm))
        out += [(f"{weights}: {lab}", {**base, weights: b}) for lab, b in wm]
        return out
    if kind in ("safetensors", "int4", "int8", "recursive"):
        return json_mutations(base, rng, n // 2) + byte_mutations(kind, base, rng, n - n // 2)
    if kind == "pth-rnn":
        k = n // 3
        return (manifest_mutations(base, rng, k) + pickle_mutations(base, rng, k)
                + byte_mutations(kind, base, rng, n - 2 * k))
    if kind == "pth":
        return pickle_mutations(base, rng, n // 2) + byte_mutations(kind, base, rng, n - n // 2)
    if kind == "pth-legacy":
        return legacy_int_mutations(base, rng, n // 3) + byte_mutations(kind, base, rng, n - n // 3)
    if kind.startswith(("rwkvcpp", "gguf")):
        dm = dims_mutations(kind, base, rng, n // 4)
        return dm + byte_mutations(kind, base, rng, n - len(dm))
    return byte_mutations(kind, base, rng, n)


# ---- ONNX files exported by rwkvtools: their 'rwkvtools' metadata drives OnnxModel
@functools.lru_cache(maxsize=None)
def valid_onnx() -> bytes:
    import tempfile

    from rwkvtools.export import export_onnx
    with tempfile.TemporaryDirectory() as tmp:
        p = os.path.join(tmp, "m.onnx")
        export_onnx(_ck("7"), p, mode="step", validate=False)
        return open(p, "rb").read()


def onnx_variants(n: int, seed: int = 0):
    """The valid export with its metadata damaged: fields replaced by garbage (huge, negative, ill
    typed), state entries replaced or renamed, text that is not JSON or nested absurdly deep."""
    import onnx
    rng = random.Random(f"onnx/{seed}")
    model = onnx.load_from_string(valid_onnx())
    prop = next(p for p in model.metadata_props if p.key == "rwkvtools")
    meta = json.loads(prop.value)
    out = []
    for _ in range(n):
        m = json.loads(json.dumps(meta))
        r = rng.randrange(5)
        if r == 0:
            key = rng.choice(["vocab", "mode", "n_layer", "states", "logits", "format"])
            m[key] = rng.choice(_GARBAGE + [10**9, -3, 0, "parallel", 2**62])
            text, label = json.dumps(m), f"{key} -> {m[key]}"
        elif r == 1:
            e = rng.choice(m["states"])
            key = rng.choice(["name", "group", "layer", "shape"])
            e[key] = rng.choice(_GARBAGE + [10**9, -1, 7, ["batch", 10**9], ["batch", 2**40, 2**40], "wkv.0",
                                            ["batch", -4], ["batch"], [1, 32]])
            text, label = json.dumps(m), f"state {e.get('name')}.{key} -> {e[key]}"
        elif r == 2:
            i = rng.randrange(len(m["states"]))
            m["states"][i] = rng.choice(_GARBAGE + [{}])
            text, label = json.dumps(m), f"state {i} -> {m['states'][i]}"
        elif r == 3:
            del m[rng.choice(list(m))]
            text, label = json.dumps(m), "a key removed"
        else:
            text = rng.choice(["", "{", "[]", "null", "[" * 100_000, '{"a": ' * 50_000, "\u00ff\u0000"])
            label = f"metadata text -> {text[:20]!r}"
        prop.value = text
        out.append((label, model.SerializeToString()))
    prop.value = json.dumps(meta)
    return out


def onnx_outcome(path: str) -> tuple[str, str]:
    """OnnxModel(path) and one step: ('loaded' | 'refused' | 'DEFECT', detail)."""
    from rwkvtools.export.onnx_eval import OnnxModel
    try:
        with guarded():
            model = OnnxModel(path)
            model(torch.zeros(1, 1, dtype=torch.long))
    except RwkvToolsError as e:
        return "refused", str(e)
    except _Hang:
        return "DEFECT", "hang: no answer within the time limit"
    except Exception as e:
        return "DEFECT", f"{type(e).__name__}: {str(e)[:200]} at {_where(e)}"
    return "loaded", ""


# =============================================================================== running one
class _Hang(BaseException):
    pass


@contextlib.contextmanager
def guarded(extra_bytes: int = 1 << 30, seconds: int = 20):
    """Limit the address space to what the process maps now plus ``extra_bytes`` (so a reader
    that believes a corrupt size field fails instead of allocating gigabytes) and raise _Hang
    after ``seconds``. Linux only; elsewhere no limit."""
    try:
        import resource
        with open("/proc/self/status") as f:
            vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
        old = resource.getrlimit(resource.RLIMIT_AS)
    except (ImportError, OSError, StopIteration):
        yield
        return
    limit = vm + extra_bytes
    if old[1] != resource.RLIM_INFINITY:
        limit = min(limit, old[1])

    def on_alarm(*_):
        raise _Hang()
    try:
        prev = signal.signal(signal.SIGALRM, on_alarm)
    except ValueError:  # not the main thread: no time limit
        prev = None
    resource.setrlimit(resource.RLIMIT_AS, (limit, old[1]))
    if prev is not None:
        signal.alarm(seconds)
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, old)
        if prev is not None:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, prev)


def _where(e: BaseException) -> str:
    frames = [f for f in traceback.extract_tb(e.__traceback__)]
    ours = [f for f in frames if "rwkvtools" in f.filename] or frames
    f = ours[-1]
    return f"{os.path.relpath(f.filename, os.path.dirname(os.path.dirname(__file__)))}:{f.lineno} ({f.name})"


def load_fully(path: str, deep: bool = False):
    """What reading a checkpoint means here: read it, materialise every tensor, describe it as
    ``inspect`` does and (``deep``) build the model."""
    from rwkvtools.inspect import describe
    ck = read_checkpoint(path)
    for k in ck.tensors:
        ck.tensors[k]
    describe(ck)
    if deep:
        from rwkvtools.model import build_model
        build_model(ck)
    return ck


def write_variant(tmp: str, kind: str, data) -> str:
    """Write a variant to a fresh path under ``tmp`` and return it."""
    import shutil
    if isinstance(data, dict):
        p = os.path.join(tmp, "hf")
        shutil.rmtree(p, ignore_errors=True)
        os.makedirs(p)
        for name, b in data.items():
            with open(os.path.join(p, name), "wb") as f:
                f.write(b)
        return p
    p = os.path.join(tmp, "v" + EXT[kind])
    with open(p, "wb") as f:
        f.write(data)
    return p


def outcome(path: str, deep: bool = False) -> tuple[str, str]:
    """('loaded' | 'refused' | 'DEFECT', detail)."""
    try:
        with guarded():
            load_fully(path, deep)
    except RwkvToolsError as e:
        if "allocate" in str(e) or "MemoryError" in str(e):  # refused, but only after trying to allocate
            return "DEFECT", f"allocation beyond the bound before refusing: {str(e)[:200]}"
        return "refused", str(e)
    except _Hang:
        return "DEFECT", "hang: no answer within the time limit"
    except Exception as e:  # anything else is what the fuzzing looks for
        return "DEFECT", f"{type(e).__name__}: {str(e)[:200]} at {_where(e)}"
    return "loaded", ""


def cli_check(path: str, expect_ok: bool) -> str | None:
    from rwkvtools.cli import main
    with guarded():
        r = CliRunner().invoke(main, ["inspect", path])
    bad = "Traceback" in r.output or "internal error" in r.output or r.exit_code != (0 if expect_ok else 2)
    return f"inspect: exit {r.exit_code}: {r.output[-300:]}" if bad else None


def fuzz(kind: str, n: int, tmp: str, seed: int = 0, cli_every: int = 10) -> tuple[list, dict]:
    """Run ``n`` variants of ``kind``; return (defects [(label, detail)], counts by outcome)."""
    defects, counts = [], {"loaded": 0, "refused": 0, "DEFECT": 0}
    for i, (label, data) in enumerate(variants(kind, n, seed)):
        p = write_variant(tmp, kind, data)
        what, detail = outcome(p, deep=kind in DEEP)
        counts[what] += 1
        if what == "DEFECT":
            defects.append((label, detail))
        elif cli_every and i % cli_every == 0:
            if kind in DEEP:  # inspect reads and describes; it does not build the model
                what = outcome(p)[0]
            bad = cli_check(p, what == "loaded")
            if bad:
                defects.append((label, bad))
    return defects, counts


# =============================================================================== the tests
@pytest.mark.parametrize("kind", KINDS)
def test_valid_file_loads(tmp_path, kind):
    p = write_variant(str(tmp_path), kind, valid(kind))
    assert outcome(p, deep=kind in DEEP) == ("loaded", "")


@pytest.mark.parametrize("kind", KINDS)
def test_corrupt_files_load_or_raise_a_clear_error(tmp_path, kind):
    defects, counts = fuzz(kind, 150, str(tmp_path))
    assert not defects, "\n".join(f"{kind}: {lab}: {d}" for lab, d in defects)
    assert counts["refused"] > 0


def test_corrupt_onnx_metadata_loads_or_raises_a_clear_error(tmp_path):
    defects = []
    for label, data in onnx_variants(150):
        p = tmp_path / "m.onnx"
        p.write_bytes(data)
        what, detail = onnx_outcome(str(p))
        if what == "DEFECT":
            defects.append(f"{label}: {detail}")
    assert not defects, "\n".join(defects)


@pytest.mark.parametrize("module,name", _DISALLOWED)
def test_pth_whose_pickle_names_a_disallowed_global_is_refused_as_unsafe(tmp_path, module, name):
    """The tensor rebuild function of a valid .pth swapped for a global outside the weights-only
    allowlist: refused (UnsafeFileError), nothing imported or called."""
    from rwkvtools.errors import UnsafeFileError

    def swap(pkl):
        old = _global_op("torch._utils", "_rebuild_tensor_v2")
        assert old in pkl
        return pkl.replace(old, _global_op(module, name))
    p = tmp_path / "m.pth"
    p.write_bytes(_rezip(valid("pth"), swap))
    _refused(p, "refused to load", UnsafeFileError)
    _cli_exit_2(p, "refused to load")


# =============================================================================== regressions
# one test per defect the fuzzing found; each failed before its fix
def _refused(path, match, cls=FormatError, **kw):
    with guarded(), pytest.raises(cls, match=match):
        load_fully(str(path), **kw)


def _cli_exit_2(path, match):
    from rwkvtools.cli import main
    r = CliRunner().invoke(main, ["inspect", str(path)])
    assert r.exit_code == 2 and "Traceback" not in r.output and "internal error" not in r.output, r.output
    assert match in r.output, r.output


def _st_with_header(path, header: dict) -> None:
    data = _st_parts(valid("safetensors"))[1]
    path.write_bytes(_st_join(header, data))


# ---- sniffing and .pth loading
def test_safetensors_whose_header_length_starts_with_the_pickle_byte_is_safetensors(tmp_path):
    """A valid safetensors file with a header length of 128 mod 256 begins with 0x80, the pickle
    protocol byte: it was sniffed as .pth (refused as an unsafe pickle, or with a .safetensors
    name read by torch.load's safetensors shortcut, losing the manifest)."""
    from rwkvtools.checkpoint import Checkpoint
    from rwkvtools.io import sniff
    from rwkvtools.io.safetensors_io import write_safetensors
    ck = _ck("7")
    for pad in range(300):
        p = tmp_path / "m.safetensors"
        write_safetensors(Checkpoint(ck.tensors, {**ck.manifest, "note": "x" * pad}), str(p))
        if p.read_bytes()[0] == 0x80:
            break
    for name in ("m.safetensors", "model"):
        q = tmp_path / name
        q.write_bytes(p.read_bytes())
        assert sniff(str(q)) == "safetensors"
        back = read_checkpoint(str(q))
        assert back.manifest["note"] == "x" * pad and back.history == ck.history


def test_pth_named_safetensors_is_read_as_pth(tmp_path):
    """torch.load(path) reads any path ending in '.safetensors' as safetensors: a .pth given such
    a name raised SafetensorError."""
    from rwkvtools.io.pth import write_pth
    ck = _ck("7")
    p = tmp_path / "m.safetensors"
    write_pth(ck, str(p))
    back = read_checkpoint(str(p))
    assert all(torch.equal(back.tensors[k], ck.tensors[k]) for k in ck.tensors)
    p.write_bytes(p.read_bytes()[:-300])
    _refused(p, "not a readable PyTorch checkpoint")


def test_pth_whose_pickle_is_cut_inside_a_length_is_a_format_error(tmp_path):
    """torch's weights-only unpickler raises struct.error when a 4-byte argument is cut short."""
    def cut(pkl):
        pos = next(p for op, _, p in pickletools.genops(io.BytesIO(pkl)) if op.name == "BINUNICODE")
        return pkl[:pos + 3]
    p = tmp_path / "m.pth"
    p.write_bytes(_rezip(valid("pth"), cut))
    _refused(p, "not a readable PyTorch checkpoint")
    _cli_exit_2(p, "not a readable PyTorch checkpoint")


@pytest.mark.parametrize("record", ["data.pkl", "byteorder"])
def test_pth_zip_directory_stating_a_huge_record_is_refused_before_allocating(tmp_path, record):
    """torch's zip reader allocated a record at the uncompressed size the central directory
    states (4 GiB for 0xFFFFFFFF, the zip64 marker, without a zip64 field)."""
    raw = bytearray(valid("pth"))
    cd = raw.find(b"PK\x01\x02")
    name = record.encode()
    while not bytes(raw[cd + 46:cd + 46 + struct.unpack_from("<H", raw, cd + 28)[0]]).endswith(name):
        cd = raw.find(b"PK\x01\x02", cd + 4)  # the central directory entry of the record
    struct.pack_into("<I", raw, cd + 24, 2**32 - 1)  # the uncompressed size
    p = tmp_path / "m.pth"
    p.write_bytes(bytes(raw))
    _refused(p, "states 4294967295 bytes")


@pytest.mark.parametrize("legacy", [False, True])
def test_pth_quantized_tensor_of_a_huge_size_is_refused_before_allocating(tmp_path, legacy):
    """torch's _rebuild_qtensor (allowed by weights_only) allocates the size its pickle states
    before it looks at the storage: 8 GiB for a corrupt size of 2**33."""
    import warnings
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch deprecates its quantized tensors
            q = torch.quantize_per_tensor(torch.randn(64), 0.1, 0, torch.qint8)
    except (AttributeError, RuntimeError):
        pytest.skip("this torch has no quantized tensors")
    buf = io.BytesIO()
    torch.save({"emb.weight": q}, buf, _use_new_zipfile_serialization=not legacy)
    raw = buf.getvalue()
    if legacy:
        a, _ = _legacy_pickles(raw)[3]
        size = [op for op in _int_ops(raw, start=a) if op[1] == 64][-1]  # the size (after the storage numel)
        data = _set_int(raw, size, 2**33)
    else:
        def grow(pkl):
            return _set_int(pkl, [op for op in _int_ops(pkl) if op[1] == 64][-1], 2**33)
        data = _rezip(raw, grow)
    p = tmp_path / "m.pth"
    p.write_bytes(data)
    _refused(p, "not a plain dense tensor")


class _BadRebuild:
    """Pickles as _rebuild_tensor_v2 with a size of the wrong type (all globals allowed)."""

    def __reduce__(self):
        import collections
        storage = torch.zeros(4).untyped_storage()
        typed = torch.storage.TypedStorage(wrap_storage=storage, dtype=torch.float32, _internal=True)
        args = (typed, 0, ("four",), (1,), False, collections.OrderedDict())
        return (torch._utils._rebuild_tensor_v2, args)


@pytest.mark.parametrize("legacy", [False, True])
def test_pth_with_tensor_arguments_of_the_wrong_type_is_a_format_error(tmp_path, legacy):
    """The rebuild functions raised TypeError for arguments of the wrong type."""
    p = tmp_path / "m.pth"
    torch.save({"emb.weight": _BadRebuild()}, str(p), _use_new_zipfile_serialization=not legacy)
    _refused(p, "not a readable PyTorch checkpoint|wrong types")


def _legacy(tensors=None) -> bytes:
    buf = io.BytesIO()
    torch.save(tensors or {"emb.weight": torch.ones(8, 4), "head.weight": torch.ones(2, 4)}, buf,
               _use_new_zipfile_serialization=False)
    return buf.getvalue()


def _legacy_pickles(raw: bytes) -> list[tuple[int, int]]:
    """(start, end) of the five pickles of a legacy file (magic, protocol, sys info, objects, keys)."""
    f, spans = io.BytesIO(raw), []
    for _ in range(5):
        start = f.tell()
        for _ in pickletools.genops(f):
            pass
        spans.append((start, f.tell()))
    return spans


def test_legacy_pth_whose_storage_keys_do_not_match_is_a_format_error(tmp_path):
    """torch's legacy loader raised AssertionError for a storage key list that names no storage."""
    raw = _legacy()
    a, b = _legacy_pickles(raw)[4]
    keys = bytes(raw[a:b])
    pos = next(p for op, _, p in pickletools.genops(io.BytesIO(keys)) if op.name == "BINUNICODE")
    n = struct.unpack_from("<I", keys, pos + 1)[0]
    p = tmp_path / "m.pth"
    p.write_bytes(raw[:a + pos + 5] + b"z" * n + raw[a + pos + 5 + n:])
    _refused(p, "not a readable PyTorch checkpoint")


def test_legacy_pth_with_a_huge_string_length_is_refused_without_allocating(tmp_path):
    """A corrupt string length in a legacy pickle made the file read allocate it (MemoryError)."""
    raw = _legacy()
    a, _ = _legacy_pickles(raw)[3]
    pos = next(p for op, _, p in pickletools.genops(io.BytesIO(raw[a:])) if op.name == "BINUNICODE")
    p = tmp_path / "m.pth"
    p.write_bytes(raw[:a + pos + 1] + struct.pack("<I", 2**32 - 1) + raw[a + pos + 5:])
    _refused(p, "PyTorch checkpoint", RwkvToolsError)


def test_legacy_pth_declaring_huge_storages_is_refused_before_allocating(tmp_path):
    """torch's legacy loader allocates each storage at its declared size before reading it."""
    raw = _legacy()
    a, _ = _legacy_pickles(raw)[3]
    ops = _int_ops(raw, start=a)
    numel = next(op for op in ops if op[1] == 32)  # emb.weight's storage: 8 x 4 elements
    p = tmp_path / "m.pth"
    p.write_bytes(_set_int(raw, numel, 2**40))
    _refused(p, "declares storages of 4398046511")


def test_legacy_pth_tensor_overrunning_its_storage_is_refused_before_allocating(tmp_path):
    """torch's legacy loader grows a storage to fit a tensor whose size overruns it."""
    raw = _legacy({"emb.weight": torch.ones(40, 4)})
    a, _ = _legacy_pickles(raw)[3]
    size = next(op for op in _int_ops(raw, start=a) if op[1] == 40)  # emb.weight's first dim
    p = tmp_path / "m.pth"
    p.write_bytes(_set_int(raw, size, 2**31 - 1))
    _refused(p, "does not fit its storage")


# ---- safetensors and manifests
@pytest.mark.parametrize("where", ["header", "manifest"])
def test_safetensors_json_nested_too_deep_is_a_format_error(tmp_path, where):
    """json.loads raised RecursionError for a deeply nested header or manifest."""
    p = tmp_path / "m.safetensors"
    deep = '{"a": ' * 50_000 + "1" + "}" * 50_000
    if where == "header":
        p.write_bytes(_st_join(None, b"", deep.encode()))
    else:
        h = _st_parts(valid("safetensors"))[0]
        h["__metadata__"]["rwkvtools"] = deep
        _st_with_header(p, h)
    _refused(p, "nested too deep")


def test_safetensors_offsets_that_are_not_integers_are_a_format_error(tmp_path):
    """Offsets were compared with integers unchecked (TypeError for a string)."""
    h = _st_parts(valid("safetensors"))[0]
    h["emb.weight"]["data_offsets"] = ["x", h["emb.weight"]["data_offsets"][1]]
    p = tmp_path / "m.safetensors"
    _st_with_header(p, h)
    _refused(p, "not two integers")


@pytest.mark.parametrize("manifest,match", [
    ("[1, 2]", "not a JSON object"), ("null", "not a JSON object"), ('{"history": 5}', "damaged"),
    ('{"history": [5]}', "damaged"), ('{"history": [{"options": 3}]}', "damaged"), ('{"form": 7}', "damaged"),
    ('{"notes": 4}', "damaged")])
def test_stored_manifest_of_the_wrong_structure_is_a_format_error(tmp_path, manifest, match):
    """A manifest that is valid JSON but not an object (or with a history that is not a list of
    objects) made Checkpoint.form or inspect raise AttributeError / TypeError."""
    from rwkvtools.io.pth import MANIFEST_KEY
    h = _st_parts(valid("safetensors"))[0]
    h["__metadata__"]["rwkvtools"] = manifest
    p = tmp_path / "m.safetensors"
    _st_with_header(p, h)
    _refused(p, match)
    _cli_exit_2(p, match)
    sd = torch.load(io.BytesIO(valid("pth-rnn")), weights_only=True)
    sd[MANIFEST_KEY] = torch.frombuffer(bytearray(manifest.encode()), dtype=torch.uint8)
    q = tmp_path / "m.pth"
    torch.save(sd, str(q))
    _refused(q, match)


def test_gguf_with_a_damaged_manifest_loads_without_its_history(tmp_path):
    """A GGUF manifest whose history holds non-objects crashed inspect (AttributeError)."""
    from rwkvtools.checkpoint import Checkpoint
    from rwkvtools.io.gguf_io import write_gguf
    ck = _ck("7", vocab=256)
    p = tmp_path / "m.gguf"
    write_gguf(Checkpoint(ck.tensors, {**ck.manifest, "history": [5, "x"]}), str(p))
    assert load_fully(str(p)).history == []
    from rwkvtools.cli import main
    r = CliRunner().invoke(main, ["inspect", str(p)])
    assert r.exit_code == 0, r.output


# ---- Hugging Face folders
def _hf(tmp_path, **changes) -> str:
    files = dict(valid("hf"))
    files.update(changes)
    return write_variant(str(tmp_path), "hf", files)


def test_hf_config_nested_too_deep_is_a_format_error(tmp_path):
    """json.load raised RecursionError for a deeply nested config.json."""
    _refused(_hf(tmp_path, **{"config.json": b"[" * 100_000 + b"]" * 100_000}), "nested too deep")


@pytest.mark.parametrize("archs", [5, True, 1.5])
def test_hf_architectures_that_are_not_a_list_are_a_format_error(tmp_path, archs):
    """_family iterated config.json's 'architectures' (TypeError for a number)."""
    cfg = json.loads(valid("hf")["config.json"])
    cfg["architectures"] = archs
    cfg.pop("model_type")
    _refused(_hf(tmp_path, **{"config.json": json.dumps(cfg).encode()}), "architectures")


@pytest.mark.parametrize("shape", [[32, 32, 1], [1024], [1, 32, 32]])
def test_hf_lora_matrix_that_is_not_2d_is_a_format_error(tmp_path, shape):
    """A v7 LoRA matrix of another rank was transposed lazily (RuntimeError from t()) or indexed
    as 2-D (IndexError)."""
    h, data = _st_parts(valid("hf")["model.safetensors"])
    h["model.layers.0.attn.w_lora.lora.0.weight"]["shape"] = shape
    _refused(_hf(tmp_path, **{"model.safetensors": _st_join(h, data)}), "2-D")


# ---- shapes the spec and the model builder read
@pytest.mark.parametrize("version,name,shape", [
    ("7", "emb.weight", (2048,)), ("7", "blocks.0.att.r_k", (32,)), ("7", "blocks.0.att.r_k", (2, 16, 1)),
    ("6", "blocks.0.att.time_faaaa", (1, 1, 32)), ("6", "blocks.0.att.time_decay_w1", (2048,)),
    ("6", "blocks.0.att.time_maa_w2", (5, 1024)), ("5.2", "blocks.0.att.time_decay", (2, 16, 1)),
    ("5.2", "blocks.0.att.time_decay", (0, 16)), ("4", "blocks.0.att.time_first", ())])
def test_spec_refuses_tensors_of_the_wrong_rank(version, name, shape):
    """detect unpacked or indexed shapes assuming their rank (ValueError / IndexError /
    ZeroDivisionError)."""
    from rwkvtools.checkpoint import Checkpoint
    from rwkvtools.errors import SpecError
    from rwkvtools.spec import detect
    t = dict(_ck(version).tensors)
    t[name] = torch.zeros(shape)
    with pytest.raises(SpecError):
        detect(Checkpoint(t).tensors)


@pytest.mark.parametrize("name,value", [("blocks.0.ffn.key.weight_int8", torch.zeros(4096, dtype=torch.int8)),
                                        ("blocks.0.ffn.key.shape", torch.tensor([128])),
                                        ("blocks.0.ffn.key.shape", torch.tensor([[128, 32]]))])
def test_linear_shape_refuses_malformed_quantized_linears(name, value):
    """linear_shape indexed a 1-D int8 matrix (IndexError) and any '.shape' tensor (TypeError)."""
    from rwkvtools.errors import SpecError
    from rwkvtools.spec import linear_shape
    t = {"blocks.0.ffn.key.weight_scale": torch.ones(128), name: value}
    with pytest.raises(SpecError):
        linear_shape(t, "blocks.0.ffn.key")


def test_model_builder_refuses_missing_and_misshapen_tensors():
    """build_model raised KeyError for a missing tensor and RuntimeError for a vector of the
    wrong size."""
    from rwkvtools.checkpoint import Checkpoint
    from rwkvtools.errors import SpecError
    from rwkvtools.model import build_model
    t = dict(_ck("7").tensors)
    del t["blocks.0.ffn.x_k"]
    with pytest.raises(SpecError, match="blocks.0.ffn.x_k"):
        build_model(Checkpoint(t))
    t = dict(_ck("7").tensors)
    t["blocks.0.att.k_k"] = torch.zeros(1, 1, 31)
    with pytest.raises(SpecError, match="k_k"):
        build_model(Checkpoint(t))


# ---- rwkv.cpp records
@pytest.mark.parametrize("kind,name,dims", [
    ("rwkvcpp", "blocks.0.att.w1", [1024]), ("rwkvcpp", "blocks.0.att.a2", [1, 32, 32]),
    ("rwkvcpp", "blocks.0.att.x_rwkvag", [1, 32, 6]),
    ("rwkvcpp-v6", "blocks.0.att.time_maa_w2", [32, 160]),
    ("rwkvcpp-v6", "blocks.0.att.time_decay_w1", [2048]),
    ("rwkvcpp-q", "blocks.0.att.time_decay", [16, 2, 1]),
    ("rwkvcpp-q", "blocks.0.att.time_decay", [2, 16, 1])])
def test_rwkvcpp_record_dims_that_do_not_fit_the_layout_are_a_format_error(tmp_path, kind, name, dims):
    """rwkv.cpp records are reshaped / transposed back to the training form: dims of another rank
    raised IndexError while planning or RuntimeError when the tensor was read."""
    p = tmp_path / "m.bin"
    p.write_bytes(_cpp_redim(valid(kind), name, dims))
    _refused(p, "shape|dimensions", RwkvToolsError)


# ---- RNN-form manifests
@pytest.mark.parametrize("field,value", [
    (None, "neg_exp"), ("shape", None), ("shape", 5), ("rnn_shape", True), ("kept", [1, 2]), ("dtype", [3]),
    ("value", {"a": 1}), ("value", "no_such_op"), ("shape", [2, 2]), ("rescale", "x")])
def test_rnn_form_manifest_record_that_is_damaged_is_a_clear_error(tmp_path, field, value):
    """to_parallel trusted every field of the stored RNN-form records (AttributeError, KeyError,
    TypeError, RuntimeError)."""
    from rwkvtools.io.pth import MANIFEST_KEY
    sd = torch.load(io.BytesIO(valid("pth-rnn")), weights_only=True)
    man = json.loads(sd[MANIFEST_KEY].numpy().tobytes())
    name = "blocks.0.att.time_decay"
    if field is None:
        man["rnn"]["tensors"][name] = value
    else:
        man["rnn"]["tensors"][name][field] = value
    sd[MANIFEST_KEY] = torch.frombuffer(bytearray(json.dumps(man).encode()), dtype=torch.uint8)
    p = tmp_path / "m.pth"
    torch.save(sd, str(p))
    _refused(p, "RNN-form|rnn", RwkvToolsError)


# ---- ONNX metadata
def _onnx_with(tmp_path, change) -> str:
    import onnx
    model = onnx.load_from_string(valid_onnx())
    prop = next(p for p in model.metadata_props if p.key == "rwkvtools")
    meta = json.loads(prop.value)
    prop.value = change(meta) if callable(change) else change
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    return str(path)


def _meta(**kw):
    def change(meta):
        for k, v in kw.items():
            if k.startswith("state_"):
                meta["states"][0][k[6:]] = v
            else:
                meta[k] = v
        return json.dumps(meta)
    return change


@pytest.mark.parametrize("change", [
    "[" * 100_000 + "]" * 100_000, _meta(states=[None]), _meta(state_layer=5), _meta(state_layer=1.5),
    _meta(n_layer=10**9), _meta(n_layer=-1), _meta(state_shape=["batch", -4]), _meta(state_shape=["batch"]),
    _meta(state_shape=["batch", 10**9]), _meta(state_name="wkv.7"), _meta(states=[]),
    _meta(mode="sequence"), _meta(mode="zz"), _meta(logits="zz"), _meta(history=5),
    _meta(history=[{"transform": "x", "options": 5}])],
    ids=["deep", "entry", "layer", "float layer", "huge n_layer", "negative n_layer", "negative dim",
         "rank", "huge dim", "name", "no states", "mode of the other graph", "unknown mode", "logits",
         "history not a list", "history options"])
def test_onnx_model_refuses_metadata_that_does_not_describe_the_graph(tmp_path, change):
    """OnnxModel trusted the metadata: RecursionError, AttributeError, IndexError, a list of
    n_layer entries (MemoryError), and states unlike the graph's inputs failed in onnxruntime
    or in init_state (ValueError, InvalidArgument, RuntimeError) at the first step."""
    from rwkvtools.export.onnx_eval import OnnxModel
    path = _onnx_with(tmp_path, change)
    with guarded(), pytest.raises(FormatError, match="rwkvtools metadata"):
        OnnxModel(path)(torch.zeros(1, 1, dtype=torch.long))


# ---- an explicit format
@pytest.mark.parametrize("fmt", ["safetensors", "rwkvcpp"])
def test_explicit_format_on_a_folder_or_a_missing_path_is_a_clear_error(tmp_path, fmt):
    """read_checkpoint(path, format) skipped sniffing, so a folder or a missing file reached the
    reader (IsADirectoryError / FileNotFoundError)."""
    with pytest.raises(RwkvToolsError, match="folder"):
        read_checkpoint(str(tmp_path), fmt)
    with pytest.raises(RwkvToolsError, match="no such file"):
        read_checkpoint(str(tmp_path / "missing.bin"), fmt)


# ------------------------------------------------- session 12: files that read as other weights
def _st_bytes(tensors: dict) -> bytes:
    from safetensors.torch import save
    return save({k: v.contiguous() for k, v in tensors.items()})


@pytest.mark.parametrize("index", ["1000000000", "9" * 5000, "01"])
def test_layer_index_that_is_no_layer_number_is_refused_at_once(tmp_path, index):
    """'blocks.1000000000.*' made the layer count check build a range of 10^9 numbers (11 s,
    4.9 GB, then 'out of memory'); a 5000-digit index was an internal error (int() limit);
    'blocks.01.*' would be a second spelling of layer 1."""
    from rwkvtools.random_init import random_checkpoint
    t = dict(random_checkpoint("7", n_layer=2, n_embd=32, head_size=16, vocab=64, seed=1).tensors)
    t[f"blocks.{index}.ln1.weight"] = t["blocks.0.ln1.weight"].clone()
    p = tmp_path / "m.safetensors"
    p.write_bytes(_st_bytes(t))
    from rwkvtools.spec import detect
    with guarded(extra_bytes=256 << 20, seconds=20):
        with pytest.raises(RwkvToolsError, match="is not a layer number rwkvtools reads"):
            detect(read_checkpoint(str(p)).tensors)


def test_missing_layers_are_listed_briefly():
    from rwkvtools.random_init import random_checkpoint
    from rwkvtools.spec import detect
    t = dict(random_checkpoint("7", n_layer=2, n_embd=32, head_size=16, vocab=64, seed=1).tensors)
    t["blocks.60.ln1.weight"] = t["blocks.0.ln1.weight"].clone()
    with pytest.raises(RwkvToolsError, match=r"blocks 2, 3, 4, 5, 6, 7, 8, 9, 10, 11 and 48 more are missing"):
        detect(t)


@pytest.mark.parametrize("cut", ["all", "one byte"])
def test_pth_zip_record_shorter_than_its_storage_is_refused(tmp_path, cut):
    """A memory-mapped torch.load read a short record on into the records after it: 'eval' scored
    the garbage (ppl nan, or a plausible number when one byte was missing) with exit 0."""
    from rwkvtools.io.pth import write_pth
    src = tmp_path / "m.pth"
    write_pth(_ck("7", n_layer=2), str(src))
    bad = tmp_path / "bad.pth"
    with zipfile.ZipFile(src) as z, zipfile.ZipFile(bad, "w") as w:
        for i in z.infolist():
            data = z.read(i)
            if i.filename.endswith("/data/1"):
                data = b"" if cut == "all" else data[:-1]
            w.writestr(i.filename, data)
    with pytest.raises(FormatError, match=r"storage '1' holds \d+ bytes by its pickle, its zip record"):
        read_checkpoint(str(bad))
    assert read_checkpoint(str(src)).num_params() > 0


def _gguf_info_pos(raw: bytes, name: str) -> int:
    """Where the type id of tensor ``name``'s info record starts (offset follows as u64)."""
    nb = name.encode()
    i = raw.find(struct.pack("<Q", len(nb)) + nb)
    j = i + 8 + len(nb)
    nd = struct.unpack_from("<I", raw, j)[0]
    return j + 4 + 8 * nd


@pytest.mark.parametrize("change", ["type id", "offset"])
def test_gguf_tensor_data_that_is_not_laid_out_in_order_is_refused(tmp_path, change):
    """llama.cpp requires each tensor's data right after the one before (info order, padded): a
    changed type id (F32 -> Q4_0) or an offset pointing at another tensor's data was read as that
    data (eval: ppl nan or another model's numbers, exit 0)."""
    from rwkvtools.io.gguf_io import parse_gguf
    good = tmp_path / "m.gguf"
    good.write_bytes(valid("gguf"))
    names = list(parse_gguf(str(good)).tensors)
    raw = bytearray(good.read_bytes())
    if change == "type id":
        struct.pack_into("<I", raw, _gguf_info_pos(raw, names[0]), 2)  # F32 -> Q4_0, data untouched
    else:
        off = struct.unpack_from("<Q", raw, _gguf_info_pos(raw, names[1]) + 4)[0]
        struct.pack_into("<Q", raw, _gguf_info_pos(raw, names[2]) + 4, off)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(raw)
    with pytest.raises(FormatError, match="data at offset .* expected"):
        read_checkpoint(str(bad))


def test_onnx_metadata_that_is_not_utf8_is_a_format_error(tmp_path):
    """onnxruntime decodes the metadata as UTF-8 when it is asked for it: a flipped byte was an
    internal error (UnicodeDecodeError) in inspect and eval."""
    from rwkvtools.export.onnx_eval import OnnxModel
    raw = bytearray(valid_onnx())
    raw[raw.find(b'"vocab"') + 1] = 0xFF
    p = tmp_path / "m.onnx"
    p.write_bytes(raw)
    with pytest.raises(FormatError, match="not UTF-8"):
        OnnxModel(str(p))
    r = CliRunner().invoke(__import__("rwkvtools.cli").cli.main, ["inspect", str(p)])
    assert r.exit_code == 2 and "internal error" not in r.output and "not UTF-8" in r.output, r.output


if __name__ == "__main__":  # an exploratory run: python tests/test_fuzz_readers.py [variants per kind] [seed]
    import sys
    import tempfile
    import warnings
    warnings.filterwarnings("ignore", "Detected pickle protocol")
    n, seed = int(sys.argv[1]) if len(sys.argv) > 1 else 1000, int(sys.argv[2]) if len(sys.argv) > 2 else 1
    torch.set_num_threads(1)
    found = 0
    for kind in KINDS:
        with tempfile.TemporaryDirectory() as tmp:
            defects, counts = fuzz(kind, n, tmp, seed=seed)
        print(kind, counts, flush=True)
        for label, detail in defects:
            print(f"  {label}: {detail}")
        found += len(defects)
    with tempfile.TemporaryDirectory() as tmp:
        for label, data in onnx_variants(n, seed):
            with open(os.path.join(tmp, "m.onnx"), "wb") as f:
                f.write(data)
            what, detail = onnx_outcome(os.path.join(tmp, "m.onnx"))
            if what == "DEFECT":
                print(f"  onnx: {label}: {detail}")
                found += 1
    print(f"{found} defect(s)")
    sys.exit(1 if found else 0)

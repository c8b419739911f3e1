"""GGUF files for llama.cpp (architectures ``rwkv6`` and ``rwkv7``), written and read directly.

Writing (``write_gguf``) produces the tensor names, shapes, dtypes, hyper-parameters and tokenizer
metadata that llama.cpp's own converter writes (``convert_hf_to_gguf.py``), from a checkpoint in
any representation rwkvtools holds (dense, low-rank, ... linears are densified), streaming one
tensor at a time through the ``gguf`` package's writer. Quantized tensors use the ``gguf``
package's quantizers for the 32-value block types (byte-identical to llama.cpp's) and
``io/kquants.py`` for Q4_K/Q5_K/Q6_K; pre-quantized blocks (GPTQ) can be passed in ``blocks``.

Reading (``read_gguf``) parses the file with bounds checks on every count, length and offset
(a hostile file cannot make it allocate more than the file holds), dequantizes every block type
the ``gguf`` package knows (plus Q1_0) and returns the BlinkDL training form: the exact inverse of
the writer, so checkpoint -> GGUF (f32) -> checkpoint is lossless.

The layout facts (which tensor llama.cpp needs in which dtype, the fused lerp orders, layer 0's
dummy value-residual LoRA of RWKV-7, v6 rescaling, tokenizer escaping) are in section 16 of the
shared architecture notes and in docs/readme/11-gguf.md.
"""
from __future__ import annotations

import ast
import json
import mmap
import os
import struct
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from ..checkpoint import Checkpoint, LazyTensors, default_manifest, parse_manifest
from ..errors import FormatError, RwkvToolsError, SpecError
from .atomic import atomic_path

ARCH = {"6": "rwkv6", "7": "rwkv7"}
DTYPES = ("f32", "f16", "bf16")
QUANT_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")
TOKENIZERS = ("auto", "bytes", "world", "none")
MANIFEST_KEY = "rwkvtools.manifest"
LN_EPS = 1e-5           # every RWKV LayerNorm (LN0, LN1, LN2, LN_out)
CONTEXT_LENGTH = 1048576  # what llama.cpp's converter writes ("RWKV isn't context limited")
QUANTIZATION_VERSION = 2
WORLD_VOCAB_FILE = "rwkv_vocab_v20230424.txt"
_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}  # llama.cpp's tensor_type_fallback
# llama_ftype for general.file_type (descriptive; llama.cpp does not act on it)
_FTYPE = {"f32": 0, "f16": 1, "bf16": 32, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9,
          "Q4_K": 14, "Q5_K": 16, "Q6_K": 18}
_FLOAT = {"f32": "F32", "f16": "F16", "bf16": "BF16"}
# The RWKV World chat format ("User: ...\n\nAssistant: ...\n\n") as a Jinja template for runtimes
# that render templates (llama.cpp --jinja, LM Studio, ollama); the 'rwkv-world' comment is the
# name llama.cpp's built-in template detection looks for.
WORLD_CHAT_TEMPLATE = (
    "{#- rwkv-world -#}{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ 'System: ' + message['content']|trim + '\n\n' }}"
    "{%- elif message['role'] == 'user' -%}{{ 'User: ' + message['content']|trim + '\n\n' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ 'Assistant: ' + message['content']|trim + '\n\n' }}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'Assistant:' }}{%- endif -%}")

V7_LERP = ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g")          # fused order r, w, k, v, a, g
V6_LERP = ("time_maa_w", "time_maa_k", "time_maa_v", "time_maa_r", "time_maa_g")  # w, k, v, r, g


def _gguf():
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise RwkvToolsError("GGUF support needs the 'gguf' package (llama.cpp's Python library): "
                             "pip install gguf") from None
    return gguf


# =============================================================================================
# The mapping, in one table per version: how each GGUF tensor is made from BlinkDL tensors.
# role: "f32"    always F32 (1-D tensors, norms, lerp/decay/bonus, v6 and v7-decay LoRA)
#       "lora"   small 2-D, written in the float dtype (v7 a/v/g LoRA, as the converter does)
#       "matrix" a large linear: float dtype, or the quant type
#       "embed" / "head": token_embd / output (float dtype unless told otherwise)
@dataclass
class _Out:
    name: str
    shape: tuple                   # torch order (ggml ne reversed)
    role: str
    make: Callable[[], np.ndarray]  # float32, torch order
    sources: tuple = ()            # BlinkDL names/prefixes it is made from
    linear: str | None = None      # BlinkDL linear prefix (for `blocks`)


class _Source:
    """Float32 numpy views of the checkpoint's tensors; linears in any representation."""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        self.t = ckpt.tensors
        self.used: set[str] = set()
        self._ctx = None

    def has(self, name: str) -> bool:
        return name in self.t

    def shape(self, name: str) -> tuple:
        return tuple(self.ckpt.shape(name))

    def need(self, name: str) -> str:
        if name not in self.t:
            raise SpecError(f"GGUF export: expected tensor '{name}', which is missing")
        self.used.add(name)
        return name

    def get(self, name: str) -> np.ndarray:
        t = self.t[name]
        return t.detach().to(torch.float32).cpu().numpy()

    def linear_shape(self, prefix: str) -> tuple[int, int]:
        from ..spec import linear_shape
        s = linear_shape(self.t, prefix)
        if s is None:
            raise SpecError(f"GGUF export: linear '{prefix}' is missing (expected '{prefix}.weight' or its factors)")
        for k in self.t:
            if k.startswith(prefix + "."):
                self.used.add(k)
        return s

    def linear(self, prefix: str) -> np.ndarray:
        """The dense (out, in) weight of a linear stored in any representation."""
        if f"{prefix}.weight" in self.t:
            return self.get(f"{prefix}.weight")
        from ..model.linear import BuildContext, make_linear
        if self._ctx is None:
            self._ctx = BuildContext(self.t, self.ckpt.manifest, torch.float32, torch.device("cpu"))
        mod = make_linear(self._ctx, prefix)
        with torch.no_grad():
            if hasattr(mod, "dense_weight"):
                w = mod.dense_weight()
            else:  # any other representation: probe it with the identity
                n_in = self.linear_shape(prefix)[1]
                w = mod(torch.eye(n_in)).t()
        return w.detach().to(torch.float32).cpu().numpy()


def _vec(src: _Source, name: str) -> Callable[[], np.ndarray]:
    src.need(name)
    return lambda: src.get(name).reshape(-1)


def _common_head(src: _Source, outs: list, C: int, V: int) -> None:
    src.need("emb.weight")
    outs.append(_Out("token_embd.weight", (V, C), "embed", lambda: src.get("emb.weight"), ("emb.weight",)))
    for w in ("weight", "bias"):
        outs.append(_Out(f"token_embd_norm.{w}", (C,), "f32", _vec(src, f"blocks.0.ln0.{w}"), (f"blocks.0.ln0.{w}",)))


def _common_tail(src: _Source, outs: list, C: int, V: int) -> None:
    for w in ("weight", "bias"):
        outs.append(_Out(f"output_norm.{w}", (C,), "f32", _vec(src, f"ln_out.{w}"), (f"ln_out.{w}",)))
    outs.append(_Out("output.weight", (V, C), "head", lambda: src.linear("head"), ("head",), linear="head"))
    src.linear_shape("head")


def _norms(src: _Source, outs: list, i: int, C: int) -> None:
    for ln, g in (("ln1", "attn_norm"), ("ln2", "attn_norm_2")):
        for w in ("weight", "bias"):
            outs.append(_Out(f"blk.{i}.{g}.{w}", (C,), "f32", _vec(src, f"blocks.{i}.{ln}.{w}")))


def _lin(src: _Source, outs: list, gname: str, prefix: str) -> None:
    o, n = src.linear_shape(prefix)
    outs.append(_Out(gname, (o, n), "matrix", lambda: src.linear(prefix), (prefix,), linear=prefix))


def _t(src: _Source, name: str) -> tuple[tuple, Callable[[], np.ndarray]]:
    """A BlinkDL (in, out) LoRA matrix written transposed."""
    src.need(name)
    s = src.shape(name)
    return (s[1], s[0]), (lambda: np.ascontiguousarray(src.get(name).T))


def _stack(src: _Source, names: list[str], C: int) -> Callable[[], np.ndarray]:
    for n in names:
        src.need(n)
    return lambda: np.stack([src.get(n).reshape(C) for n in names]).reshape(len(names), 1, 1, C)


def _plan_v7(src: _Source, spec) -> list[_Out]:
    C, V, L = spec.n_embd, spec.vocab, spec.n_layer
    outs: list[_Out] = []
    _common_head(src, outs, C, V)
    for i in range(L):
        a, f, b = f"blocks.{i}.att.", f"blocks.{i}.ffn.", f"blk.{i}."
        _norms(src, outs, i, C)
        outs.append(_Out(b + "time_mix_lerp_fused.weight", (6, 1, 1, C), "f32", _stack(src, [a + x for x in V7_LERP], C)))
        for p in ("w", "a", "v"):
            # layer 0 never uses its value-residual LoRA, but llama.cpp requires the tensors with the
            # ICLR rank: the converter writes copies of a0/a1/a2 there (and drops any v0/v1/v2)
            q = "a" if (p == "v" and i == 0) else p
            outs.append(_Out(b + f"time_mix_{p}0.weight", (C,), "f32", _vec(src, a + f"{q}0")))
            role = "f32" if p == "w" else "lora"
            s1, m1 = _t(src, a + f"{q}1")
            s2, m2 = _t(src, a + f"{q}2")
            outs.append(_Out(b + f"time_mix_{p}1.weight", s1, role, m1))
            outs.append(_Out(b + f"time_mix_{p}2.weight", s2, role, m2))
        if i == 0:
            src.used.update(k for k in (a + "v0", a + "v1", a + "v2") if src.has(k))
        for g in ("g1", "g2"):
            s, m = _t(src, a + g)
            outs.append(_Out(b + f"time_mix_{g}.weight", s, "lora", m))
        outs.append(_Out(b + "time_mix_k_k.weight", (C,), "f32", _vec(src, a + "k_k")))
        outs.append(_Out(b + "time_mix_k_a.weight", (C,), "f32", _vec(src, a + "k_a")))
        outs.append(_Out(b + "time_mix_r_k.weight", (C,), "f32", _vec(src, a + "r_k")))
        for lin in ("key", "value", "receptance"):
            _lin(src, outs, b + f"time_mix_{lin}.weight", a + lin)
        outs.append(_Out(b + "time_mix_ln.weight", (C,), "f32", _vec(src, a + "ln_x.weight")))
        outs.append(_Out(b + "time_mix_ln.bias", (C,), "f32", _vec(src, a + "ln_x.bias")))
        _lin(src, outs, b + "time_mix_output.weight", a + "output")
        outs.append(_Out(b + "channel_mix_lerp_k.weight", (C,), "f32", _vec(src, f + "x_k")))
        _lin(src, outs, b + "channel_mix_key.weight", f + "key")
        _lin(src, outs, b + "channel_mix_value.weight", f + "value")
    _common_tail(src, outs, C, V)
    return outs


def _plan_v6(src: _Source, spec) -> list[_Out]:
    C, V, L = spec.n_embd, spec.vocab, spec.n_layer
    outs: list[_Out] = []
    _common_head(src, outs, C, V)
    for i in range(L):
        a, f, b = f"blocks.{i}.att.", f"blocks.{i}.ffn.", f"blk.{i}."
        _norms(src, outs, i, C)
        outs.append(_Out(b + "time_mix_lerp_x.weight", (C,), "f32", _vec(src, a + "time_maa_x")))
        outs.append(_Out(b + "time_mix_lerp_fused.weight", (5, 1, 1, C), "f32", _stack(src, [a + x for x in V6_LERP], C)))
        s, m = _t(src, a + "time_maa_w1")
        outs.append(_Out(b + "time_mix_w1.weight", s, "f32", m))
        w2 = src.need(a + "time_maa_w2")
        n5, d, c = src.shape(w2)
        outs.append(_Out(b + "time_mix_w2.weight", (n5, c, d), "f32",
                         lambda w2=w2: np.ascontiguousarray(src.get(w2).transpose(0, 2, 1))))
        outs.append(_Out(b + "time_mix_decay.weight", (C,), "f32", _vec(src, a + "time_decay")))
        s, m = _t(src, a + "time_decay_w1")
        outs.append(_Out(b + "time_mix_decay_w1.weight", s, "f32", m))
        s, m = _t(src, a + "time_decay_w2")
        outs.append(_Out(b + "time_mix_decay_w2.weight", s, "f32", m))
        fa = src.need(a + "time_faaaa")
        outs.append(_Out(b + "time_mix_first.weight", tuple(src.shape(fa)), "f32", lambda fa=fa: src.get(fa)))
        for lin in ("key", "value", "receptance", "gate"):
            _lin(src, outs, b + f"time_mix_{lin}.weight", a + lin)
        outs.append(_Out(b + "time_mix_ln.weight", (C,), "f32", _vec(src, a + "ln_x.weight")))
        outs.append(_Out(b + "time_mix_ln.bias", (C,), "f32", _vec(src, a + "ln_x.bias")))
        _lin(src, outs, b + "time_mix_output.weight", a + "output")
        outs.append(_Out(b + "channel_mix_lerp_k.weight", (C,), "f32", _vec(src, f + "time_maa_k")))
        outs.append(_Out(b + "channel_mix_lerp_r.weight", (C,), "f32", _vec(src, f + "time_maa_r")))
        _lin(src, outs, b + "channel_mix_key.weight", f + "key")
        _lin(src, outs, b + "channel_mix_receptance.weight", f + "receptance")
        _lin(src, outs, b + "channel_mix_value.weight", f + "value")
    _common_tail(src, outs, C, V)
    return outs


# =============================================================================================
# tokenizer metadata
def world_vocab_path() -> str:
    """The RWKV World vocabulary file shipped with pyrwkv-tokenizer (or ChatRWKV's rwkv package)."""
    for mod in ("pyrwkv_tokenizer", "rwkv"):
        try:
            m = __import__(mod)
        except ImportError:
            continue
        p = os.path.join(os.path.dirname(m.__file__), WORLD_VOCAB_FILE)
        if os.path.exists(p):
            return p
    raise RwkvToolsError(f"the RWKV World vocabulary ({WORLD_VOCAB_FILE}) was not found: install "
                         "pyrwkv-tokenizer, or pass its path as vocab_file")


def _token_text(b: bytes) -> str:
    """llama.cpp's rwkv tokenizer text of a token: Python's bytes-literal escaping without b'...'
    (what the converter writes; llama.cpp un-escapes \\t \\n \\r \\xNN and \\<char>)."""
    return repr(b)[2:-1]


def read_world_vocab(path: str) -> list[bytes]:
    """Token byte strings in file order (ids 1..N). Lines are '<id> <python literal> <length>'."""
    out: list[bytes] = []
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise RwkvToolsError(f"{path}: cannot read the World vocabulary ({e})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        first, last = line.find(" "), line.rfind(" ")
        try:
            idx, lit, length = int(line[:first]), line[first + 1:last], int(line[last + 1:])
            tok = ast.literal_eval(lit)
        except (ValueError, SyntaxError):
            raise RwkvToolsError(f"{path}:{n}: not a vocabulary line ('<id> <literal> <length>')") from None
        tok = tok.encode("utf-8") if isinstance(tok, str) else tok
        if not isinstance(tok, bytes) or len(tok) != length or idx != len(out) + 1:
            raise RwkvToolsError(f"{path}:{n}: inconsistent entry (id {idx}, length {length})")
        out.append(tok)
    return out


def _tokenizer_kv(w, kind: str, V: int, vocab_file: str | None, arch: str) -> dict:
    gguf = _gguf()
    T = gguf.TokenType
    if kind == "auto":
        if V == 256:
            kind = "bytes"
        elif V >= 65530 and V <= 65536 + 1024:
            kind = "world"
        else:
            raise RwkvToolsError(
                f"GGUF export needs a tokenizer llama.cpp knows, and none is known for vocab size {V} "
                "(256 = bytes, 65536 = RWKV World). Choose tokenizer 'none' (ids only: llama.cpp "
                "evaluates token ids but cannot tokenize text) or 'world' with a vocab file")
    if kind == "bytes":
        if V < 256:
            raise RwkvToolsError(f"the bytes tokenizer needs a vocab of at least 256, the model has {V}")
        tokens = [_token_text(bytes([b])) for b in range(256)] + [f"[PAD{i}]" for i in range(256, V)]
        types = [T.NORMAL] * 256 + [T.UNUSED] * (V - 256)
        w.add_tokenizer_model("rwkv")
        w.add_token_list(tokens)
        w.add_token_types(types)
        return {"tokenizer": "bytes", "tokens": V}
    if kind == "world":
        path = vocab_file or world_vocab_path()
        toks = read_world_vocab(path)
        if len(toks) + 1 > V:
            raise RwkvToolsError(f"the World vocabulary has {len(toks) + 1} tokens, more than the model's vocab {V}")
        tokens = ["<s>"] + [_token_text(t) for t in toks] + [f"[PAD{i}]" for i in range(len(toks) + 1, V)]
        types = [T.CONTROL] + [T.NORMAL] * len(toks) + [T.UNUSED] * (V - len(toks) - 1)
        w.add_tokenizer_model("rwkv")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_bos_token_id(0)
        w.add_eos_token_id(0)
        w.add_eot_token_id(261)  # "\n\n", as llama.cpp's converter sets it for chat
        w.add_chat_template(WORLD_CHAT_TEMPLATE)
        return {"tokenizer": "world", "tokens": V, "vocab_file": os.path.basename(path)}
    if kind == "none":
        w.add_tokenizer_model("none")
        w.add_uint32(f"{arch}.vocab_size", V)
        return {"tokenizer": "none", "tokens": V}
    raise RwkvToolsError(f"unknown tokenizer '{kind}'; known: {', '.join(TOKENIZERS)}")


# =============================================================================================
# writing
def _qtype(name: str):
    gguf = _gguf()
    return gguf.GGMLQuantizationType[name]


def _type_name(t) -> str:
    return t.name if hasattr(t, "name") else str(t).upper()


def _nbytes(tname: str, shape: tuple) -> int:
    gguf = _gguf()
    bs, ts = gguf.GGML_QUANT_SIZES[_qtype(tname)]
    n = 1
    for d in shape[:-1]:
        n *= d
    return n * (shape[-1] // bs) * ts


def _fits(tname: str, ncols: int) -> bool:
    gguf = _gguf()
    return ncols % gguf.GGML_QUANT_SIZES[_qtype(tname)][0] == 0


def _encode(arr: np.ndarray, tname: str) -> np.ndarray:
    """float32 torch-order array -> the bytes ggml stores for type ``tname``."""
    if tname == "F32":
        return np.ascontiguousarray(arr, dtype=np.float32)
    if tname == "F16":
        return np.ascontiguousarray(arr, dtype=np.float32).astype(np.float16)
    from gguf.quants import quantize
    if tname == "BF16":
        return quantize(np.ascontiguousarray(arr, dtype=np.float32), _qtype(tname))
    if not np.isfinite(arr).all():
        raise RwkvToolsError(f"cannot quantize to {tname}: the tensor holds NaN or infinite values")
    if tname in ("Q4_K", "Q5_K", "Q6_K"):
        from . import kquants
        rows = arr.reshape(-1, arr.shape[-1])
        return kquants.quantize(tname, rows).reshape(rows.shape[0], -1)
    return quantize(np.ascontiguousarray(arr, dtype=np.float32), _qtype(tname))


def _check_choice(what: str, value: str | None, allowed) -> str | None:
    if value is None:
        return None
    v = value.lower() if value.lower() in DTYPES else value.upper()
    if v not in allowed:
        raise RwkvToolsError(f"{what} '{value}' is not supported; choose one of {', '.join(allowed)}")
    return v


def gguf_plan(ckpt: Checkpoint):
    """(spec, [_Out...]) for a v6/v7 checkpoint; refuses v4/v5 with the formats that serve them."""
    from ..spec import detect
    from ..transforms import prepare_for_model
    ckpt = prepare_for_model(ckpt)
    spec = detect(ckpt.tensors, ckpt.manifest)
    if spec.version not in ARCH:
        from .rwkvcpp import layout_refusal
        cpp = ("" if layout_refusal(spec) else   # rwkv.cpp runs v4 to v7, but not every v5 layout
               "rwkv.cpp's .bin (rwkv.cpp runs v4 to v7: rwkvtools convert SRC model.bin), ")
        raise RwkvToolsError(
            f"GGUF: llama.cpp runs RWKV-6 and RWKV-7 only (architectures rwkv6, rwkv7); this is an "
            f"RWKV-{spec.version} model. Formats that serve it: .safetensors or .pth (rwkvtools, "
            f"ChatRWKV, RWKV-LM), {cpp}or ONNX (rwkvtools export-onnx)")
    src = _Source(ckpt)
    outs = _plan_v7(src, spec) if spec.version == "7" else _plan_v6(src, spec)
    left = sorted(k for k in ckpt.tensors if k not in src.used)
    if left:
        more = f" (and {len(left) - 8} more)" if len(left) > 8 else ""
        raise RwkvToolsError(f"GGUF export: llama.cpp has no place for tensor(s) {', '.join(left[:8])}{more}; "
                             "remove them (e.g. a state-tuned 'time_state') or write another format")
    return spec, outs, src


def write_gguf(ckpt: Checkpoint, path: str, dtype: str | None = None, quant: str | None = None,
               blocks: dict | None = None, embed_type: str | None = None, head_type: str | None = None,
               tokenizer: str = "auto", vocab_file: str | None = None, name: str | None = None,
               progress: bool | None = None) -> dict:
    """Write an RWKV-6/7 checkpoint as a GGUF file that llama.cpp loads as its own.

    dtype: float type of the matrices, embedding and head ("f32", "f16", "bf16"; "fp32"/"fp16"
        accepted); default: the checkpoint's own (its embedding's dtype), so nothing is rounded.
        1-D tensors, norms, lerp/decay/bonus tensors and the v6 / v7-decay LoRA stay F32 (llama.cpp
        needs it).
    quant: quantize the large matrices (time_mix receptance/key/value/gate/output, channel_mix
        key/value/receptance) to Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K or Q6_K (round to nearest,
        the bytes llama.cpp's quantizer writes). A matrix whose rows do not fit the block size is
        demoted as llama.cpp does (Q4_K->Q5_0, Q5_K->Q5_1, Q6_K->Q8_0, else F16); see the report.
    embed_type / head_type: type of token_embd / output (default: ``dtype``; any float or quant type).
    blocks: pre-quantized tensors, e.g. from GPTQ: ``{name: (type, data)}`` where name is the
        BlinkDL weight name ("blocks.3.att.key.weight", "head.weight", "emb.weight") or the GGUF
        name ("blk.3.time_mix_key.weight"), type a quant type name (or gguf.GGMLQuantizationType)
        and data the ggml block bytes as uint8 (any shape; rows*cols/block_size*type_size bytes,
        rows in the torch (out, in) order). Only the matrices, the embedding and the head may be
        given. They are written as they are (the checkpoint's own values for them are not read).
    tokenizer: "auto" (vocab 256 -> bytes, 65536 -> RWKV World), "bytes", "world" (vocab_file or
        the packaged rwkv_vocab_v20230424.txt), "none" (token ids only).
    Returns a report dict (path, architecture, tensor types, fallbacks, bytes).
    """
    gguf = _gguf()
    if dtype is None:
        dtype = _native_dtype(ckpt)
    dtype = _check_choice("dtype", {"fp32": "f32", "fp16": "f16"}.get(str(dtype).lower(), dtype), DTYPES)
    quant = _check_choice("quant type", quant, QUANT_TYPES)
    allowed_eh = DTYPES + QUANT_TYPES
    embed_type = _check_choice("embedding type", embed_type, allowed_eh) or dtype
    head_type = _check_choice("head type", head_type, allowed_eh) or dtype
    spec, outs, src = gguf_plan(ckpt)
    arch = ARCH[spec.version]
    base = _FLOAT[dtype]

    # resolve pre-quantized blocks to GGUF names. A checkpoint from rwkvtools' quantize transform
    # carries its ggml blocks (``tensors.ggml_blocks``, torch row order); those for matrices GGUF
    # can hold quantized are taken as they are, the others (e.g. v6 LoRA, which rwkv.cpp quantizes
    # but llama.cpp keeps in F32) are written from their dequantized values.
    lenient = False
    if blocks is None and getattr(ckpt.tensors, "ggml_blocks", None):
        blocks, lenient = dict(ckpt.tensors.ggml_blocks), True
    given: dict[str, tuple[str, np.ndarray]] = {}
    by_blink = {}
    for o in outs:
        if o.role in ("matrix", "embed", "head"):
            by_blink[o.name] = o
            if o.linear:
                by_blink[o.linear + ".weight"] = o
            for s in o.sources:
                by_blink.setdefault(s if s.endswith(".weight") else s + ".weight", o)
    for key, val in (blocks or {}).items():
        o = by_blink.get(key)
        if o is None and lenient:
            continue
        if o is None:
            raise RwkvToolsError(f"blocks: '{key}' is not a matrix, embedding or head of this model "
                                 "(only those may be pre-quantized; llama.cpp needs the others in F32)")
        try:
            t, data = val
        except (TypeError, ValueError):
            raise RwkvToolsError(f"blocks['{key}']: expected a (type, uint8 bytes) pair") from None
        tname = _type_name(t)
        if tname not in gguf.GGMLQuantizationType.__members__:
            raise RwkvToolsError(f"blocks['{key}']: unknown ggml type '{tname}'")
        if not _fits(tname, o.shape[-1]):
            raise RwkvToolsError(f"blocks['{key}']: rows of {o.shape[-1]} values do not fit {tname}'s block size")
        data = np.ascontiguousarray(np.asarray(data)).view(np.uint8).reshape(-1)
        want = _nbytes(tname, o.shape)
        if data.size != want:
            raise RwkvToolsError(f"blocks['{key}']: {tname} of shape {o.shape} takes {want} bytes, got {data.size}")
        if o.name in given:
            raise RwkvToolsError(f"blocks: '{o.name}' is given twice")
        given[o.name] = (tname, data)

    # pick a type per tensor
    fallbacks = []
    types: list[str] = []
    for o in outs:
        if o.name in given:
            types.append(given[o.name][0])
            continue
        if o.role == "f32":
            t = "F32"
        elif o.role == "lora":
            t = base
        elif o.role == "matrix":
            t = quant or base
        else:
            want = embed_type if o.role == "embed" else head_type
            t = _FLOAT.get(want, want)
        if t not in ("F32", "F16", "BF16") and not _fits(t, o.shape[-1]):
            fb = _FALLBACK.get(t, t)
            if not _fits(fb, o.shape[-1]):
                fb = "F16"
            fallbacks.append({"tensor": o.name, "wanted": t, "written": fb, "row": o.shape[-1]})
            t = fb
        types.append(t)

    ftype = _FTYPE[quant] if quant else _FTYPE[dtype]
    report: dict[str, Any] = {"path": path, "format": "gguf", "architecture": arch, "version": spec.version,
                              "dtype": dtype, "quant": quant, "file_type": ftype}
    with atomic_path(path) as tmp:
        w = gguf.GGUFWriter(tmp, arch)
        try:
            w.add_type("model")
            w.add_name(name or _model_name(ckpt, spec))
            n_params = ckpt.num_params()
            from gguf.utility import size_label
            w.add_size_label(size_label(n_params, n_params, 0, 0))
            w.add_context_length(CONTEXT_LENGTH)
            w.add_embedding_length(spec.n_embd)
            w.add_block_count(spec.n_layer)
            w.add_layer_norm_eps(LN_EPS)
            w.add_wkv_head_size(spec.head_size)
            w.add_feed_forward_length(spec.ffn_dim)
            if spec.version == "7":
                w.add_decay_lora_rank(spec.lora["w"])
                w.add_iclr_lora_rank(spec.lora["a"])
                w.add_value_residual_mix_lora_rank(spec.lora.get("v") or spec.lora["a"])
                w.add_gate_lora_rank(spec.lora["g"])
            else:
                w.add_rescale_every_n_layers(0)  # the exact choice (no halving of the residual)
                w.add_time_mix_extra_dim(spec.lora["mix"])
                w.add_time_decay_extra_dim(spec.lora["decay"])
            w.add_head_count(0)  # "required by llama.cpp, unused" (the converter writes it)
            w.add_file_type(ftype)
            w.add_quantization_version(QUANTIZATION_VERSION)
            report.update(_tokenizer_kv(w, tokenizer, spec.vocab, vocab_file, arch))
            w.add_string(MANIFEST_KEY, json.dumps(_manifest_for_file(ckpt, dtype, quant), sort_keys=True, default=str))
            for o, t in zip(outs, types):
                w.add_tensor_info(o.name, o.shape, np.dtype(np.float32), _nbytes(t, o.shape), raw_dtype=_qtype(t))
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            it = zip(outs, types)
            if progress is None:
                import sys
                progress = sys.stderr.isatty() and n_params > 50_000_000
            if progress:
                from tqdm import tqdm
                it = tqdm(list(it), desc="writing GGUF", unit="tensor", leave=False)
            for o, t in it:
                if o.name in given:
                    data = given[o.name][1]
                else:
                    arr = np.asarray(o.make(), dtype=np.float32)
                    if tuple(arr.shape) != tuple(o.shape):
                        arr = arr.reshape(o.shape)
                    try:
                        data = _encode(arr, t)
                    except RwkvToolsError as e:
                        raise RwkvToolsError(f"{o.name}: {e}") from None
                w.write_tensor_data(np.ascontiguousarray(data).view(np.uint8).reshape(-1))
            w.close()
        except BaseException:
            w.close()
            raise
    counts: dict[str, int] = {}
    for t in types:
        counts[t] = counts.get(t, 0) + 1
    report.update({"tensors": len(outs), "tensor_types": counts, "fallbacks": fallbacks,
                   "prequantized": sorted(given), "bytes": os.path.getsize(path)})
    return report


def _native_dtype(ckpt: Checkpoint) -> str:
    try:
        dt = ckpt.dtype("emb.weight")
    except KeyError:
        return "f32"
    return {torch.float16: "f16", torch.bfloat16: "bf16"}.get(dt, "f32")


def _model_name(ckpt: Checkpoint, spec) -> str:
    if ckpt.source:
        return os.path.splitext(os.path.basename(str(ckpt.source).rstrip("/")))[0]
    return f"rwkv{spec.version}"


def _manifest_for_file(ckpt: Checkpoint, dtype: str, quant: str | None) -> dict:
    m = dict(ckpt.manifest)
    m = json.loads(json.dumps(m, default=str))
    m.pop("source_format", None)
    densified = sorted({n.rsplit(".", 1)[0] for n in ckpt.tensors
                        if n.endswith((".weight_u", ".weight_int8", ".weight_int4"))})
    if densified:  # the file holds dense matrices: no low-rank / int8-int4 summary describes it now
        m.pop("lowrank", None)
        m.pop("quantized", None)
        m["history"] = list(m.get("history") or []) + [{
            "transform": "densify", "options": {"format": "gguf"},
            "summary": f"{len(densified)} low-rank or int8/int4 linears written as dense matrices"}]
    q = m.get("quantized")
    if isinstance(q, dict):  # keep the summary, not the per-tensor tables (they would weigh on small files)
        m["quantized"] = {k: v for k, v in q.items() if k not in ("tensors", "kept")}
    m["form"] = "parallel"
    m["gguf"] = {"dtype": dtype, "quant": quant}
    return m


# =============================================================================================
# reading: a bounds-checked GGUF parser (every count and length is checked against the file
# before anything is allocated), then the inverse mapping
_VT = {0: ("B", 1), 1: ("b", 1), 2: ("H", 2), 3: ("h", 2), 4: ("I", 4), 5: ("i", 4), 6: ("f", 4),
       7: ("?", 1), 10: ("Q", 8), 11: ("q", 8), 12: ("d", 8)}
_NP = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
       7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9
_VT_NAMES = {0: "UINT8", 1: "INT8", 2: "UINT16", 3: "INT16", 4: "UINT32", 5: "INT32", 6: "FLOAT32", 7: "BOOL",
             8: "STRING", 9: "ARRAY", 10: "UINT64", 11: "INT64", 12: "FLOAT64"}
MAX_DIMS = 4
MAX_KEY_LEN = 1 << 16


@dataclass
class GGUFTensorInfo:
    name: str
    ne: tuple          # ggml order
    type_id: int
    type_name: str
    offset: int        # absolute, in the file
    nbytes: int

    @property
    def shape(self) -> tuple:  # torch order
        return tuple(reversed(self.ne))


@dataclass
class GGUFFile:
    path: str
    version: int
    kv: dict = field(default_factory=dict)
    kv_types: dict = field(default_factory=dict)  # key -> GGUF value type name (UINT32, STRING, ARRAY...)
    tensors: dict = field(default_factory=dict)   # name -> GGUFTensorInfo
    alignment: int = 32
    data_start: int = 0


class _Cursor:
    def __init__(self, buf, path: str):
        self.b = buf
        self.n = len(buf)
        self.p = 0
        self.path = path

    def take(self, k: int, what: str):
        if k < 0 or self.p + k > self.n:
            raise FormatError(f"{self.path}: truncated or corrupt GGUF: {what} at byte {self.p} needs {k} bytes, "
                              f"{self.n - self.p} left")
        s = self.b[self.p:self.p + k]
        self.p += k
        return s

    def u(self, fmt: str, what: str):
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str, limit: int | None = None) -> str:
        n = self.u("Q", what)
        if limit is not None and n > limit:
            raise FormatError(f"{self.path}: corrupt GGUF: {what} of {n} bytes (limit {limit})")
        raw = self.take(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(f"{self.path}: corrupt GGUF: {what} is not UTF-8") from None

    def value(self, vt: int, key: str, depth: int = 0):
        if vt in _VT:
            return self.u(_VT[vt][0], f"value of '{key}'")
        if vt == _STRING:
            return self.string(f"string value of '{key}'")
        if vt == _ARRAY:
            if depth > 2:
                raise FormatError(f"{self.path}: corrupt GGUF: arrays nested too deep in '{key}'")
            et = self.u("I", f"array type of '{key}'")
            cnt = self.u("Q", f"array length of '{key}'")
            if et in _VT:
                size = _VT[et][1]
                if cnt > (self.n - self.p) // size:
                    raise FormatError(f"{self.path}: corrupt GGUF: array '{key}' claims {cnt} items, more than the file holds")
                return np.frombuffer(self.take(cnt * size, f"array '{key}'"), dtype=np.dtype(_NP[et]).newbyteorder("<")).copy()
            if et in (_STRING, _ARRAY):
                if cnt > (self.n - self.p) // 8:
                    raise FormatError(f"{self.path}: corrupt GGUF: array '{key}' claims {cnt} items, more than the file holds")
                return [self.value(et, key, depth + 1) for _ in range(cnt)]
            raise FormatError(f"{self.path}: corrupt GGUF: unknown array item type {et} in '{key}'")
        raise FormatError(f"{self.path}: corrupt GGUF: unknown value type {vt} for key '{key}'")


def parse_gguf(path: str) -> GGUFFile:
    """Parse the header, metadata and tensor table of a GGUF file; no tensor data is read."""
    gguf = _gguf()
    try:
        size = os.path.getsize(path)
        fh = open(path, "rb")
    except OSError as e:
        raise RwkvToolsError(f"{path}: cannot read ({e.strerror})") from None
    with fh:
        if size < 24:
            raise FormatError(f"{path}: too short for a GGUF header ({size} bytes)")
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        c = _Cursor(mm, path)
        if c.take(4, "magic") != b"GGUF":
            raise FormatError(f"{path}: not a GGUF file (bad magic)")
        version = c.u("I", "version")
        if version not in (2, 3):
            raise FormatError(f"{path}: GGUF version {version} is not supported (2 or 3)")
        n_tensors = c.u("Q", "tensor count")
        n_kv = c.u("Q", "metadata count")
        if n_kv > size // 13 or n_tensors > size // 28:
            raise FormatError(f"{path}: corrupt GGUF header: {n_tensors} tensors / {n_kv} metadata entries "
                              f"cannot fit in {size} bytes")
        g = GGUFFile(path, version)
        for _ in range(n_kv):
            key = c.string("metadata key", MAX_KEY_LEN)
            vt = c.u("I", f"type of '{key}'")
            if key in g.kv:
                raise FormatError(f"{path}: corrupt GGUF: metadata key '{key}' appears twice")
            g.kv[key] = c.value(vt, key)
            g.kv_types[key] = _VT_NAMES.get(vt, str(vt))
        align = g.kv.get("general.alignment", 32)
        if not isinstance(align, int) or align <= 0 or align & (align - 1) or align > 1 << 20:
            raise FormatError(f"{path}: corrupt GGUF: general.alignment {align!r} is not a power of two")
        g.alignment = align
        infos = []
        for _ in range(n_tensors):
            name = c.string("tensor name", 1 << 12)
            nd = c.u("I", f"dims of '{name}'")
            if not 1 <= nd <= MAX_DIMS:
                raise FormatError(f"{path}: corrupt GGUF: tensor '{name}' has {nd} dimensions (1..{MAX_DIMS})")
            ne = tuple(c.u("Q", f"shape of '{name}'") for _ in range(nd))
            tid = c.u("I", f"type of '{name}'")
            off = c.u("Q", f"offset of '{name}'")
            if any(d < 1 or d > 1 << 40 for d in ne):
                raise FormatError(f"{path}: corrupt GGUF: tensor '{name}' has shape {ne}")
            try:
                qt = gguf.GGMLQuantizationType(tid)
            except ValueError:
                raise FormatError(f"{path}: tensor '{name}' has ggml type id {tid}, which this gguf package "
                                  "does not know (update gguf, or re-quantize with a common type)") from None
            bs, ts = gguf.GGML_QUANT_SIZES[qt]
            if ne[0] % bs:
                raise FormatError(f"{path}: corrupt GGUF: tensor '{name}' ({qt.name}) has rows of {ne[0]}, "
                                  f"not a multiple of the block size {bs}")
            n = 1
            for d in ne[1:]:
                n *= d
            nbytes = n * (ne[0] // bs) * ts
            if name in g.tensors:
                raise FormatError(f"{path}: corrupt GGUF: tensor '{name}' appears twice")
            if off % align:
                raise FormatError(f"{path}: corrupt GGUF: tensor '{name}' offset {off} is not aligned to {align}")
            ti = GGUFTensorInfo(name, ne, tid, qt.name, off, nbytes)
            g.tensors[name] = ti
            infos.append(ti)
        g.data_start = (c.p + align - 1) // align * align
        expected = 0
        for ti in infos:
            if g.data_start + ti.offset + ti.nbytes > size:
                raise FormatError(f"{path}: truncated GGUF: tensor '{ti.name}' needs bytes {g.data_start + ti.offset}.."
                                  f"{g.data_start + ti.offset + ti.nbytes}, the file has {size}")
            # llama.cpp's rule: each tensor's data follows the one before, in the order of the infos,
            # padded to the alignment (else a changed type id or offset silently reads another
            # tensor's bytes, or the same bytes twice)
            if ti.offset != expected:
                raise FormatError(f"{path}: corrupt GGUF: tensor '{ti.name}' data at offset {ti.offset}, expected "
                                  f"{expected} (after the tensors before it, {ti.nbytes} bytes of {ti.type_name})")
            expected += (ti.nbytes + align - 1) // align * align
            ti.offset += g.data_start
    finally:
        mm.close()
    return g


def _loaded_dtype(ti: GGUFTensorInfo) -> torch.dtype:
    """The dtype _dequantize gives a tensor, known from its type alone."""
    return {"F16": torch.float16, "BF16": torch.bfloat16}.get(ti.type_name, torch.float32)


def _dequantize(raw: np.ndarray, ti: GGUFTensorInfo) -> torch.Tensor:
    shape = ti.shape
    t = ti.type_name
    if t == "F32":
        return torch.from_numpy(raw.view("<f4").astype(np.float32).reshape(shape))
    if t == "F16":
        return torch.from_numpy(raw.view("<f2").astype(np.float16).reshape(shape))
    if t == "BF16":
        return torch.from_numpy(raw.view("<i2").astype(np.int16).reshape(shape)).view(torch.bfloat16)
    if t == "F64":
        return torch.from_numpy(raw.view("<f8").astype(np.float32).reshape(shape))
    if t == "Q1_0":  # d (fp16) + 128 sign bits: value = +d for a set bit, -d otherwise
        b = raw.reshape(-1, 18)
        d = b[:, :2].copy().view(np.float16).astype(np.float32)
        bits = np.unpackbits(b[:, 2:], axis=1, bitorder="little").astype(np.float32)
        return torch.from_numpy(((bits * 2 - 1) * d).reshape(shape))
    from gguf.quants import dequantize
    try:
        out = dequantize(raw.reshape(-1, raw.size // max(1, int(np.prod(shape[:-1])))), _qtype(t))
    except NotImplementedError:
        raise FormatError(f"tensor '{ti.name}' is stored as {t}, which rwkvtools cannot dequantize") from None
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32).reshape(shape))


class _Data:
    def __init__(self, g: GGUFFile):
        self.g = g
        self._f = open(g.path, "rb")
        self._mm = mmap.mmap(self._f.fileno(), 0, access=mmap.ACCESS_READ)

    def tensor(self, name: str) -> torch.Tensor:
        ti = self.g.tensors[name]
        raw = np.frombuffer(self._mm, dtype=np.uint8, count=ti.nbytes, offset=ti.offset).copy()
        return _dequantize(raw, ti)


def _kv_int(g: GGUFFile, key: str, default=None) -> int:
    v = g.kv.get(key, default)
    if v is None:
        raise FormatError(f"{g.path}: GGUF metadata '{key}' is missing")
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 0:
        raise FormatError(f"{g.path}: GGUF metadata '{key}' = {v!r} is not a non-negative integer")
    return int(v)


def read_gguf(path: str) -> Checkpoint:
    """Read an rwkv6/rwkv7 GGUF into a BlinkDL training-form checkpoint (lazy, dequantized)."""
    from ..spec import detect
    g = parse_gguf(path)
    arch = g.kv.get("general.architecture")
    if not isinstance(arch, str):
        raise FormatError(f"{path}: GGUF metadata 'general.architecture' is a {type(arch).__name__}, not a string")
    if arch not in ("rwkv6", "rwkv7"):
        extra = " (a hybrid with Qwen/RMSNorm parts, not a BlinkDL layout)" if arch in ("rwkv6qwen2", "arwkv7") else ""
        raise FormatError(f"{path}: GGUF architecture '{arch}'{extra} is not supported; rwkvtools reads rwkv6 and rwkv7")
    C = _kv_int(g, f"{arch}.embedding_length")
    L = _kv_int(g, f"{arch}.block_count")
    N = _kv_int(g, f"{arch}.wkv.head_size")
    if N == 0 or C % N:
        raise FormatError(f"{path}: GGUF head size {N} does not divide the embedding length {C}")
    H = C // N
    R = _kv_int(g, "rwkv6.rescale_every_n_layers", 0) if arch == "rwkv6" else 0
    shift = _kv_int(g, f"{arch}.token_shift_count", 2)
    if shift != 2:
        raise FormatError(f"{path}: {arch}.token_shift_count = {shift}; BlinkDL RWKV layouts have 2")
    data = _Data(g)
    plan: dict[str, tuple[tuple, Callable[[], torch.Tensor], torch.dtype]] = {}
    used: set[str] = set()

    def need(gname: str, size: int | None = None) -> GGUFTensorInfo:
        ti = g.tensors.get(gname)
        if ti is None:
            raise FormatError(f"{path}: GGUF tensor '{gname}' is missing")
        if size is not None and int(np.prod(ti.ne)) != size:
            raise FormatError(f"{path}: GGUF tensor '{gname}' has shape {ti.ne} (ggml order), expected {size} values")
        used.add(gname)
        return ti

    def put(name: str, gname: str, shape: tuple | None = None, fn=None, size_check=True, recomputed=False):
        ti = need(gname)
        shape = tuple(shape) if shape is not None else ti.shape
        if size_check and int(np.prod(ti.ne)) != int(np.prod(shape)):
            raise FormatError(f"{path}: GGUF tensor '{gname}' has shape {ti.ne} (ggml order); expected "
                              f"{int(np.prod(shape))} values for '{name}' {shape}")

        def load(gname=gname, shape=shape, fn=fn):
            t = data.tensor(gname)
            if fn is not None:
                t = fn(t)
            return t.reshape(shape).contiguous()
        plan[name] = (shape, load, torch.float32 if recomputed else _loaded_dtype(ti))

    def transposed(name: str, gname: str):
        ti = need(gname)
        if len(ti.shape) != 2:
            raise FormatError(f"{path}: GGUF tensor '{gname}' should be 2-D, has ggml shape {ti.ne}")
        put(name, gname, (ti.shape[1], ti.shape[0]), lambda t: t.t())

    def split(names: list[str], gname: str):
        k = len(names)
        ti = need(gname)
        if int(np.prod(ti.ne)) != k * C:
            raise FormatError(f"{path}: GGUF tensor '{gname}' has ggml shape {ti.ne}, expected {k} x {C} values")
        for j, n in enumerate(names):
            plan[n] = ((1, 1, C), lambda gname=gname, j=j: data.tensor(gname).reshape(k, C)[j].reshape(1, 1, C).clone(),
                       _loaded_dtype(ti))

    put("emb.weight", "token_embd.weight")
    V = g.tensors["token_embd.weight"].shape[0]
    for w in ("weight", "bias"):
        put(f"blocks.0.ln0.{w}", f"token_embd_norm.{w}", (C,))
        put(f"ln_out.{w}", f"output_norm.{w}", (C,))
    put("head.weight", "output.weight")
    for i in range(L):
        a, f, b = f"blocks.{i}.att.", f"blocks.{i}.ffn.", f"blk.{i}."
        for ln, gn in (("ln1", "attn_norm"), ("ln2", "attn_norm_2")):
            for w in ("weight", "bias"):
                put(f"blocks.{i}.{ln}.{w}", f"{b}{gn}.{w}", (C,))
        put(a + "ln_x.weight", b + "time_mix_ln.weight", (C,))
        put(a + "ln_x.bias", b + "time_mix_ln.bias", (C,))
        scale = 2.0 ** (i // R) if R > 0 else 1.0
        undo = (lambda t, s=scale: t.float() * s) if scale != 1.0 else None
        if arch == "rwkv7":
            split([a + x for x in V7_LERP], b + "time_mix_lerp_fused.weight")
            for p in ("w", "a", "v", "g"):
                if p == "v" and i == 0:  # dummies llama.cpp requires; BlinkDL layer 0 has none in use
                    for s in ("0", "1", "2"):
                        if b + f"time_mix_v{s}.weight" in g.tensors:
                            used.add(b + f"time_mix_v{s}.weight")
                    continue
                if p != "g":
                    put(a + f"{p}0", b + f"time_mix_{p}0.weight", (1, 1, C))
                transposed(a + f"{p}1", b + f"time_mix_{p}1.weight")
                transposed(a + f"{p}2", b + f"time_mix_{p}2.weight")
            put(a + "k_k", b + "time_mix_k_k.weight", (1, 1, C))
            put(a + "k_a", b + "time_mix_k_a.weight", (1, 1, C))
            put(a + "r_k", b + "time_mix_r_k.weight", (H, N))
            for lin in ("key", "value", "receptance"):
                put(a + f"{lin}.weight", b + f"time_mix_{lin}.weight")
            put(a + "output.weight", b + "time_mix_output.weight", fn=undo, recomputed=undo is not None)
            put(f + "x_k", b + "channel_mix_lerp_k.weight", (1, 1, C))
            put(f + "key.weight", b + "channel_mix_key.weight")
            put(f + "value.weight", b + "channel_mix_value.weight", fn=undo, recomputed=undo is not None)
        else:
            put(a + "time_maa_x", b + "time_mix_lerp_x.weight", (1, 1, C))
            if b + "time_mix_lerp_fused.weight" in g.tensors:
                split([a + x for x in V6_LERP], b + "time_mix_lerp_fused.weight")
            else:  # the five separate tensors llama.cpp also accepts
                for x in V6_LERP:
                    put(a + x, b + f"time_mix_lerp_{x[-1]}.weight", (1, 1, C))
            transposed(a + "time_maa_w1", b + "time_mix_w1.weight")
            ti = need(b + "time_mix_w2.weight")
            if len(ti.shape) != 3:
                raise FormatError(f"{path}: GGUF tensor '{ti.name}' should be 3-D, has ggml shape {ti.ne}")
            n5, cc, d = ti.shape
            put(a + "time_maa_w2", ti.name, (n5, d, cc), lambda t: t.transpose(1, 2))
            put(a + "time_decay", b + "time_mix_decay.weight", (1, 1, C))
            transposed(a + "time_decay_w1", b + "time_mix_decay_w1.weight")
            transposed(a + "time_decay_w2", b + "time_mix_decay_w2.weight")
            put(a + "time_faaaa", b + "time_mix_first.weight", (H, N))
            for lin in ("key", "value", "receptance", "gate"):
                put(a + f"{lin}.weight", b + f"time_mix_{lin}.weight")
            put(a + "output.weight", b + "time_mix_output.weight", fn=undo, recomputed=undo is not None)
            put(f + "time_maa_k", b + "channel_mix_lerp_k.weight", (1, 1, C))
            put(f + "time_maa_r", b + "channel_mix_lerp_r.weight", (1, 1, C))
            put(f + "key.weight", b + "channel_mix_key.weight")
            put(f + "receptance.weight", b + "channel_mix_receptance.weight")
            put(f + "value.weight", b + "channel_mix_value.weight", fn=undo, recomputed=undo is not None)
    extra = sorted(set(g.tensors) - used)
    if extra:
        raise FormatError(f"{path}: GGUF holds tensor(s) an {arch} model does not have: {', '.join(extra[:8])}")

    manifest = _stored_manifest(g)
    types: dict[str, int] = {}
    for ti in g.tensors.values():
        types[ti.type_name] = types.get(ti.type_name, 0) + 1
    def plain(key):  # descriptive fields: kept when they have the type GGUF gives them, else dropped
        v = g.kv.get(key)
        return int(v) if isinstance(v, (int, np.integer)) and not isinstance(v, bool) else v if isinstance(v, str) else None
    manifest["source_format"] = {"format": "gguf", "gguf_version": g.version, "architecture": arch,
                                 "file_type": plain("general.file_type"), "tensor_types": types,
                                 "tokenizer": plain("tokenizer.ggml.model"), "name": plain("general.name"),
                                 **({"rescale_every_n_layers": R} if arch == "rwkv6" else {})}  # rwkv7 has no such key
    names = list(plan)
    # dtypes known without loading (a query loaded and dequantized the tensor)
    ck = Checkpoint(LazyTensors(names, lambda k: plan[k][1](), {k: plan[k][0] for k in names},
                                {k: plan[k][2] for k in names}), manifest, source=path)
    spec = detect(ck.tensors, ck.manifest)  # validates the result (raises a SpecError naming the problem)
    if spec.vocab != V or spec.n_layer != L:
        raise FormatError(f"{path}: GGUF metadata disagrees with its tensors")
    ntok = g.kv.get("tokenizer.ggml.tokens")
    if isinstance(ntok, list) and len(ntok) != V:
        raise FormatError(f"{path}: GGUF tokenizer has {len(ntok)} tokens but the embedding has {V} rows")
    return ck


def _stored_manifest(g: GGUFFile) -> dict:
    raw = g.kv.get(MANIFEST_KEY)
    m = default_manifest()
    if isinstance(raw, str) and len(raw) < (1 << 24):
        try:
            m.update(parse_manifest(raw, g.path))
        except FormatError:
            pass  # a damaged manifest costs only the history: the tensors are read without it
    m["form"] = "parallel"
    return m


def gguf_tensor_table(path: str) -> list[dict]:
    """name, torch shape, ggml ne and type of every tensor (for inspection and tests)."""
    g = parse_gguf(path)
    return [{"name": t.name, "shape": list(t.shape), "ne": list(t.ne), "type": t.type_name}
            for t in g.tensors.values()]


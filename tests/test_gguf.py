"""GGUF (llama.cpp rwkv6/rwkv7): K-quant blocks, writer layout against llama.cpp's own converter,
lossless round trips, quantized files, pre-quantized blocks, hostile files, and (marker
``llamacpp``) logits computed by llama.cpp itself through llama-cpp-python."""
import hashlib
import json
import pathlib
import struct

import numpy as np
import pytest
import torch

import gguf  # a runtime dependency of rwkvtools (setup.py): missing it is a failure, not a skip
from gguf import GGMLQuantizationType as GT  # noqa: E402
from gguf.quants import dequantize as gguf_dequantize  # noqa: E402

from rwkvtools.checkpoint import Checkpoint  # noqa: E402
from rwkvtools.errors import FormatError, RwkvToolsError  # noqa: E402
from rwkvtools.io import ggml_quants, kquants, read_checkpoint  # noqa: E402
from rwkvtools.io.gguf_io import parse_gguf, read_gguf, write_gguf  # noqa: E402
from rwkvtools.io.writers import write_checkpoint  # noqa: E402
from rwkvtools.random_init import random_checkpoint  # noqa: E402

from conftest import fixture_path  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
REFERENCE = json.loads((HERE / "data" / "gguf_converter_reference.json").read_text())
LLAMA_LARGE = ("time_mix_receptance", "time_mix_key", "time_mix_value", "time_mix_gate", "time_mix_output",
               "channel_mix_key", "channel_mix_value", "channel_mix_receptance")


def _reader_fields(path):
    """metadata {key: value}, arrays {key: list}, tensors {name: (ne, type)} via gguf.GGUFReader
    (llama.cpp's own reader, independent of the code under test)."""
    g = gguf.GGUFReader(str(path))
    meta, arrays = {}, {}
    for k, f in g.fields.items():
        if k.startswith("GGUF."):
            continue
        if f.types[0] == gguf.GGUFValueType.ARRAY:
            arrays[k] = f.contents()
        else:
            meta[k] = (f.types[0].name, f.contents())
    tensors = {t.name: ([int(x) for x in t.shape], t.tensor_type.name) for t in g.tensors}
    return meta, arrays, tensors, g


def _parsed_fields(path):
    """The same as _reader_fields through rwkvtools' own parser (fast on 65536-token vocabularies;
    test_parser_agrees_with_gguf_reader checks it against gguf.GGUFReader)."""
    g = parse_gguf(str(path))
    meta = {k: (g.kv_types[k], v) for k, v in g.kv.items() if g.kv_types[k] != "ARRAY"}
    arrays = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in g.kv.items() if g.kv_types[k] == "ARRAY"}
    tensors = {t.name: (list(t.ne), t.type_name) for t in g.tensors.values()}
    return meta, arrays, tensors, g


def _sha(values):
    return hashlib.sha256(json.dumps(values, ensure_ascii=False).encode()).hexdigest()


def _unescape(text: str) -> bytes:
    """llama.cpp's rwkv tokenizer un-escaping (llama-vocab.cpp): \\t \\n \\r, \\xNN with lowercase hex
    digits, and \\<c> -> c; everything else as its UTF-8 bytes."""
    out, i = bytearray(), 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            nx = text[i + 1]
            if nx in "tnr":
                out += {"t": b"\t", "n": b"\n", "r": b"\r"}[nx]
                i += 2
                continue
            if nx == "x" and i + 3 < len(text) + 0 and all(c in "0123456789abcdef" for c in text[i + 2:i + 4]):
                out.append(int(text[i + 2:i + 4], 16))
                i += 4
                continue
            out += nx.encode()
            i += 2
            continue
        out += ch.encode()
        i += 1
    return bytes(out)


# ------------------------------------------------------------------------------------------ K-quants
@pytest.mark.parametrize("qtype", kquants.KQUANT_TYPES)
def test_kquant_blocks_decode_with_gguf(qtype):
    """Our packing, decoded by the gguf package, gives exactly grid step * level - offset, and the
    round-trip error is what the bit width allows."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((24, 512)) * 0.05).astype(np.float32)
    x[1, :256] = 0.0          # all-zero super-block
    x[2, :256] = 0.25         # constant super-block
    x[3] *= 400.0             # a large-scale row
    x[4, 5] = 3.0             # an outlier
    grid = kquants.kquant_grid(qtype, x)
    L = kquants.kquant_levels(grid, x)
    raw = kquants.kquant_pack(grid, L)
    assert raw.size == x.size // 256 * kquants.TYPE_SIZE[qtype]
    y = gguf_dequantize(raw.reshape(-1, kquants.TYPE_SIZE[qtype]), GT[qtype]).reshape(-1, 256)
    q = L.astype(np.float32) - (32 if qtype == "Q6_K" else 0)
    expect = grid.step * q - grid.offset
    np.testing.assert_allclose(y, expect, rtol=1e-6, atol=1e-7)
    xb = x.reshape(-1, 256)
    assert np.abs(y[2]).max() == 0  # row 1's first super-block (block 2) is all zero: stays zero
    err = np.sqrt(((y - xb) ** 2).mean(axis=1)) / np.maximum(xb.std(axis=1), 1e-12)
    bound = {"Q4_K": 0.12, "Q5_K": 0.06, "Q6_K": 0.03}[qtype]
    gaussian = [i for i in range(xb.shape[0]) if i not in (2, 4, 5, 6, 7, 8, 9)]
    assert err[gaussian].max() < bound
    assert np.abs(y[4] - 0.25).max() < 0.25 * 0.02  # constant block reproduced closely
    # quantize() is the three steps chained
    assert np.array_equal(kquants.quantize(qtype, x), raw)


def test_q1_0_blocks_decode_to_plus_minus_d():
    """Q1_0 (which the gguf package cannot dequantize): per 128 values an fp16 d and 128 sign bits
    (bit j of the little-endian bit stream), value +d for a set bit and -d otherwise."""
    from types import SimpleNamespace

    from rwkvtools.io.gguf_io import _dequantize
    bits = np.random.default_rng(0).integers(0, 2, (3, 128)).astype(np.uint8)
    d = np.array([0.5, -2.0, 3e-3], np.float16)
    raw = np.concatenate([d.view(np.uint8).reshape(3, 2), np.packbits(bits, axis=1, bitorder="little")], 1)
    out = _dequantize(raw.reshape(-1), SimpleNamespace(shape=(3, 128), type_name="Q1_0", name="t"))
    expect = np.where(bits == 1, 1.0, -1.0).astype(np.float32) * d.astype(np.float32)[:, None]
    assert np.array_equal(out.numpy(), expect)


def test_kquant_rejects_bad_input():
    with pytest.raises(ValueError, match="multiple"):
        kquants.quantize("Q4_K", np.zeros(100, np.float32))
    with pytest.raises(ValueError, match="non-finite"):
        kquants.quantize("Q6_K", np.full(256, np.nan, np.float32))
    with pytest.raises(ValueError, match="unknown"):
        kquants.quantize("Q3_K", np.zeros(256, np.float32))


# ------------------------------------------------------------------------------ writer vs converter
def _compare_to_converter(ours_path, case, check_tokens, fields=_reader_fields):
    ref = REFERENCE[case]
    meta, arrays, tensors, _ = fields(ours_path)
    ref_tensors = {k: (v["ne"], v["type"]) for k, v in ref["tensors"].items()}
    assert set(tensors) == set(ref_tensors), (set(tensors) ^ set(ref_tensors))
    for k, v in ref_tensors.items():
        assert tensors[k] == v, (k, tensors[k], v)
    skip = {"general.name", "general.version", "general.size_label", "tokenizer.chat_template", "rwkvtools.manifest"}
    ref_meta = {k: v for k, v in ref["metadata"].items() if k not in skip}
    if not check_tokens:
        ref_meta = {k: v for k, v in ref_meta.items() if not k.startswith("tokenizer.")}
    for k, v in ref_meta.items():
        assert k in meta, f"metadata {k} missing"
        t, val = meta[k]
        assert t == v["type"], (k, t, v["type"])
        if isinstance(val, float):
            assert val == pytest.approx(v["value"], rel=1e-7), k
        else:
            assert val == v["value"], (k, val, v["value"])
    extra = set(meta) - set(ref["metadata"]) - {"rwkvtools.manifest"}
    if not check_tokens:
        extra = {k for k in extra if not k.startswith("tokenizer.")}
    assert not extra, extra
    if check_tokens:
        for k, v in ref["arrays"].items():
            assert len(arrays[k]) == v["len"], k
            assert _sha(arrays[k]) == v["sha256"], f"{k} differs from what llama.cpp's converter writes"
        assert "tokenizer.chat_template" in meta


@pytest.mark.parametrize("version,dtype", [("7", "f32"), ("7", "f16"), ("6", "f32"), ("6", "f16")])
def test_fixture_layout_matches_llamacpp_converter(tmp_path, version, dtype):
    src = fixture_path("tiny-rwkv-7v0-834K.pth" if version == "7" else "tiny-rwkv-6v0-3m-Q5_1.bin")
    out = tmp_path / "m.gguf"
    write_gguf(read_checkpoint(src), str(out), dtype=dtype)
    _compare_to_converter(out, f"v{version}_fixture_{dtype}", check_tokens=False)


@pytest.mark.parametrize("version", ["7", "6"])
def test_world_vocab_metadata_matches_llamacpp_converter(tmp_path, version):
    """A random V=65536 model gets the World vocabulary exactly as llama.cpp's converter writes it
    (token texts, types, special ids), and the same tensor layout."""
    small = (random_checkpoint("7", n_layer=2, n_embd=64, head_size=64, vocab=8, seed=3) if version == "7"
             else random_checkpoint("6", n_layer=2, n_embd=64, head_size=32, vocab=8, seed=4))
    t = dict(small.tensors)
    t["emb.weight"] = torch.zeros(65536, 64)  # only the layout and metadata matter here
    t["head.weight"] = torch.zeros(65536, 64)
    ck = Checkpoint(t, small.manifest)
    out = tmp_path / "w.gguf"
    rep = write_gguf(ck, str(out))
    assert rep["tokenizer"] == "world"
    _compare_to_converter(out, f"v{version}_world_random_f32", check_tokens=True, fields=_parsed_fields)


def test_byte_vocab_is_the_identity_on_bytes(tmp_path, shared):
    out = tmp_path / "b.gguf"
    write_gguf(read_checkpoint(fixture_path("tiny-rwkv-7v0-834K.pth")), str(out))
    meta, arrays, _, _ = _reader_fields(out)
    assert meta["tokenizer.ggml.model"][1] == "rwkv"
    toks = arrays["tokenizer.ggml.tokens"]
    assert len(toks) == 256 and len(set(toks)) == 256 and all(toks)
    assert [_unescape(t) for t in toks] == [bytes([b]) for b in range(256)]
    assert all(t == 1 for t in arrays["tokenizer.ggml.token_type"])  # NORMAL: no special tokens
    # llama.cpp decodes only lowercase hex digits
    assert not any(c in "ABCDEF" for t in toks if t.startswith("\\x") for c in t[2:])


# -------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("version", ["6", "7"])
@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
def test_roundtrip_per_version_and_dtype(tmp_path, tiny_models, version, dtype):
    ck = tiny_models[version]
    out = tmp_path / f"m-{dtype}.gguf"
    rep = write_checkpoint(ck, str(out), dtype=dtype, tokenizer="none")
    assert rep == "gguf"
    back = read_checkpoint(str(out))
    names = set(ck.tensors)
    if version == "7":
        names -= {"blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"}
    assert set(back.tensors) == names
    cast = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[dtype]
    meta, _, tensors, _ = _reader_fields(out)
    gname_type = {}
    for name, (_, t) in tensors.items():
        gname_type[name] = t
    for k in names:
        a, b = ck.tensors[k], back.tensors[k]
        assert tuple(b.shape) == tuple(a.shape), k
        lossy = a.dim() == 2 and not any(s in k for s in ("time_maa_w1", "time_decay_w", ".w1", ".w2", "r_k",
                                                           "time_faaaa"))
        if dtype == "f32" or not lossy:
            assert torch.equal(b.float(), a.float()), k
        else:
            assert torch.equal(b.float(), a.to(cast).float()), k
    # dtype rules: 1-D, norms, lerp, decay/bonus and the v6 / v7-decay LoRA are F32 in every file
    for name, t in gname_type.items():
        if any(s in name for s in ("norm", "lerp", "first", "decay", "_w0", "_w1", "_w2", "_a0", "_v0", "k_k",
                                   "k_a", "r_k", "time_mix_ln")):
            assert t == "F32", name
    assert meta["tokenizer.ggml.model"][1] == "none"


def test_v7_single_layer_and_lowrank_linear_are_densified(tmp_path):
    ck = random_checkpoint("7", n_layer=1, n_embd=64, head_size=16, vocab=256, seed=1)
    t = dict(ck.tensors)
    w = t.pop("blocks.0.ffn.key.weight")
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    t["blocks.0.ffn.key.weight_u"] = (u[:, :16] * s[:16]).contiguous()
    t["blocks.0.ffn.key.weight_v"] = vh[:16].contiguous()
    out = tmp_path / "lr.gguf"
    write_gguf(Checkpoint(t, ck.manifest), str(out))
    back = read_gguf(str(out))
    dense = t["blocks.0.ffn.key.weight_u"] @ t["blocks.0.ffn.key.weight_v"]
    assert torch.allclose(back.tensors["blocks.0.ffn.key.weight"], dense, atol=1e-6)
    meta, _, _, _ = _reader_fields(out)
    assert meta["rwkv7.attention.value_residual_mix_lora_rank"][1] > 0


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_legacy_quant_blocks_are_ggml_reference_bytes(tmp_path, tiny_models, qtype):
    """The 32-value blocks in our files equal rwkvtools' independent ggml reference quantizer
    (io/ggml_quants.py, checked against rwkv.cpp's files) byte for byte; embedding/head stay F32."""
    ck = tiny_models["7"]
    out = tmp_path / "q.gguf"
    rep = write_gguf(ck, str(out), quant=qtype, tokenizer="none")
    assert rep["quant"] == qtype and not rep["fallbacks"]
    _, _, tensors, g = _reader_fields(out)
    by_name = {t.name: t for t in g.tensors}
    n_quant = 0
    for i in range(3):
        for gname, src in (("time_mix_key", "att.key"), ("channel_mix_value", "ffn.value")):
            t = by_name[f"blk.{i}.{gname}.weight"]
            assert t.tensor_type.name == qtype
            want = ggml_quants.quantize(qtype, ck.tensors[f"blocks.{i}.{src}.weight"].numpy())
            assert np.array_equal(np.asarray(t.data).reshape(-1), want)
            n_quant += 1
    assert by_name["token_embd.weight"].tensor_type.name == "F32"
    assert by_name["output.weight"].tensor_type.name == "F32"
    large = [n for n, (_, t) in tensors.items() if any(s in n for s in LLAMA_LARGE)]
    assert all(tensors[n][1] == qtype for n in large) and len(large) == 3 * 6
    back = read_gguf(str(out))
    w = ck.tensors["blocks.1.att.value.weight"].numpy()
    deq = ggml_quants.dequantize(qtype, ggml_quants.quantize(qtype, w), w.size).reshape(w.shape)
    assert np.array_equal(back.tensors["blocks.1.att.value.weight"].numpy(), deq)


@pytest.mark.parametrize("qtype", kquants.KQUANT_TYPES)
def test_kquant_file_and_fallbacks(tmp_path, qtype):
    """Rows of 256 get the K-quant; rows of 64 are demoted the way llama.cpp's quantizer does."""
    ck = random_checkpoint("7", n_layer=2, n_embd=64, head_size=16, vocab=256, seed=2)  # ffn.value rows: 256
    out = tmp_path / "k.gguf"
    rep = write_gguf(ck, str(out), quant=qtype, embed_type="f16", head_type=qtype)
    demoted = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}[qtype]
    _, _, tensors, _ = _reader_fields(out)
    assert tensors["blk.0.channel_mix_value.weight"][1] == qtype
    assert tensors["blk.0.time_mix_key.weight"][1] == demoted
    assert tensors["token_embd.weight"][1] == "F16"
    assert tensors["output.weight"][1] == demoted  # head rows are C = 64 too
    assert {f["written"] for f in rep["fallbacks"]} == {demoted}
    back = read_gguf(str(out))
    w = ck.tensors["blocks.1.ffn.value.weight"].numpy()
    assert np.array_equal(back.tensors["blocks.1.ffn.value.weight"].numpy(),
                          kquants.dequantize(qtype, kquants.quantize(qtype, w)).reshape(w.shape))


def test_prequantized_blocks_are_written_as_given(tmp_path):
    ck = random_checkpoint("7", n_layer=2, n_embd=64, head_size=16, vocab=256, seed=5)
    other = torch.randn(256, 64) * 0.1  # deliberately not the checkpoint's weights
    key_blocks = gguf.quants.quantize(other.numpy(), GT.Q4_0)
    w = torch.randn(64, 256) * 0.05
    val_blocks = kquants.quantize("Q6_K", w.numpy())
    out = tmp_path / "pre.gguf"
    rep = write_gguf(ck, str(out), quant="Q8_0", blocks={"blocks.1.ffn.key.weight": ("Q4_0", key_blocks),
                                                          "blk.0.channel_mix_value.weight": (GT.Q6_K, val_blocks)})
    assert rep["prequantized"] == ["blk.0.channel_mix_value.weight", "blk.1.channel_mix_key.weight"]
    back = read_gguf(str(out))
    np.testing.assert_array_equal(back.tensors["blocks.1.ffn.key.weight"].numpy(),
                                  gguf_dequantize(key_blocks, GT.Q4_0).reshape(256, 64))
    np.testing.assert_array_equal(back.tensors["blocks.0.ffn.value.weight"].numpy(),
                                  kquants.dequantize("Q6_K", val_blocks).reshape(64, 256))
    _, _, tensors, _ = _reader_fields(out)
    assert tensors["blk.0.channel_mix_key.weight"][1] == "Q8_0"
    for bad, msg in (({"blocks.0.att.w1": ("Q8_0", key_blocks)}, "not a matrix"),
                     ({"blocks.1.ffn.key.weight": ("Q4_0", key_blocks[:-1])}, "bytes"),
                     ({"blocks.1.ffn.key.weight": ("Q4_K", key_blocks)}, "block size"),
                     ({"blocks.1.ffn.key.weight": ("Q9_9", key_blocks)}, "unknown ggml type")):
        dst = tmp_path / "bad.gguf"
        with pytest.raises(RwkvToolsError, match=msg):
            write_gguf(ck, str(dst), blocks=bad)
        assert not dst.exists()


def test_blocks_carried_by_a_quantized_checkpoint_are_used(tmp_path):
    """rwkvtools' quantize transform returns tensors with ``ggml_blocks`` (torch row order): the
    writer takes those GGUF can hold quantized and writes the rest from their values."""
    from rwkvtools.checkpoint import LazyTensors
    ck = random_checkpoint("7", n_layer=2, n_embd=64, head_size=16, vocab=256, seed=6)
    w = torch.randn(64, 64) * 0.1
    blocks = {"blocks.0.att.key.weight": ("Q4_0", gguf.quants.quantize(w.numpy(), GT.Q4_0)),
              "blocks.0.att.w1": ("Q8_0", np.zeros(1, np.uint8))}  # not a GGUF matrix: ignored here

    class WithBlocks(LazyTensors):
        ggml_blocks = blocks
    names = list(ck.tensors)
    t = WithBlocks(names, lambda k: ck.tensors[k], {k: tuple(ck.tensors[k].shape) for k in names})
    out = tmp_path / "qb.gguf"
    rep = write_gguf(Checkpoint(t, ck.manifest), str(out))
    assert rep["prequantized"] == ["blk.0.time_mix_key.weight"]
    back = read_gguf(str(out))
    np.testing.assert_array_equal(back.tensors["blocks.0.att.key.weight"].numpy(),
                                  gguf_dequantize(blocks["blocks.0.att.key.weight"][1], GT.Q4_0).reshape(64, 64))
    assert torch.equal(back.tensors["blocks.0.att.w1"], ck.tensors["blocks.0.att.w1"])


def test_dtype_defaults_to_the_checkpoints_own(tmp_path, tiny_models):
    from rwkvtools.transforms.convert import cast
    out = tmp_path / "h.gguf"
    rep = write_gguf(cast(tiny_models["7"], "fp16"), str(out), tokenizer="none")
    assert rep["dtype"] == "f16"
    _, _, tensors, _ = _reader_fields(out)
    assert tensors["blk.0.time_mix_key.weight"][1] == "F16" and tensors["token_embd.weight"][1] == "F16"
    assert tensors["blk.0.time_mix_w1.weight"][1] == "F32"


def test_manifest_history_survives(tmp_path, tiny_models):
    ck = tiny_models["7"]
    ck2 = ck.with_tensors(ck.tensors, entry={"transform": "test-step", "options": {"a": 1}})
    out = tmp_path / "h.gguf"
    write_gguf(ck2, str(out), tokenizer="none")
    back = read_checkpoint(str(out))
    assert back.manifest["history"][-1]["transform"] == "test-step"
    assert back.manifest["source_format"]["format"] == "gguf"
    assert back.manifest["source_format"]["architecture"] == "rwkv7"


@pytest.mark.parametrize("stored", [np.float32, np.float16])
def test_v6_rescaled_file_is_undone_on_read(tmp_path, tiny_models, stored):
    """llama.cpp's converter writes time_mix_output / channel_mix_value of layer i divided by
    2^(i // R) when rescale_every_n_layers = R > 0; reading must give the training weights back
    (and, stored as F16, the dtype the reader states without loading is the one loading gives)."""
    ck = tiny_models["6"]
    plain = tmp_path / "p.gguf"
    write_gguf(ck, str(plain), tokenizer="none")
    meta, arrays, tensors, g = _reader_fields(plain)
    R = 2
    resc = tmp_path / "r.gguf"
    w = gguf.GGUFWriter(str(resc), "rwkv6")
    for k, (t, v) in meta.items():
        if k in ("general.architecture",) or t == "STRING" and k == "rwkvtools.manifest":
            continue
        if k == "rwkv6.rescale_every_n_layers":
            v = R
        {"UINT32": w.add_uint32, "FLOAT32": w.add_float32, "STRING": w.add_string}[t](k, v)
    for t in g.tensors:
        data = np.asarray(t.data).copy()
        m = __import__("re").match(r"blk\.(\d+)\.(time_mix_output|channel_mix_value)\.weight", t.name)
        if m:
            data = data / 2.0 ** (int(m.group(1)) // R)
        w.add_tensor(t.name, data.astype(stored if data.ndim > 1 else np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    back = read_gguf(str(resc))
    assert back.manifest["source_format"]["rescale_every_n_layers"] == R
    for k in ck.tensors:
        assert back.tensors.dtype(k) == back.tensors[k].dtype, k
        if stored is np.float32:
            assert torch.equal(back.tensors[k], ck.tensors[k]), k
    assert back.tensors.dtype("blocks.2.ffn.value.weight") == torch.float32          # rescaled: recomputed
    assert back.tensors.dtype("blocks.2.ffn.key.weight") == (torch.float32 if stored is np.float32 else torch.float16)


# ------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("version", ["4", "5.2"])
def test_v4_v5_are_refused_with_the_formats_that_serve_them(tmp_path, tiny_models, version):
    out = tmp_path / "x.gguf"
    with pytest.raises(RwkvToolsError) as e:
        write_gguf(tiny_models[version], str(out))
    msg = str(e.value)
    assert "rwkv6" in msg and "rwkv7" in msg and ".safetensors" in msg and "rwkv.cpp" in msg
    assert not out.exists() and not list(tmp_path.iterdir())


def test_unknown_vocab_needs_a_tokenizer_choice(tmp_path, tiny_models):
    out = tmp_path / "x.gguf"
    with pytest.raises(RwkvToolsError, match="tokenizer 'none'"):
        write_gguf(tiny_models["7"], str(out))  # vocab 97: neither bytes nor World
    assert not out.exists() and not list(tmp_path.iterdir())
    with pytest.raises(RwkvToolsError, match="dtype"):
        write_gguf(tiny_models["7"], str(out), dtype="fp8", tokenizer="none")
    with pytest.raises(RwkvToolsError, match="quant type"):
        write_gguf(tiny_models["7"], str(out), quant="IQ2_XS", tokenizer="none")
    assert not list(tmp_path.iterdir())


def test_tensor_without_a_place_in_llamacpp_is_refused(tmp_path, tiny_models):
    ck = tiny_models["6"]
    t = dict(ck.tensors)
    t["blocks.0.att.time_state"] = torch.zeros(4, 16, 16)
    out = tmp_path / "x.gguf"
    with pytest.raises(RwkvToolsError, match="time_state"):
        write_gguf(Checkpoint(t, ck.manifest), str(out), tokenizer="none")
    assert not out.exists()


def test_existing_output_is_untouched_on_failure(tmp_path, tiny_models):
    out = tmp_path / "keep.gguf"
    out.write_bytes(b"previous")
    with pytest.raises(RwkvToolsError):
        write_gguf(tiny_models["5.2"], str(out))
    assert out.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.gguf"]


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory):
    ck = random_checkpoint("7", n_layer=1, n_embd=32, head_size=16, vocab=256, seed=9)
    p = tmp_path_factory.mktemp("g") / "s.gguf"
    write_gguf(ck, str(p), quant="Q8_0")
    return p


def test_parser_agrees_with_gguf_reader(small_gguf):
    ours = parse_gguf(str(small_gguf))
    g = gguf.GGUFReader(str(small_gguf))
    assert [t.name for t in g.tensors] == list(ours.tensors)
    for t in g.tensors:
        o = ours.tensors[t.name]
        assert list(o.ne) == [int(x) for x in t.shape] and o.type_name == t.tensor_type.name
        assert o.offset == int(t.data_offset) and o.nbytes == int(t.n_bytes)
    assert ours.kv["general.architecture"] == "rwkv7"
    assert ours.kv["tokenizer.ggml.tokens"] == g.fields["tokenizer.ggml.tokens"].contents()
    for k, f in g.fields.items():
        if not k.startswith("GGUF."):
            assert ours.kv_types[k] == f.types[0].name, k
            if f.types[0] != gguf.GGUFValueType.ARRAY:
                assert ours.kv[k] == f.contents(), k
            else:
                assert list(np.asarray(ours.kv[k]).tolist()) == list(f.contents()), k


def _kv_region_end(raw: bytes) -> int:
    """Byte offset where the metadata ends (first tensor-info record)."""
    n_kv = struct.unpack_from("<Q", raw, 16)[0]
    p = 24
    for _ in range(n_kv):
        (n,) = struct.unpack_from("<Q", raw, p)
        p += 8 + n
        (vt,) = struct.unpack_from("<I", raw, p)
        p += 4
        p = _skip_value(raw, p, vt)
    return p


def _skip_value(raw, p, vt):
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    if vt in sizes:
        return p + sizes[vt]
    if vt == 8:
        (n,) = struct.unpack_from("<Q", raw, p)
        return p + 8 + n
    et, cnt = struct.unpack_from("<IQ", raw, p)
    p += 12
    for _ in range(cnt):
        p = _skip_value(raw, p, et)
    return p


def _corruptions(raw: bytes):
    ti = _kv_region_end(raw)
    (name_len,) = struct.unpack_from("<Q", raw, ti)
    nd_at = ti + 8 + name_len
    (nd,) = struct.unpack_from("<I", raw, nd_at)
    type_at = nd_at + 4 + 8 * nd
    off_at = type_at + 4
    first_key_len_at = 24

    def patch(at, fmt, val):
        b = bytearray(raw)
        struct.pack_into(fmt, b, at, val)
        return bytes(b)
    return {
        "bad magic": (b"GGUX" + raw[4:], "not a checkpoint rwkvtools can read"),
        "version 1": (patch(4, "<I", 1), "version 1"),
        "huge tensor count": (patch(8, "<Q", 1 << 60), "cannot fit"),
        "huge metadata count": (patch(16, "<Q", 1 << 40), "cannot fit"),
        "huge key length": (patch(first_key_len_at, "<Q", 1 << 50), "limit|truncated"),
        "truncated header": (raw[:ti + 5], "truncated"),
        "truncated data": (raw[:len(raw) - 100], "truncated"),
        "too many dims": (patch(nd_at, "<I", 9), "dimensions"),
        "unknown type": (patch(type_at, "<I", 999), "type id 999"),
        "offset past end": (patch(off_at, "<Q", 1 << 40), "truncated"),
        "misaligned offset": (patch(off_at, "<Q", 3), "aligned"),
    }


@pytest.mark.parametrize("case", ["bad magic", "version 1", "huge tensor count", "huge metadata count",
                                  "huge key length", "truncated header", "truncated data", "too many dims",
                                  "unknown type", "offset past end", "misaligned offset"])
def test_corrupt_gguf_is_a_clear_error(tmp_path, small_gguf, case):
    data, msg = _corruptions(small_gguf.read_bytes())[case]
    p = tmp_path / "bad.gguf"
    p.write_bytes(data)
    with pytest.raises(FormatError, match=msg):
        read_checkpoint(str(p))


def test_corrupt_array_count_is_refused_before_allocating(tmp_path, small_gguf):
    raw = bytearray(small_gguf.read_bytes())
    key = b"tokenizer.ggml.tokens"
    at = raw.index(key) + len(key)  # value type (u32 = 9), item type (u32), count (u64)
    struct.pack_into("<Q", raw, at + 8, 1 << 58)
    p = tmp_path / "arr.gguf"
    p.write_bytes(bytes(raw))
    with pytest.raises(FormatError, match="more than the file holds"):
        read_checkpoint(str(p))


def test_non_rwkv_gguf_is_refused(tmp_path):
    p = tmp_path / "llama.gguf"
    w = gguf.GGUFWriter(str(p), "llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(FormatError, match="architecture 'llama'"):
        read_checkpoint(str(p))


def test_cli_inspect_of_corrupt_gguf_exits_2(tmp_path, small_gguf):
    from click.testing import CliRunner
    from rwkvtools.cli import main
    p = tmp_path / "bad.gguf"
    p.write_bytes(small_gguf.read_bytes()[:200])
    r = CliRunner().invoke(main, ["inspect", str(p)])
    assert r.exit_code == 2
    assert "error:" in r.output and "Traceback" not in r.output
    ok = CliRunner().invoke(main, ["inspect", str(small_gguf), "--json"])
    assert ok.exit_code == 0, ok.output
    assert '"7"' in ok.output


def test_cli_convert_to_gguf(tmp_path, shared):
    from click.testing import CliRunner
    from rwkvtools.cli import main
    r = CliRunner()
    out = tmp_path / "f16.gguf"
    res = r.invoke(main, ["convert", fixture_path("tiny-rwkv-7v0-834K.pth"), str(out), "--dtype", "fp16",
                          "--eval-tokens", "64", "--json"])
    assert res.exit_code == 0, res.output
    _, _, tensors, _ = _reader_fields(out)
    assert tensors["blk.3.channel_mix_key.weight"][1] == "F16"
    q = tmp_path / "q.gguf"
    res = r.invoke(main, ["convert", fixture_path("tiny-rwkv-7v0-834K.pth"), str(q), "--quant", "Q4_K", "--no-validate"])
    assert res.exit_code == 0, res.output
    _, _, tensors, _ = _reader_fields(q)
    assert tensors["blk.3.channel_mix_value.weight"][1] == "Q4_K"
    assert tensors["blk.3.channel_mix_key.weight"][1] == "Q5_0"  # rows of 64: llama.cpp's fallback
    # the lossy step is in the file's history (inspect said 'history (none: not written by rwkvtools)')
    assert read_checkpoint(str(q)).history[-1] == {"transform": "convert",
                                                   "options": {"format": "gguf", "quant": "Q4_K", "method": "rtn"}}
    assert read_checkpoint(str(out)).history[-1] == {"transform": "convert",
                                                     "options": {"format": "gguf", "dtype": "fp16"}}
    plain = tmp_path / "plain.gguf"
    assert r.invoke(main, ["convert", fixture_path("tiny-rwkv-7v0-834K.pth"), str(plain), "--no-validate"]).exit_code == 0
    assert read_checkpoint(str(plain)).history == []              # a lossless conversion adds nothing
    for src, msg in ((fixture_path("tiny-rwkv-4v0-660K.pth"), "rwkv6, rwkv7"),):
        bad = tmp_path / "v4.gguf"
        res = r.invoke(main, ["convert", src, str(bad), "--no-validate"])
        assert res.exit_code == 2 and msg in res.output and "Traceback" not in res.output
        assert not bad.exists()
    odd = tmp_path / "odd.safetensors"
    from rwkvtools.io.safetensors_io import write_safetensors
    write_safetensors(random_checkpoint("7", n_layer=1, n_embd=32, head_size=16, vocab=97), str(odd))
    res = r.invoke(main, ["convert", str(odd), str(tmp_path / "odd.gguf"), "--no-validate"])
    assert res.exit_code == 2 and "tokenizer" in res.output and not (tmp_path / "odd.gguf").exists()
    res = r.invoke(main, ["convert", str(odd), str(tmp_path / "odd.gguf"), "--no-validate",
                          "--writer-option", "tokenizer=none"])
    assert res.exit_code == 0, res.output


# ------------------------------------------------------------------ quantize -> GGUF (issue 11)
def _gguf_tensors(path):
    r = gguf.GGUFReader(str(path))
    return {t.name: (t.tensor_type.name, np.asarray(t.data).tobytes()) for t in r.tensors}


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_K", "Q6_K"])
def test_quantize_rtn_to_gguf_is_the_writers_bytes(tmp_path, qtype):
    """quantize(target gguf, rtn) selects llama.cpp's tensors and writes the very blocks that
    write_gguf(quant=...) writes (which equal llama.cpp's quantizer: see the llamacpp tests);
    rows of 64 fall back (Q4_K -> Q5_0, Q6_K -> Q8_0) the same way."""
    from rwkvtools.transforms.quantize import QuantizeConfig, quantize, write_quantized
    ck = random_checkpoint("7", n_layer=2, n_embd=64, head_size=16, vocab=256, seed=12)  # rows 64 and 256
    ours, ref = tmp_path / "ours.gguf", tmp_path / "ref.gguf"
    q = quantize(ck, QuantizeConfig(qtype, target="gguf"))
    assert write_quantized(q, str(ours)) == "gguf"
    write_gguf(ck, str(ref), quant=qtype)
    a, b = _gguf_tensors(ours), _gguf_tensors(ref)
    assert a.keys() == b.keys()
    diff = [n for n in a if a[n] != b[n]]
    assert not diff, diff[:5]
    types = {t for t, _ in a.values()}
    assert qtype in types
    if qtype in ("Q4_K", "Q6_K"):
        fb = {"Q4_K": "Q5_0", "Q6_K": "Q8_0"}[qtype]
        assert fb in types and set(q.manifest["quantized"]["fallbacks"].values()) == {fb}


def test_gptq_kquant_grid_packs_what_it_computed_and_beats_rtn():
    """GPTQ on a K-quant grid: the packed bytes decode (gguf's own dequantizer) to exactly the
    weights GPTQ computed with, RTN on the same grid gives ggml's reference bytes, and GPTQ's output
    error on correlated inputs is clearly below RTN's."""
    from rwkvtools.gptq import gptq, make_grid, rtn
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 512, generator=g)
    w[5, 256:] = 0.0  # an all-zero super-block
    mix = torch.randn(512, 512, generator=g) / 8 + torch.eye(512)
    X = torch.randn(4096, 512, generator=g) @ mix  # correlated inputs
    H = (X.T @ X).double()
    for qtype in kquants.KQUANT_TYPES:
        grid = make_grid(qtype)
        q, ps, dq = rtn(w, grid)
        assert np.array_equal(grid.pack(q, ps), kquants.quantize(qtype, w.numpy()))
        Q, P, D = gptq(w, H, grid)
        raw = grid.pack(Q, P)
        back = gguf_dequantize(raw.reshape(-1, kquants.TYPE_SIZE[qtype]), GT[qtype]).reshape(16, 512)
        assert np.array_equal(back, D.numpy())
        e_rtn = float(((w - dq) @ X.T).norm())
        e_gptq = float(((w - D) @ X.T).norm())
        assert e_gptq < 0.9 * e_rtn, (qtype, e_gptq, e_rtn)


def test_cli_quantize_to_gguf(tmp_path, shared):
    from click.testing import CliRunner
    from rwkvtools.cli import main
    r = CliRunner()
    src = fixture_path("tiny-rwkv-7v0-834K.pth")
    out = tmp_path / "q4k.gguf"
    res = r.invoke(main, ["quantize", src, str(out), "--scheme", "Q4_K", "--method", "gptq", "--calib-tokens", "1024",
                          "--eval-tokens", "256", "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert rep["format"] == "gguf" and rep["config"]["target"] == "gguf"
    assert len(rep["fallbacks"]) == 60 and set(rep["fallbacks"].values()) == {"Q5_0"}
    t = _gguf_tensors(out)
    assert t["blk.3.channel_mix_value.weight"][0] == "Q4_K"   # rows of 256
    assert t["blk.3.channel_mix_key.weight"][0] == "Q5_0"     # rows of 64: llama.cpp's fallback
    assert t["token_embd.weight"][0] == "F32" and t["output.weight"][0] == "F32"
    back = read_checkpoint(str(out))   # and it reads back as a model
    assert back.tensors["blocks.3.ffn.value.weight"].shape == (64, 256)
    # bad input: a K-quant for rwkv.cpp, a v4 model for GGUF; clear message, exit 2, nothing written
    for args, msg in (([src, str(tmp_path / "k.bin"), "--scheme", "Q4_K"], ".gguf"),
                      ([fixture_path("tiny-rwkv-4v0-660K.pth"), str(tmp_path / "v4.gguf"), "--scheme", "Q4_0"],
                       "rwkv6, rwkv7")):
        res = r.invoke(main, ["quantize", *args, "--no-validate"])
        assert res.exit_code == 2 and msg in res.output and "Traceback" not in res.output, res.output
        assert not pathlib.Path(args[1]).exists()


# ------------------------------------------------------------------ dequantized model stays close
def test_quantized_gguf_model_is_close_to_the_original(tmp_path, tiny_models):
    from rwkvtools.model import build_model
    ck = tiny_models["7"]
    toks = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26]])
    with torch.no_grad():
        ref, _ = build_model(ck).forward(toks, None)
        for qtype, tol in (("Q8_0", 0.02), ("Q4_0", 0.2)):
            out = tmp_path / f"{qtype}.gguf"
            write_gguf(ck, str(out), quant=qtype, tokenizer="none")
            got, _ = build_model(read_checkpoint(str(out))).forward(toks, None)
            d = (got - ref).abs().max().item() / ref.abs().max().item()
            assert 0 < d < tol, (qtype, d)


# ------------------------------------------------------------------ llama.cpp itself (optional)
# Tolerances: max |logit(llama.cpp) - logit(reference)| / max |logit(reference)|, where the reference
# is rwkvtools' fp32 model on the weights read back from the same GGUF (the weight rounding is common
# to both). What remains is llama.cpp's arithmetic: F32 is exact up to summation order; F16/BF16
# weights are multiplied with activations rounded to F16/BF16; quantized weights with activations
# quantized on the fly to Q8 blocks (Q8_0 for the 32-value types, Q8_K for the K-quants).
# Measured (tiny v7 / v6 fixtures, 48 / 38 tokens): f32 2.8e-7 / 4.9e-7, f16 1.0e-4 / 1.4e-4,
# bf16 7.8e-4 / 1.3e-3, quantized 5e-4..1.1e-3 (v7) and 3.8e-3..5.3e-3 (v6); limits ~3x those.
LLAMACPP_TOL = {"f32": 1e-5, "f16": 1e-3, "bf16": 5e-3, "Q8_0": 1.5e-2, "Q4_0": 1.5e-2, "Q4_1": 1.5e-2,
                "Q5_0": 1.5e-2, "Q5_1": 1.5e-2, "Q4_K": 1.5e-2, "Q5_K": 1.5e-2, "Q6_K": 1.5e-2}


def _runner():
    import llamacpp_runner
    if not llamacpp_runner.available():
        pytest.skip("llama-cpp-python is not installed (optional test dependency: pip install llama-cpp-python)")
    return llamacpp_runner


def _reference_logits(gguf_path, tokens):
    from rwkvtools.model import build_model
    with torch.no_grad():
        out, _ = build_model(read_checkpoint(str(gguf_path))).forward(torch.tensor([tokens]), None)
    return out[0].numpy()


def _check_in_llamacpp(run, paths_kinds, tokens, n_batch=512):
    """Evaluate every (path, kind) in llama.cpp (one subprocess) and compare with the reference;
    all failures are reported together. Returns the relative deviations."""
    got_all = run.logits_many([str(p) for p, _ in paths_kinds], tokens, n_batch=n_batch)
    devs, bad = {}, []
    for (path, kind), got in zip(paths_kinds, got_all):
        ref = _reference_logits(path, tokens)
        assert got.shape == ref.shape
        d = float(np.abs(got - ref).max() / np.abs(ref).max())
        agree = float((got.argmax(1) == ref.argmax(1)).mean())
        devs[kind] = d
        if d > LLAMACPP_TOL[kind] or agree < 0.9:
            bad.append(f"{path.name}: max |delta logit| / max |logit| = {d:.3g} (limit {LLAMACPP_TOL[kind]}), "
                       f"argmax agreement {agree:.2f}")
    assert not bad, "; ".join(bad)
    return devs


def _write_kinds(ck, tmp_path, stem, kinds, **kw):
    out = []
    for kind in kinds:
        p = tmp_path / f"{stem}-{kind}.gguf"
        if kind in ("f32", "f16", "bf16"):
            write_gguf(ck, str(p), dtype=kind, **kw)
        else:
            write_gguf(ck, str(p), quant=kind, **kw)
        out.append((p, kind))
    return out


@pytest.mark.llamacpp
def test_llamacpp_v7_fixture_logits(tmp_path, shared):
    run = _runner()
    ck = read_checkpoint(fixture_path("tiny-rwkv-7v0-834K.pth"))
    files = _write_kinds(ck, tmp_path, "v7", ["f32", "f16", "bf16", "Q8_0", "Q4_0", "Q5_1", "Q4_K"])
    _check_in_llamacpp(run, files, list(wikitext_tokens(48)))


@pytest.mark.llamacpp
def test_llamacpp_runs_our_gptq_gguf(tmp_path, shared):
    """GPTQ-calibrated blocks (32-value types and K-quants), and Q5_1 blocks whose scales and
    offsets were tuned (--tune-steps), in GGUFs that llama.cpp runs as they are."""
    from rwkvtools.transforms.quantize import QuantizeConfig, quantize, write_quantized
    run = _runner()
    ck = read_checkpoint(fixture_path("tiny-rwkv-7v0-834K.pth"))
    calib = list(wikitext_tokens(1024))
    files = []
    for qtype in ("Q4_0", "Q4_K"):
        p = tmp_path / f"gptq-{qtype}.gguf"
        write_quantized(quantize(ck, QuantizeConfig(qtype, method="gptq", target="gguf", calib_tokens=1024), calib), str(p))
        files.append((p, qtype))
    tuned = quantize(ck, QuantizeConfig("Q5_1", target="gguf", tune_steps=20, tune_seq=128, tune_batch=4), calib)
    assert tuned.manifest["quantized"]["tuning"]["kept"] and tuned.manifest["quantized"]["tuning"]["tensors"] > 0
    p = tmp_path / "tuned-Q5_1.gguf"
    write_quantized(tuned, str(p))
    files.append((p, "Q5_1"))
    _check_in_llamacpp(run, files, list(wikitext_tokens(48)))


@pytest.mark.llamacpp
def test_llamacpp_v6_fixture_logits(tmp_path, shared):
    run = _runner()
    ck = read_checkpoint(fixture_path("tiny-rwkv-6v0-3m-Q5_1.bin"))
    files = _write_kinds(ck, tmp_path, "v6", ["f32", "f16", "bf16", "Q8_0", "Q5_1"])
    _check_in_llamacpp(run, files, list("The quick brown fox".encode("utf-16le")))


@pytest.mark.llamacpp
def test_llamacpp_reads_our_kquants(tmp_path):
    """A v7 whose every matrix has rows of 256, so each one is a K-quant that llama.cpp reads."""
    run = _runner()
    ck = random_checkpoint("7", n_layer=2, n_embd=256, head_size=64, vocab=256, seed=11)
    files = []
    for kind in kquants.KQUANT_TYPES:
        p = tmp_path / f"k-{kind}.gguf"
        rep = write_gguf(ck, str(p), quant=kind, embed_type=kind, head_type=kind)
        assert not rep["fallbacks"] and rep["tensor_types"][kind] == 2 + 2 * 6
        files.append((p, kind))
    _check_in_llamacpp(run, files, list(range(40, 72)))


@pytest.mark.llamacpp
def test_llamacpp_batch_equals_serial_and_state_carries(tmp_path, shared):
    run = _runner()
    out = tmp_path / "v7.gguf"
    write_gguf(read_checkpoint(fixture_path("tiny-rwkv-7v0-834K.pth")), str(out))
    tokens = list(wikitext_tokens(12))
    d_batch = _check_in_llamacpp(run, [(out, "f32")], tokens, n_batch=512)["f32"]
    d_serial = _check_in_llamacpp(run, [(out, "f32")], tokens, n_batch=1)["f32"]
    assert max(d_batch, d_serial) <= LLAMACPP_TOL["f32"]


@pytest.mark.llamacpp
@pytest.mark.parametrize("ftype", ["Q8_0", "Q4_0", "Q4_K_S", "Q6_K"])
def test_our_quantized_file_equals_llamacpp_quantizer(tmp_path, ftype):
    """llama.cpp's own quantizer, run on our F32 file with every quantizable tensor at the base type
    (pure) and embedding/head kept F32, writes byte for byte the blocks we write."""
    run = _runner()
    ck = random_checkpoint("7", n_layer=2, n_embd=64, head_size=16, vocab=256, seed=12)  # rows 64 and 256
    f32 = tmp_path / "f32.gguf"
    write_gguf(ck, str(f32))
    theirs = tmp_path / "theirs.gguf"
    run.quantize(str(f32), str(theirs), ftype, embed="F32", output="F32", pure=True)
    ours = tmp_path / "ours.gguf"
    write_gguf(ck, str(ours), quant=ftype.split("_K")[0] + "_K" if "_K" in ftype else ftype)
    a, b = gguf.GGUFReader(str(theirs)), gguf.GGUFReader(str(ours))
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert set(ta) == set(tb)
    n_quant = 0
    for name, t in ta.items():
        assert t.tensor_type == tb[name].tensor_type, (name, t.tensor_type.name, tb[name].tensor_type.name)
        assert np.array_equal(np.asarray(t.data).view(np.uint8), np.asarray(tb[name].data).view(np.uint8)), name
        n_quant += t.tensor_type.name not in ("F32", "F16")
    assert n_quant == 2 * 6


@pytest.mark.llamacpp
def test_we_read_llamacpp_quantized_files(tmp_path, shared):
    """A file made by llama.cpp's quantizer with its default Q4_K_M mix (K-quants, fallbacks, a
    quantized embedding and a Q6_K/Q8_0 head) reads back into a model that computes llama.cpp's logits."""
    run = _runner()
    f32 = tmp_path / "f32.gguf"
    write_gguf(random_checkpoint("7", n_layer=2, n_embd=256, head_size=64, vocab=256, seed=13), str(f32))
    theirs = tmp_path / "Q4_K_M.gguf"
    run.quantize(str(f32), str(theirs), "Q4_K_M")
    types = {t.tensor_type.name for t in gguf.GGUFReader(str(theirs)).tensors}
    assert {"Q4_K", "Q6_K"} <= types
    _check_in_llamacpp(run, [(theirs, "Q4_K")], list(range(60, 92)))


@pytest.mark.llamacpp
def test_kquants_are_ggml_bytes():
    run = _runner()
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.standard_normal((8, 512)) * s for s in (1e-3, 0.05, 3.0)]).astype(np.float32)
    x[2, :256] = 0
    x[3, :300] = np.abs(x[3, :300])
    x[5] = rng.standard_t(2, size=512) * 0.05
    x[6, :32] *= 1e-4  # sub-blocks 10^4 smaller than the rest of their super-block: the 6-bit (Q4_K,
    x[7, :16] *= 1e-4  # Q5_K) / 8-bit (Q6_K) scale rounds to 0 and ggml keeps the search's levels
    for qtype in kquants.KQUANT_TYPES:
        assert np.array_equal(run.ggml_quantize(qtype, x), kquants.quantize(qtype, x)), qtype


@pytest.mark.llamacpp
def test_llamacpp_byte_tokenizer_is_identity(tmp_path):
    run = _runner()
    out = tmp_path / "b.gguf"
    write_gguf(random_checkpoint("7", n_layer=1, n_embd=32, head_size=16, vocab=256, seed=1), str(out))
    data = bytes(range(256)) + "naïve <s> \\x41 'q' \"d\"\n\t".encode()
    assert run.tokenize(str(out), data) == list(data)


@pytest.mark.llamacpp
def test_llamacpp_world_tokenizer_matches_pyrwkv(tmp_path):
    run = _runner()
    import pyrwkv_tokenizer as pyrwkv
    small = random_checkpoint("7", n_layer=1, n_embd=64, head_size=64, vocab=8, seed=3)
    t = dict(small.tensors)
    t["emb.weight"] = torch.zeros(65536, 64)
    t["head.weight"] = torch.zeros(65536, 64)
    out = tmp_path / "w.gguf"
    write_gguf(Checkpoint(t, small.manifest), str(out))
    text = "Hello world! The RWKV World tokenizer: naïve café, 你好，世界。\n\nUser: hi\tthere \\ 'quote'"
    assert run.tokenize(str(out), text.encode()) == pyrwkv.RWKVTokenizer().encode(text)


def wikitext_tokens(n):
    from conftest import wikitext_bytes
    return wikitext_bytes(n)


@pytest.mark.parametrize("transform", ["lowrank", "int4"])
def test_densified_gguf_says_so(tmp_path, transform):
    """convert of a low-rank (or int4) checkpoint to GGUF writes dense matrices: the report counted
    the factors' parameters, listed them as 'unused by every runtime', and `inspect` of the GGUF
    still showed the low-rank (int4) summary with no trace of the densification."""
    from click.testing import CliRunner

    from rwkvtools.cli import main
    from rwkvtools.inspect import describe
    from rwkvtools.io.safetensors_io import write_safetensors
    from rwkvtools.transforms.lowrank import LowRankConfig, lowrank
    from rwkvtools.transforms.quantize import QuantizeConfig, quantize
    ck = random_checkpoint("7", n_layer=2, n_embd=64, vocab=256, head_size=16, seed=3)
    t = (lowrank(ck, LowRankConfig(rank=0.5, method="svd")) if transform == "lowrank"
         else quantize(ck, QuantizeConfig(scheme="int4", group_size=32)))
    src, dst = str(tmp_path / "t.safetensors"), str(tmp_path / "t.gguf")
    write_safetensors(t, src)
    r = CliRunner().invoke(main, ["convert", src, dst, "--no-validate", "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    out = read_checkpoint(dst)
    assert rep["params"] == out.num_params() == ck.num_params()
    # the factors hold fewer parameters; int4 holds as many (two per byte), in fewer bytes
    assert t.num_params() < ck.num_params() if transform == "lowrank" else t.num_params() == ck.num_params()
    info = describe(out)
    assert info.get(transform if transform == "lowrank" else "quantized") is None
    assert [h["transform"] for h in info["history"]][-1] == "densify"
    r = CliRunner().invoke(main, ["convert", src, str(tmp_path / "u.gguf")])
    assert r.exit_code == 0 and "densified:" in r.output and "unused by every runtime" not in r.output, r.output


def _gguf_with(src, dst, changes: dict):
    """A copy of the GGUF ``src`` with metadata fields replaced (``changes``: key -> (value, GGUFValueType))."""
    r = gguf.GGUFReader(str(src))
    arch = changes.pop("general.architecture", (None,))[0]
    w = gguf.GGUFWriter(str(dst), arch or str(r.fields["general.architecture"].contents()))
    if arch is not None:
        w.kv_data[0].pop("general.architecture", None)
        w.add_array("general.architecture", arch)
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or name in changes:
            continue
        vt = f.types[0]
        if vt == gguf.GGUFValueType.ARRAY:
            w.add_key_value(name, f.contents(), vt, sub_type=f.types[-1])
        else:
            w.add_key_value(name, f.contents(), vt)
    for k, (v, vt) in changes.items():
        w.add_key_value(k, v, vt, **({"sub_type": gguf.GGUFValueType.UINT32} if vt == gguf.GGUFValueType.ARRAY else {}))
    for t in r.tensors:
        w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("key,value", [("rwkv7.token_shift_count", [2, 2]), ("general.architecture", ["rwkv7"]),
                                       ("general.file_type", [1, 2])])
def test_metadata_of_the_wrong_type_is_a_clear_error(tmp_path, small_gguf, key, value):
    """An array where GGUF keeps a number or a string: 'internal error (ValueError: The truth value
    of an array ...)' (token_shift_count, general.architecture); a descriptive field of the wrong
    type is dropped, not carried into the manifest."""
    ok = tmp_path / "ok.gguf"
    _gguf_with(small_gguf, ok, {})  # the copy itself reads as the original
    assert read_checkpoint(str(ok)).num_params() == read_checkpoint(str(small_gguf)).num_params()
    p = tmp_path / "m.gguf"
    _gguf_with(small_gguf, p, {key: (value, gguf.GGUFValueType.ARRAY)})
    if key == "general.file_type":
        ck = read_checkpoint(str(p))
        assert ck.manifest["source_format"]["file_type"] is None
        return
    with pytest.raises(FormatError, match=key.replace(".", r"\.")):
        read_checkpoint(str(p))


def test_convert_quant_reports_every_tensor_type_and_demotion(tmp_path):
    """convert --quant Q4_K said 'dtype unchanged' and its JSON had no tensor types or fallbacks,
    though 60 of the v7 fixture's 72 matrices were written as Q5_0 (rows of 64: no 256-wide
    K-quant super-block), which the README says the report lists."""
    from collections import Counter

    from click.testing import CliRunner

    from rwkvtools.cli import main
    from conftest import fixture_path
    out = tmp_path / "q.gguf"
    r = CliRunner().invoke(main, ["convert", fixture_path("tiny-rwkv-7v0-834K.pth"), str(out), "--quant", "Q4_K",
                                  "--json", "--no-validate"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    _, _, tensors, _ = _reader_fields(out)
    assert rep["tensor_types"] == dict(Counter(t for _, t in tensors.values()))
    demoted = {f["tensor"]: f["written"] for f in rep["fallbacks"]}
    assert demoted and demoted == {n: t for n, (_, t) in tensors.items() if t not in ("F32", "Q4_K")}
    assert all(f["wanted"] == "Q4_K" for f in rep["fallbacks"]) and rep["quant"] == "Q4_K"


@pytest.mark.parametrize("version,bin_named", [("4", True), ("5.2", True), ("5.1", False)])
def test_gguf_refusal_names_only_formats_that_serve_the_model(tmp_path, version, bin_named):
    """GGUF holds v6/v7 only; the refusal's way out names rwkv.cpp's .bin only where rwkv.cpp can
    load that layout (not v5.1: a user following the advice was refused again)."""
    from click.testing import CliRunner
    from rwkvtools.cli import main
    from rwkvtools.io.safetensors_io import write_safetensors
    src = tmp_path / "m.safetensors"
    write_safetensors(random_checkpoint(version, n_layer=1, n_embd=32, head_size=16, vocab=97), str(src))
    res = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "m.gguf"), "--no-validate"])
    assert res.exit_code == 2 and "rwkv6, rwkv7" in res.output and not (tmp_path / "m.gguf").exists()
    assert ("model.bin" in res.output) == bin_named, res.output
    if bin_named:   # and the advice works
        res = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "m.bin"), "--no-validate"])
        assert res.exit_code == 0, res.output

"""Readers: .pth (weights_only), safetensors (lazy, manifest), rwkv.cpp .bin (every block type,
bounds checks), and hostile inputs."""
import io
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from rwkvtools.errors import FormatError, RwkvToolsError, UnsafeFileError
from rwkvtools.io import ggml_quants, read_checkpoint, sniff
from rwkvtools.io.pth import write_pth
from rwkvtools.io.safetensors_io import write_safetensors
from rwkvtools.checkpoint import LazyTensors


def test_pth_roundtrip(tmp_path, tiny_models):
    ck = tiny_models["7"]
    p = tmp_path / "m.pth"
    write_pth(ck, str(p))
    back = read_checkpoint(str(p))
    assert set(back.tensors) == set(ck.tensors)
    for k in ck.tensors:
        assert torch.equal(back.tensors[k], ck.tensors[k])


def test_safetensors_lazy_and_manifest(tmp_path, tiny_models):
    ck = tiny_models["6"]
    p = tmp_path / "m.safetensors"
    write_safetensors(ck, str(p))
    back = read_checkpoint(str(p))
    assert isinstance(back.tensors, LazyTensors)
    assert back.manifest["history"][0]["transform"] == "init"
    assert back.shape("blocks.0.att.time_maa_w2") == tuple(ck.tensors["blocks.0.att.time_maa_w2"].shape)
    for k in ck.tensors:
        assert torch.equal(back.tensors[k], ck.tensors[k])


class _Evil:
    def __reduce__(self):
        import os
        return (os.system, ("echo pwned > /dev/null",))


def test_malicious_pickle_is_refused(tmp_path):
    p = tmp_path / "evil.pth"
    torch.save({"emb.weight": torch.zeros(2, 2), "x": _Evil()}, str(p))
    with pytest.raises(UnsafeFileError, match="refused"):
        read_checkpoint(str(p))
    raw = tmp_path / "evil_raw.pth"
    raw.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(UnsafeFileError):
        read_checkpoint(str(raw))


@pytest.mark.parametrize("protocol", [2, 4])
def test_malicious_pickle_refusal_is_one_clean_message(tmp_path, protocol):
    """The CLI names what the unpickler refused, with neither torch's warning about the pickle
    protocol nor its advice to load with weights_only=False or to allow the global."""
    import subprocess
    import sys
    p = tmp_path / "evil.pth"
    p.write_bytes(pickle.dumps({"emb.weight": _Evil()}, protocol=protocol))
    r = subprocess.run([sys.executable, "-m", "rwkvtools", "inspect", str(p)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    # protocol 2 names the function with GLOBAL; 4 with STACK_GLOBAL (opcode 149), which torch refuses
    said = f"names the global {os.system.__module__}.system" if protocol == 2 else "pickle opcode 149"
    assert "refused to load" in r.stderr and said in r.stderr, r.stderr
    for noise in ("Warning", "weights_only` set to `False`", "add_safe_globals"):
        assert noise not in r.stderr, r.stderr


def test_non_tensor_entries_are_refused(tmp_path):
    p = tmp_path / "odd.pth"
    torch.save({"emb.weight": torch.zeros(2, 2), "step": 3}, str(p))
    with pytest.raises(FormatError, match="step"):
        read_checkpoint(str(p))


def test_sniff_errors(tmp_path):
    with pytest.raises(RwkvToolsError, match="no such file"):
        sniff(str(tmp_path / "missing.pth"))
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(FormatError, match="empty"):
        sniff(str(tmp_path / "empty.bin"))
    (tmp_path / "text.txt").write_text("hello world, not a model")
    with pytest.raises(FormatError, match="not a checkpoint"):
        sniff(str(tmp_path / "text.txt"))


def test_truncated_safetensors(tmp_path, tiny_models):
    p = tmp_path / "m.safetensors"
    write_safetensors(tiny_models["7"], str(p))
    data = p.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError, match="truncated|outside"):
        read_checkpoint(str(tmp_path / "cut.safetensors"))
    (tmp_path / "hdr.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(FormatError, match="header length"):
        read_checkpoint(str(tmp_path / "hdr.safetensors"))


def _cpp_file(records, version=101, dtype=0, n_vocab=4, n_embed=32, n_layer=1):
    out = io.BytesIO()
    out.write(struct.pack("<6i", 0x67676D66, version, n_vocab, n_embed, n_layer, dtype))
    for name, rtype, dims, data in records:
        key = name.encode()
        out.write(struct.pack("<3i", len(dims), len(key), rtype))
        out.write(struct.pack(f"<{len(dims)}i", *dims))
        out.write(key)
        out.write(data)
    return out.getvalue()


@pytest.mark.parametrize("bad,match", [
    (lambda b: b[:10], "too short"),
    (lambda b: b"XXXX" + b[4:], "bad magic"),
    (lambda b: b[:4] + struct.pack("<i", 7) + b[8:], "file version"),
    (lambda b: b[:-5], "truncated"),
    (lambda b: b[:24] + struct.pack("<3i", 9, 5, 0) + b[36:], "dim_count"),
    (lambda b: b[:24] + struct.pack("<3i", 2, 1 << 30, 0) + b[36:], "key length"),
    (lambda b: b[:24] + struct.pack("<3i", 2, 10, 42) + b[36:], "unknown data type"),
    (lambda b: b[:24] + struct.pack("<3i", 2, 10, 5) + b[36:], "removed"),
    (lambda b: b[:36] + struct.pack("<2i", 1 << 30, 1 << 30) + b[44:], "needs|invalid dims|truncated"),
])
def test_rwkvcpp_hostile_headers(tmp_path, bad, match):
    good = _cpp_file([("emb.weight", 0, (32, 4), np.zeros(128, np.float32).tobytes())])
    p = tmp_path / "x.bin"
    p.write_bytes(bad(good))
    with pytest.raises(FormatError, match=match):
        read_checkpoint(str(p), format="rwkvcpp")


def test_rwkvcpp_quant_row_not_multiple_of_32(tmp_path):
    p = tmp_path / "q.bin"
    p.write_bytes(_cpp_file([("emb.weight", 8, (20, 4), b"\0" * 100)]))
    with pytest.raises(FormatError, match="multiple of 32"):
        read_checkpoint(str(p))


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
def test_block_dequantize_matches_gguf_package(qtype):
    """Our numpy block decoder against llama.cpp's own Python library (an independent one)."""
    import gguf
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 64)).astype(np.float32)
    x[3] = 0.25  # all-equal row
    # a block whose scale is exactly 1 (largest magnitude -8, -16 or 127) with values on exact .5
    # ties: ggml rounds them with trunc(x + 8.5) / C's roundf, never numpy's half to even
    top = {"Q4_0": -8.0, "Q5_0": -16.0, "Q8_0": 127.0}.get(qtype, 1.0)
    x[5, :32] = [top] + [(j % 14) - 7 + 0.5 for j in range(31)]
    qt = getattr(gguf.GGMLQuantizationType, qtype)
    raw = gguf.quants.quantize(x, qt)
    theirs = gguf.quants.dequantize(raw, qt).reshape(-1)
    ours = ggml_quants.dequantize(qtype, np.ascontiguousarray(raw).view(np.uint8).reshape(-1), x.size)
    np.testing.assert_array_equal(ours, theirs)
    # and our quantizer writes the same bytes as the gguf package (= ggml's reference)
    mine = ggml_quants.quantize(qtype, x)
    np.testing.assert_array_equal(mine, np.ascontiguousarray(raw).view(np.uint8).reshape(-1))


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
def test_block_quantize_error_bound(qtype):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(32 * 50).astype(np.float32)
    back = ggml_quants.dequantize(qtype, ggml_quants.quantize(qtype, x), x.size)
    blocks = x.reshape(-1, 32)
    amax = np.abs(blocks).max(1)
    span = blocks.max(1) - blocks.min(1)
    # symmetric types map the largest magnitude to -nmax, so the other sign clips by one step
    bound = {"Q4_0": amax / 8, "Q5_0": amax / 16, "Q8_0": amax / 127 * 0.5,
             "Q4_1": span / 15 * 0.5, "Q5_1": span / 31 * 0.5}[qtype]
    bound = bound * 1.01 + amax * 4e-3  # + the fp16 rounding of scale and minimum
    assert np.all(np.abs(back - x).reshape(-1, 32).max(1) <= bound)


@pytest.mark.parametrize("legacy", [False, True])
def test_pth_views_that_claim_more_than_is_stored_are_refused(tmp_path, tiny_models, legacy):
    """A zero-stride view (one row expanded) is a few bytes in the file and any size in use: a
    3 MB file claimed a 64 GiB embedding (inspect reported 34B parameters, convert tried the
    allocation, eval spun). Many views of one storage likewise. Zip and legacy files alike."""
    sd = {k: v.clone() for k, v in tiny_models["7"].tensors.items()}
    V, C = sd["emb.weight"].shape
    cases = {"expanded": {**sd, "emb.weight": sd["emb.weight"][0].clone().expand(1 << 24, C)}}
    big = torch.randn(1 << 16)
    cases["fan-out"] = {**sd, **{f"x{i}": big[i:] for i in range(200)}}
    for name, obj in cases.items():
        p = tmp_path / f"{name}.pth"
        torch.save(obj, p, _use_new_zipfile_serialization=not legacy)
        with pytest.raises(FormatError, match="claim"):
            read_checkpoint(str(p))
    # an ordinary transposed view (strides permuted, every element stored once) still reads
    p = tmp_path / "t.pth"
    torch.save({**sd, "head.weight": sd["head.weight"].t().contiguous().t()}, p, _use_new_zipfile_serialization=not legacy)
    assert torch.equal(read_checkpoint(str(p)).tensors["head.weight"], sd["head.weight"])


@pytest.mark.parametrize("where", ["safetensors", "config.json"])
def test_json_of_millions_of_tiny_objects_is_refused_early(tmp_path, tiny_models, where):
    """A 104 MB safetensors header of '[{},{},...]' took 2.8 GB as Python objects before the
    'no data_offsets' error (a 66 MB config.json 1.9 GB). The parser stops after
    MAX_JSON_OBJECTS objects/lists; headers are capped at 16 MB."""
    import json as _json
    from rwkvtools.checkpoint import MAX_JSON_OBJECTS, load_json
    from rwkvtools.io.writers import write_checkpoint
    balloon = '{"a": [' + "{}, [], " * MAX_JSON_OBJECTS + "{}]}"
    with pytest.raises(FormatError, match="more than 200,000 objects"):
        load_json(balloon, "x")
    assert load_json('{"a": [1, {"b": []}]}', "x") == {"a": [1, {"b": []}]}
    if where == "safetensors":
        raw = balloon.encode() + b" " * (-len(balloon) % 8)
        p = tmp_path / "h.safetensors"
        p.write_bytes(struct.pack("<Q", len(raw)) + raw)
    else:
        p = tmp_path / "hf"
        write_checkpoint(tiny_models["7"], str(p))
        cfg = _json.loads((p / "config.json").read_text())
        (p / "config.json").write_text(_json.dumps({**cfg, "junk": [{} for _ in range(MAX_JSON_OBJECTS + 1)]}))
    with pytest.raises(FormatError, match="more than 200,000 objects"):
        read_checkpoint(str(p))


@pytest.mark.parametrize("form", ["lowrank", "int8", "recursive", "merged"])
def test_pth_keeps_the_manifest_of_a_transformed_checkpoint(tmp_path, tiny_models, form):
    """.pth stored the manifest only for the RNN form: a low-rank, int8/int4 or recursive checkpoint
    lost its history and summaries (inspect: 'not written by rwkvtools'); a dense result (merged)
    stays a plain RWKV-LM file, as ChatRWKV loads it."""
    from rwkvtools.io.pth import MANIFEST_KEY
    from rwkvtools.transforms.lowrank import LowRankConfig, lowrank
    from rwkvtools.transforms.quantize import QuantizeConfig, quantize
    from rwkvtools.transforms.recursive import RecursiveConfig, recursive
    ck = tiny_models["7"]
    t = {"lowrank": lambda: lowrank(ck, LowRankConfig(rank=0.5, method="svd")),
         "merged": lambda: lowrank(ck, LowRankConfig(rank=0.5, method="svd", merge=True)),
         "int8": lambda: quantize(ck, QuantizeConfig("int8")),
         "recursive": lambda: recursive(ck, RecursiveConfig(blocks=1))}[form]()
    p = tmp_path / "t.pth"
    write_pth(t, str(p))
    raw = torch.load(str(p), weights_only=True)
    back = read_checkpoint(str(p))
    if form == "merged":
        assert MANIFEST_KEY not in raw
    else:
        assert back.history == t.history and back.history[-1]["transform"] == t.history[-1]["transform"]
        key = {"int8": "quantized"}.get(form, form)
        assert back.manifest[key] == t.manifest[key]


def test_an_unreadable_file_inside_a_model_folder_is_a_clear_error(tmp_path, tiny_models, monkeypatch):
    """A Hugging Face folder whose model.safetensors cannot be opened (permissions) was an
    'internal error (PermissionError ...)' in inspect, convert and eval. (Running as root, the
    denial is simulated where the reader opens the file.)"""
    import builtins
    from rwkvtools.io.writers import write_checkpoint
    hf = tmp_path / "hf"
    write_checkpoint(tiny_models["7"], str(hf))
    weights = str(hf / "model.safetensors")
    real_open = builtins.open

    def denying_open(file, *a, **kw):
        if str(file) == weights:
            raise PermissionError(13, "Permission denied", weights)
        return real_open(file, *a, **kw)
    monkeypatch.setattr(builtins, "open", denying_open)
    with pytest.raises(RwkvToolsError, match=r"model.safetensors: cannot read \(Permission denied\)"):
        read_checkpoint(str(hf))


def test_names_that_are_not_utf8_are_refused_up_front(tmp_path, tiny_models):
    """A non-UTF-8 file name: torch/safetensors/onnxruntime failed with their own errors (a
    UnicodeEncodeError, a pybind signature dump), and convert --no-validate wrote a file rwkvtools
    then could not read. Refused before any work, input or output."""
    import os
    import shutil
    from rwkvtools.transforms.convert import convert
    good = tmp_path / "m.pth"
    write_pth(tiny_models["7"], str(good))
    bad = os.path.join(str(tmp_path), os.fsdecode(b"a\xff.pth"))
    shutil.copy(good, bad)
    with pytest.raises(RwkvToolsError, match="not valid UTF-8"):
        read_checkpoint(bad)
    out = os.path.join(str(tmp_path), os.fsdecode(b"z\xff.safetensors"))
    with pytest.raises(RwkvToolsError, match="not valid UTF-8"):
        convert(str(good), out)
    assert not os.path.exists(out)


@pytest.mark.parametrize("dtype", [torch.int32, torch.complex64])
def test_a_weight_that_is_not_floating_point_is_refused(tiny_models, dtype):
    """A uint32/complex weight was read as numbers (ppl 302 vs 56) or cast with torch's warning."""
    from rwkvtools.checkpoint import Checkpoint
    from rwkvtools.model import build_model
    ck = tiny_models["7"]
    bad = Checkpoint({**ck.tensors, "blocks.0.ffn.key.weight": ck.tensors["blocks.0.ffn.key.weight"].to(dtype)},
                     ck.manifest)
    with pytest.raises(RwkvToolsError, match="blocks.0.ffn.key.weight' is .*RWKV weights are floating point"):
        build_model(bad)


def test_rwkvcpp_header_that_disagrees_with_the_tensors_is_refused(tmp_path):
    from conftest import fixture_path
    raw = bytearray(open(fixture_path("tiny-rwkv-5v2-730K-FP32.bin"), "rb").read())
    struct.pack_into("<3i", raw, 8, 128, 64, 3)  # n_vocab, n_embed, n_layer
    p = tmp_path / "h.bin"
    p.write_bytes(bytes(raw))
    with pytest.raises(FormatError, match=r"n_vocab = 128 \(the tensors: 256\).*n_layer = 3 \(the tensors: 12\)"):
        read_checkpoint(str(p))


def test_a_manifest_of_an_unknown_form_is_refused(tmp_path, tiny_models):
    """form 'zzz' was carried into every output ('safetensors (zzz) -> safetensors (zzz)')."""
    ck = tiny_models["7"]
    p = tmp_path / "f.safetensors"
    write_safetensors(ck.with_tensors(ck.tensors, form="zzz"), str(p))
    with pytest.raises(FormatError, match="'form' is 'zzz'"):
        read_checkpoint(str(p))


def _gguf_variants(tmp_path):
    from rwkvtools.io.writers import write_checkpoint
    from rwkvtools.random_init import random_checkpoint
    out = []
    for v, dtype, opts in (("7", torch.float16, {}), ("7", torch.float32, {"quant": "Q8_0"}),
                           ("6", torch.bfloat16, {}), ("6", torch.float32, {"quant": "Q4_K"})):
        ck = random_checkpoint(v, n_layer=2, n_embd=64, head_size=16, vocab=256, seed=3, dtype=dtype)
        p = tmp_path / f"m{v}-{len(out)}.gguf"
        write_checkpoint(ck, str(p), **opts)
        out.append(str(p))
    return out


def test_gguf_and_rwkvcpp_dtypes_are_known_without_loading(tmp_path, monkeypatch):
    """A dtype query on a .gguf or rwkv.cpp checkpoint loaded (and dequantized) the whole tensor:
    inspect and convert's layout check unpacked every tensor once more (795 loads, 6 s at 1.5B).
    The dtype is known from the stored type; it must equal what loading gives."""
    import glob

    from rwkvtools.io import gguf_io, read_checkpoint, rwkvcpp
    paths = sorted(glob.glob(os.path.join(os.environ.get("RWKVTOOLS_SHARED", "../shared"), "fixtures", "*.bin")))
    paths += _gguf_variants(tmp_path)
    loads = []
    for cls in (rwkvcpp._Raw, gguf_io._Data):
        real = cls.tensor
        monkeypatch.setattr(cls, "tensor", lambda self, r, real=real: loads.append(1) or real(self, r))
    for p in paths:
        ck = read_checkpoint(p)
        loads.clear()
        dtypes = {k: ck.tensors.dtype(k) for k in ck.tensors}
        assert not loads, f"{p}: {len(loads)} tensors loaded to tell dtypes"
        got = {k: ck.tensors[k].dtype for k in ck.tensors}
        assert dtypes == got, (p, {k: (dtypes[k], got[k]) for k in got if dtypes[k] != got[k]})

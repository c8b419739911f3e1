"""convert: parallel <-> RNN form (bit-exact round trip; the RNN form consumed directly by an
independent per-token loop), every version x format x source form, dtypes, rwkv.cpp byte
identity against the fixtures, ChatRWKV and transformers loading our output, streaming, and bad
input (clear message, exit 2, no partial files)."""
import json
import math
import os
import pathlib
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from rwkvtools.checkpoint import Checkpoint, LazyTensors
from rwkvtools.cli import main
from rwkvtools.errors import FormatError, RwkvToolsError, SpecError
from rwkvtools.io import read_checkpoint
from rwkvtools.io.rwkvcpp import file_records, needs_quant, write_rwkvcpp
from rwkvtools.io.safetensors_io import write_safetensors
from rwkvtools.io.writers import write_checkpoint
from rwkvtools.model import build_model
from rwkvtools.random_init import random_checkpoint
from rwkvtools.spec import detect
from rwkvtools.transforms.convert import cast, compare_checkpoints, convert, keeps_fp32
from rwkvtools.transforms.rnn_form import RESERVED, forward_value, invert_value, to_parallel, to_rnn
from conftest import VERSIONS, fixture_path, max_rel



pytestmark = pytest.mark.usefixtures("one_thread")


TOKENS = torch.tensor([[5, 17, 3, 88, 42, 42, 0, 96, 11, 64, 2, 30, 7]])
EXT = {"pth": ".pth", "safetensors": ".safetensors", "hf": "", "rwkvcpp": ".bin"}


def logits(ck, toks=TOKENS, dtype=torch.float32):
    with torch.no_grad():
        out, _ = build_model(ck, dtype=dtype)(toks)
    return out


def assert_same_tensors(a: Checkpoint, b: Checkpoint, skip=()):
    assert [k for k in a.tensors if k not in skip] == [k for k in b.tensors if k not in skip]
    for k in a.tensors:
        if k in skip:
            continue
        x, y = a.tensors[k], b.tensors[k]
        assert x.dtype == y.dtype and tuple(x.shape) == tuple(y.shape), k
        assert torch.equal(x, y), k


# ------------------------------------------------------------------------------ RNN form
@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("rescale", [0, 2])
def test_rnn_roundtrip_is_bit_exact(tiny_models, version, rescale):
    ck = tiny_models[version]
    rnn = to_rnn(ck, rescale)
    assert rnn.form == "rnn" and rnn.manifest["rnn"]["rescale_every"] == rescale
    back = to_parallel(rnn)
    assert back.form == "parallel"
    assert_same_tensors(ck, back)
    assert torch.equal(logits(ck), logits(rnn))


@pytest.mark.parametrize("version", ["4", "5.0", "5.2"])
def test_rnn_roundtrip_bit_exact_in_bf16(tiny_models, version):
    ck = cast(tiny_models[version], "bf16")
    ck = Checkpoint({k: ck.tensors[k].bfloat16() for k in ck.tensors}, ck.manifest)  # decays in bf16 too
    rnn = to_rnn(ck)
    assert rnn.dtype(next(k for k in rnn.tensors if k.endswith("time_decay"))) == torch.float32
    assert_same_tensors(ck, to_parallel(rnn))


def test_rnn_form_keeps_originals_only_where_needed(tiny_models):
    """v5 decays exp(-exp(td)) are not injective in fp32 near 1: the originals are kept; v6/v7
    have no value transform, nothing is kept."""
    r5 = to_rnn(tiny_models["5.2"])
    kept = [k for k in r5.tensors if k.startswith(RESERVED)]
    assert kept and all(k.endswith("time_decay") for k in kept)
    for v in ("6", "7"):
        assert not [k for k in to_rnn(tiny_models[v]).tensors if k.startswith(RESERVED)]


@pytest.mark.parametrize("op,lo,hi", [("neg_exp", -8, 4), ("exp_neg_exp", -8, 4), ("exp", -3, 1)])
def test_invert_value_reproduces_the_stored_value(op, lo, hi):
    x = torch.empty(20000).uniform_(lo, hi, generator=torch.Generator().manual_seed(1))
    y = forward_value(op, x)
    back, ok = invert_value(op, y)
    assert bool(ok.all())
    assert torch.equal(forward_value(op, back), y)           # the stored value is reproduced bit for bit
    ref = x.double()
    err = (back.double() - ref).abs()
    if op == "neg_exp":                                       # injective for |td| >= 2: exact there
        assert torch.equal(back[x.abs() >= 2], x[x.abs() >= 2])
    assert float(err.max()) < 5e-3                           # v5 near decay 1: bounded, not exact


def _ln(x, w, b):
    return F.layer_norm(x, (x.shape[-1],), w, b, 1e-5)


def _rnn_logits(t: dict, spec, tokens: list[int], rescale: int) -> torch.Tensor:
    """An independent per-token RNN that reads the RNN-form tensors as they are stored (matrices
    (in, out), decays pre-transformed, vectors squeezed): what a runtime does with no
    pre-processing. Written from docs/FORMS.md, not from the reference model."""
    L, C, H, N = spec.n_layer, spec.n_embd, spec.n_head, spec.head_size
    v = spec.major
    att_x = [torch.zeros(C) for _ in range(L)]
    ffn_x = [torch.zeros(C) for _ in range(L)]
    if v == 4:
        aa = [torch.zeros(spec.dim_att) for _ in range(L)]
        bb = [torch.zeros(spec.dim_att) for _ in range(L)]
        pp = [torch.full((spec.dim_att,), -1e38) for _ in range(L)]
    else:
        S = [torch.zeros(H, N, N) for _ in range(L)]
    outs = []
    for tok in tokens:
        x = _ln(t["emb.weight"][tok], t["blocks.0.ln0.weight"], t["blocks.0.ln0.bias"])
        v_first = None
        for i in range(L):
            a, f = f"blocks.{i}.att.", f"blocks.{i}.ffn."
            xx = _ln(x, t[f"blocks.{i}.ln1.weight"], t[f"blocks.{i}.ln1.bias"])
            sx = att_x[i]
            att_x[i] = xx
            d = sx - xx
            if v in (4, 5):
                mk = lambda n: xx * t[a + n] + sx * (1 - t[a + n])  # noqa: E731
                xk, xv, xr = mk("time_mix_k"), mk("time_mix_v"), mk("time_mix_r")
            if v == 4:
                r = torch.sigmoid(xr @ t[a + "receptance.weight"])
                k, vv = xk @ t[a + "key.weight"], xv @ t[a + "value.weight"]
                w, u = t[a + "time_decay"], t[a + "time_first"]
                ww = u + k
                p = torch.maximum(pp[i], ww)
                e1, e2 = torch.exp(pp[i] - p), torch.exp(ww - p)
                wkv = (e1 * aa[i] + e2 * vv) / (e1 * bb[i] + e2)
                ww = pp[i] + w
                p = torch.maximum(ww, k)
                e1, e2 = torch.exp(ww - p), torch.exp(k - p)
                aa[i], bb[i], pp[i] = e1 * aa[i] + e2 * vv, e1 * bb[i] + e2, p
                x = x + (r * wkv) @ t[a + "output.weight"]
            elif v in (5, 6):
                if v == 6:
                    z = torch.tanh((xx + d * t[a + "time_maa_x"]) @ t[a + "time_maa_w1"]).view(5, 1, -1)
                    m = torch.bmm(z, t[a + "time_maa_w2"]).view(5, C)
                    xw, xk, xv, xr, xg = (xx + d * (t[a + f"time_maa_{c}"] + m[j]) for j, c in enumerate("wkvrg"))
                    wdec = torch.exp(-torch.exp(t[a + "time_decay"] + torch.tanh(xw @ t[a + "time_decay_w1"])
                                                @ t[a + "time_decay_w2"])).view(H, N, 1)
                    u = t[a + "time_faaaa"]
                else:
                    wdec = t[a + "time_decay"]
                    u = t[a + "time_faaaa"] if spec.bonus == "time_faaaa" else t[a + "time_first"]
                    if spec.has_gate:
                        xg = mk("time_mix_g")
                r = (xr @ t[a + "receptance.weight"]).view(H, N)
                k = (xk @ t[a + "key.weight"]).view(H, N)
                vv = (xv @ t[a + "value.weight"]).view(H, N)
                kv = k[:, :, None] * vv[:, None, :]
                y = (r[:, None, :] @ (u * kv + S[i])).view(C)
                S[i] = wdec * S[i] + kv
                y = F.group_norm(y.view(1, C), H, t[a + "ln_x.weight"], t[a + "ln_x.bias"], 64e-5).view(C)
                if spec.has_gate:
                    y = y * F.silu(xg @ t[a + "gate.weight"])
                x = x + y @ t[a + "output.weight"]
            else:  # v7, value-major state
                xr, xw, xk, xv, xa, xg = (xx + d * t[a + f"x_{c}"] for c in "rwkvag")
                r, k, vv = xr @ t[a + "receptance.weight"], xk @ t[a + "key.weight"], xv @ t[a + "value.weight"]
                w = torch.exp(-math.exp(-0.5) * torch.sigmoid(t[a + "w0"] + torch.tanh(xw @ t[a + "w1"]) @ t[a + "w2"]))
                aa_ = torch.sigmoid(t[a + "a0"] + (xa @ t[a + "a1"]) @ t[a + "a2"])
                g = torch.sigmoid(xg @ t[a + "g1"]) @ t[a + "g2"]
                kk = F.normalize((k * t[a + "k_k"]).view(H, N), dim=-1)
                k = k * (1 + (aa_ - 1) * t[a + "k_a"])
                if i == 0:
                    v_first = vv
                else:
                    vv = vv + (v_first - vv) * torch.sigmoid(t[a + "v0"] + (xv @ t[a + "v1"]) @ t[a + "v2"])
                kh, vh, rh, ah = k.view(H, N), vv.view(H, N), r.view(H, N), aa_.view(H, N)
                Si = S[i]
                Si = Si * w.view(H, 1, N) + (Si @ (-kk)[:, :, None]) @ (kk * ah)[:, None, :] + vh[:, :, None] * kh[:, None, :]
                S[i] = Si
                y = (Si @ rh[:, :, None]).view(C)
                y = F.group_norm(y.view(1, C), H, t[a + "ln_x.weight"], t[a + "ln_x.bias"], 64e-5).view(C)
                y = y + ((rh * kh * t[a + "r_k"].view(H, N)).sum(-1, keepdim=True) * vh).view(C)
                x = x + (y * g) @ t[a + "output.weight"]
            xx = _ln(x, t[f"blocks.{i}.ln2.weight"], t[f"blocks.{i}.ln2.bias"])
            sx = ffn_x[i]
            ffn_x[i] = xx
            d = sx - xx
            if v == 7:
                x = x + torch.relu((xx + d * t[f + "x_k"]) @ t[f + "key.weight"]) ** 2 @ t[f + "value.weight"]
            else:
                if v == 6:
                    xk, xr = xx + d * t[f + "time_maa_k"], xx + d * t[f + "time_maa_r"]
                else:
                    xk = xx * t[f + "time_mix_k"] + sx * (1 - t[f + "time_mix_k"])
                    xr = xx * t[f + "time_mix_r"] + sx * (1 - t[f + "time_mix_r"])
                rr = torch.sigmoid(xr @ t[f + "receptance.weight"])
                x = x + rr * (torch.relu(xk @ t[f + "key.weight"]) ** 2 @ t[f + "value.weight"])
            if rescale and (i + 1) % rescale == 0:
                x = x / 2
        outs.append(_ln(x, t["ln_out.weight"], t["ln_out.bias"]) @ t["head.weight"])
    return torch.stack(outs)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("rescale", [0, 2])
def test_rnn_form_is_what_an_rnn_runtime_consumes(tiny_models, version, rescale):
    """fp32, 1e-5 of the largest logit; with the fp16 rescale the halved residual changes what
    LayerNorm's eps does (LN(x/2^m, eps) = LN(x, 4^m eps)), a real but tiny change: 1e-4."""
    ck = tiny_models[version]
    rnn = to_rnn(ck, rescale)
    t = {k: rnn.tensors[k].float() for k in rnn.tensors}
    with torch.no_grad():
        ours = _rnn_logits(t, build_model(ck).spec, TOKENS[0].tolist(), rescale)
    ref = logits(ck)[0]
    assert max_rel(ours, ref) <= (1e-4 if rescale else 1e-5)


# ------------------------------------------------------------- every version x format x form
def _supported(version, fmt):
    return not (version == "5.1" and fmt in ("hf", "rwkvcpp"))


@pytest.mark.parametrize("src_form", ["parallel", "rnn"])
@pytest.mark.parametrize("fmt", ["pth", "safetensors", "hf", "rwkvcpp"])
@pytest.mark.parametrize("version", VERSIONS)
def test_convert_matrix(tmp_path, tiny_models, version, fmt, src_form):
    ck = tiny_models[version]
    src = str(tmp_path / "src.safetensors")
    write_safetensors(to_rnn(ck) if src_form == "rnn" else ck, src)
    dst = str(tmp_path / ("out" + EXT[fmt]))
    if not _supported(version, fmt):
        with pytest.raises(RwkvToolsError, match="5.1"):
            convert(src, dst)
        assert not os.path.exists(dst)
        return
    # pth/safetensors: write the other form than the source's, then come back
    to = ("parallel" if src_form == "rnn" else "rnn") if fmt in ("pth", "safetensors") else None
    rep = convert(src, dst, to=to)
    assert rep["format"] == fmt
    out = read_checkpoint(dst)
    if to:
        assert out.form == to
    back = to_parallel(out)
    ref = logits(ck)
    assert max_rel(logits(out), ref) <= 1e-5
    if fmt == "rwkvcpp" and version in ("4", "5.0", "5.2"):
        # rwkv.cpp stores exp-transformed decays; what is read back is the float32 value that the
        # same transform maps to the stored one: identical stored values, td itself may differ
        for k in ck.tensors:
            if k.endswith("time_decay") or k.endswith("time_first") and version != "4":
                op = "neg_exp" if version == "4" else ("exp" if k.endswith("time_first") else "exp_neg_exp")
                assert torch.equal(forward_value(op, back.tensors[k]), forward_value(op, ck.tensors[k])), k
            else:
                assert torch.equal(back.tensors[k], ck.tensors[k]), k
        return
    assert_same_tensors(ck, back)


def test_rnn_pth_keeps_its_manifest_and_loads(tmp_path, tiny_models):
    p = str(tmp_path / "r.pth")
    write_checkpoint(to_rnn(tiny_models["5.2"]), p)
    sd = torch.load(p, weights_only=True)
    assert "_rwkvtools_manifest" in sd
    assert torch.equal(logits(read_checkpoint(p)), logits(tiny_models["5.2"]))
    # a training-form .pth holds exactly the BlinkDL keys
    q = str(tmp_path / "p.pth")
    write_checkpoint(tiny_models["5.2"], q)
    assert list(torch.load(q, weights_only=True)) == list(tiny_models["5.2"].tensors)


# -------------------------------------------------------------------------------- dtypes
# max |logit diff| / max(1, max |logit|), fp32 model on cast weights; measured on these tiny
# models (v4, 5.2, 6, 7): fp16 2.6e-4..3.4e-4, bf16 2.2e-3..2.8e-3; the bounds leave ~3x margin
DTYPE_TOL = {"fp16": 1e-3, "bf16": 1e-2}


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("version", ["4", "5.2", "6", "7"])
def test_dtype_outputs(tmp_path, tiny_models, version, dtype):
    ck = tiny_models[version]
    src = str(tmp_path / "src.safetensors")
    write_safetensors(ck, src)
    for fmt in ("pth", "safetensors", "hf"):
        dst = str(tmp_path / (f"o-{fmt}" + EXT[fmt]))
        convert(src, dst, dtype=dtype)
        out = read_checkpoint(dst)
        want = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
        for k in out.tensors:
            x = out.tensors[k]
            assert x.dtype == (torch.float32 if keeps_fp32(k, tuple(x.shape)) else want), k
        assert any(out.tensors[k].dtype == want for k in out.tensors)
        assert max_rel(logits(out), logits(ck)) <= DTYPE_TOL[dtype], (fmt, dtype)


def test_keeps_fp32_rule():
    assert keeps_fp32("blocks.0.att.time_decay", (8, 8))          # v5.2 decay
    assert keeps_fp32("blocks.0.att.r_k", (4, 16))
    assert keeps_fp32("blocks.0.att.time_mix_k", (1, 1, 64))
    assert keeps_fp32("blocks.0.ln1.weight", (64,))
    assert not keeps_fp32("blocks.0.att.key.weight", (64, 64))
    assert not keeps_fp32("blocks.0.att.w1", (64, 32))
    assert not keeps_fp32("emb.weight", (97, 64))


def test_cast_is_lazy_and_keeps_vectors(tiny_models):
    c = cast(tiny_models["7"], "bf16")
    assert isinstance(c.tensors, LazyTensors)
    assert c.dtype("blocks.0.att.key.weight") == torch.bfloat16 and c.dtype("blocks.0.att.w0") == torch.float32
    assert c.history[-1]["transform"] == "cast"


def test_rwkvcpp_fp16_from_random(tmp_path, tiny_models):
    src = str(tmp_path / "s.safetensors")
    write_safetensors(tiny_models["7"], src)
    convert(src, str(tmp_path / "h.bin"), dtype="fp16")
    out = read_checkpoint(str(tmp_path / "h.bin"))
    assert out.manifest["source_format"]["data_type"] == "FP16"
    assert max_rel(logits(out), logits(tiny_models["7"])) <= DTYPE_TOL["fp16"]


# ------------------------------------------------------------------- rwkv.cpp byte identity
def _bytes(p):
    with open(p, "rb") as f:
        return f.read()


@pytest.mark.parametrize("stem,dtype,version", [("tiny-rwkv-7v0-834K", "FP32", None),
                                                ("tiny-rwkv-7v0-834K", "FP16", None),
                                                ("tiny-rwkv-4v0-660K", "FP32", 100)])
def test_rwkvcpp_writer_reproduces_converter(tmp_path, stem, dtype, version):
    out = str(tmp_path / "o.bin")
    write_rwkvcpp(read_checkpoint(fixture_path(stem + ".pth")), out, dtype, version=version)
    assert _bytes(out) == _bytes(fixture_path(f"{stem}-{dtype}.bin"))


BIN_FIXTURES = ["tiny-rwkv-4v0-660K-FP16.bin", "tiny-rwkv-4v0-660K-FP32.bin", "tiny-rwkv-5v1-730K-FP32.bin",
                "tiny-rwkv-5v2-730K-FP16.bin", "tiny-rwkv-5v2-730K-FP32.bin", "tiny-rwkv-5v2-730K-Q5_1.bin",
                "tiny-rwkv-6v0-3m-Q5_0.bin", "tiny-rwkv-6v0-3m-Q5_1.bin", "tiny-rwkv-7v0-834K-FP16.bin",
                "tiny-rwkv-7v0-834K-FP32.bin", "tiny-rwkv-7v0-834K-Q5_1.bin"]


@pytest.mark.parametrize("name", BIN_FIXTURES)
def test_rwkvcpp_read_write_is_byte_identical(tmp_path, name):
    ck = read_checkpoint(fixture_path(name))
    out = str(tmp_path / "o.bin")
    write_rwkvcpp(ck, out, ck.manifest["source_format"]["data_type"])
    assert _bytes(out) == _bytes(fixture_path(name))


def test_rwkvcpp_v4_decays_that_log_does_not_invert_roundtrip(tmp_path, tiny_models):
    """float32 log does not invert -exp bit for bit everywhere (about 0.2% of decays): for such
    decays the reader must still find the float32 value whose -exp is the stored one, so that
    reading and writing the file again gives the same bytes."""
    x = torch.empty(100000).uniform_(-8.0, 3.0, generator=torch.Generator().manual_seed(0))
    hard = x[-torch.exp(torch.log(torch.exp(x))) != -torch.exp(x)]
    t = dict(tiny_models["4"].tensors)
    for k in t:
        if k.endswith("att.time_decay"):
            assert hard.numel() >= t[k].numel()
            t[k] = hard[:t[k].numel()].reshape(t[k].shape).clone()
    a, b = str(tmp_path / "a.bin"), str(tmp_path / "b.bin")
    write_rwkvcpp(Checkpoint(t), a)
    write_rwkvcpp(read_checkpoint(a), b)
    assert _bytes(a) == _bytes(b)


@pytest.mark.parametrize("stem", ["tiny-rwkv-5v2-730K", "tiny-rwkv-7v0-834K"])
def test_rwkvcpp_quantizer_reproduced(tmp_path, stem):
    out = str(tmp_path / "q.bin")
    write_rwkvcpp(read_checkpoint(fixture_path(stem + "-FP32.bin")), out, "Q5_1")
    assert _bytes(out) == _bytes(fixture_path(stem + "-Q5_1.bin"))


@pytest.mark.parametrize("version", ["5.2", "7"])
def test_rwkvcpp_quantized_from_fp16_base_is_rwkvcpp_quantizer_on_the_fp16_file(tmp_path, version):
    """base_type FP16: the bytes rwkv.cpp's quantizer writes from our FP16 file, i.e. every record
    the FP16 file stores in 16 bits quantized from those float16 values."""
    from rwkvtools.io import ggml_quants
    from rwkvtools.io.rwkvcpp import TYPE_NAMES, read_rwkvcpp, scan
    ck = random_checkpoint(version, n_layer=2, n_embd=64, head_size=16, vocab=97, seed=3)
    f16, q = str(tmp_path / "f16.bin"), str(tmp_path / "q.bin")
    write_rwkvcpp(ck, f16, "FP16")
    write_rwkvcpp(ck, q, "Q5_1", base_type="FP16")
    stored = read_rwkvcpp(f16, raw=True).tensors
    qrecs = {r.name: r for r in scan(q)[1]}
    data = _bytes(q)
    n = 0
    for r in scan(f16)[1]:
        if needs_quant(r.name, len(r.shape)) and TYPE_NAMES[r.dtype] == "FP16":
            want = ggml_quants.quantize("Q5_1", stored[r.name].float().numpy())
            got = np.frombuffer(data, np.uint8, qrecs[r.name].nbytes, qrecs[r.name].offset)
            assert np.array_equal(got, want), r.name
            n += 1
    assert n >= 8


@pytest.mark.parametrize("via", ["writer", "quantize"])
def test_rwkvcpp_quantizer_from_fp16_base_quantizes_fp32_records_as_stored(tmp_path, via):
    """rwkv.cpp's quantizer converts FP16 records to float32 and quantizes FP32 records as they are;
    a v6 FP16 file keeps time_maa_w1 / time_decay_w1 / time_decay_w2 (2-D, quantized) in FP32."""
    from rwkvtools.io import ggml_quants
    from rwkvtools.io.rwkvcpp import read_rwkvcpp, scan
    from rwkvtools.transforms.quantize import QuantizeConfig, quantize, write_quantized
    ck = random_checkpoint("6", n_layer=2, n_embd=64, head_size=16, vocab=97, seed=3)
    f16, q = str(tmp_path / "f16.bin"), str(tmp_path / "q.bin")
    write_rwkvcpp(ck, f16, "FP16")
    if via == "writer":
        write_rwkvcpp(ck, q, "Q5_1", base_type="FP16")
    else:
        write_quantized(quantize(read_checkpoint(f16), QuantizeConfig("Q5_1")), q)
    stored = read_rwkvcpp(f16, raw=True)
    qrecs = {r.name: r for r in scan(q)[1]}
    data = _bytes(q)
    n = 0
    for r in scan(f16)[1]:
        if needs_quant(r.name, len(r.shape)):
            want = ggml_quants.quantize("Q5_1", stored.tensors[r.name].float().numpy())
            got = np.frombuffer(data, np.uint8, qrecs[r.name].nbytes, qrecs[r.name].offset)
            assert np.array_equal(got, want), r.name
            n += 1
    assert n > 6


def test_rwkvcpp_blocks_api(tmp_path):
    from rwkvtools.io import ggml_quants
    ck = read_checkpoint(fixture_path("tiny-rwkv-7v0-834K-FP32.bin"))
    recs = dict(file_records(ck))
    name = "blocks.3.ffn.key.weight"
    x = recs[name]()
    blocks = {name: ("Q8_0", ggml_quants.quantize("Q8_0", x.numpy()))}
    out = str(tmp_path / "b.bin")
    write_rwkvcpp(ck, out, "FP32", blocks=blocks)
    back = read_checkpoint(out)
    assert back.manifest["source_format"]["tensor_types"] == ["FP32", "Q8_0"]
    assert 0 < float((back.tensors[name] - x).abs().max()) <= float(x.abs().max()) / 127
    assert needs_quant(name, 2) and not needs_quant("blocks.3.att.w1", 2) and not needs_quant("emb.weight", 2)
    with pytest.raises(FormatError, match="does not quantize"):
        write_rwkvcpp(ck, out, "FP32", blocks={"blocks.0.att.w1": ("Q8_0", np.zeros(10, np.uint8))})
    with pytest.raises(FormatError, match="needs"):
        write_rwkvcpp(ck, out, "FP32", blocks={name: ("Q8_0", np.zeros(10, np.uint8))})
    with pytest.raises(FormatError, match="not in the file"):
        write_rwkvcpp(ck, out, "FP32", blocks={"nope": ("Q8_0", np.zeros(10, np.uint8))})


# ---------------------------------------------------------------- official runtimes load ours
def test_pth_output_loads_in_chatrwkv(tmp_path, tiny_models):
    pytest.importorskip("rwkv", reason="ChatRWKV's rwkv package is a test dependency: pip install -e .[test]")
    from test_chatrwkv import chatrwkv_logits
    toks = TOKENS[0].tolist()
    # an RNN-form file back to a training .pth, and an rwkv.cpp file (FP16, v7) to .pth
    rnn_src = str(tmp_path / "v5-rnn.safetensors")
    write_safetensors(to_rnn(tiny_models["5.2"]), rnn_src)
    cases = [("5.2", rnn_src, False), ("7", fixture_path("tiny-rwkv-7v0-834K-FP16.bin"), True)]
    for version, src, v7 in cases:
        pth = str(tmp_path / f"v{version}.pth")
        convert(src, pth, to="parallel")
        theirs = chatrwkv_logits(pth, toks, v7, str(tmp_path / f"o{version}.npz"))
        ours = logits(read_checkpoint(src), torch.tensor([toks]))[0].numpy()
        assert np.abs(ours - theirs["seq"]).max() <= 1e-5, version
        assert np.abs(ours - theirs["step"]).max() <= 1e-5, version


def test_hf_v4_output_loads_in_transformers(tmp_path):
    import transformers  # test extra
    out = str(tmp_path / "hf4")
    convert(fixture_path("tiny-rwkv-4v0-660K.pth"), out)
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["model_type"] == "rwkv" and cfg["num_hidden_layers"] == 4
    m = transformers.RwkvForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    toks = torch.tensor([list(b"Hello world, this is RWKV")])
    with torch.no_grad():
        theirs = m(toks).logits
    ours = logits(read_checkpoint(fixture_path("tiny-rwkv-4v0-660K.pth")), toks)
    assert max_rel(theirs, ours) <= 1e-5


def test_hf_v7_layout_names(tmp_path, tiny_models):
    out = str(tmp_path / "hf7")
    write_checkpoint(tiny_models["7"], out, "hf")
    from safetensors import safe_open
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.layers.1.attn.w_lora.lora.0.weight").shape == (32, 64)  # w1^T (D, C)
        assert f.metadata()["format"] == "pt"
    assert {"model.embeddings.weight", "lm_head.weight", "model.layers.0.pre_norm.weight",
            "model.layers.2.attn.g_norm.bias", "model.layers.1.attn.v_lora.lora.2.bias"} <= keys
    assert not any(k.startswith("model.layers.0.attn.v_lora") for k in keys)
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["architectures"] == ["RWKV7ForCausalLM"] and cfg["decay_low_rank_dim"] == 32


# ------------------------------------------------------------------------------- streaming
def _counting(ck: Checkpoint):
    alive = {"now": 0, "max": 0}

    def gone():
        alive["now"] -= 1

    def load(k):
        t = ck.tensors[k].clone()
        alive["now"] += 1
        alive["max"] = max(alive["max"], alive["now"])
        weakref.finalize(t, gone)
        return t
    names = list(ck.tensors)
    lazy = LazyTensors(names, load, {k: tuple(ck.tensors[k].shape) for k in names},
                       {k: ck.tensors[k].dtype for k in names})
    return Checkpoint(lazy, ck.manifest), alive


@pytest.mark.parametrize("fmt", ["safetensors", "rwkvcpp", "hf"])
def test_writers_stream_tensor_by_tensor(tmp_path, tiny_models, fmt):
    ck, alive = _counting(tiny_models["7"])
    write_checkpoint(ck, str(tmp_path / ("o" + EXT[fmt])), fmt)
    assert alive["max"] <= 6, alive  # rwkv.cpp concatenates the six v7 x_* vectors


def test_rnn_form_streams(tmp_path, tiny_models):
    ck, alive = _counting(tiny_models["6"])
    write_safetensors(to_rnn(ck), str(tmp_path / "r.safetensors"))
    assert alive["max"] <= 2, alive


def test_failed_write_leaves_nothing(tmp_path, tiny_models):
    ck = tiny_models["7"]
    names = list(ck.tensors)

    def load(k):
        if k == names[len(names) // 2]:
            raise RuntimeError("disk on fire")
        return ck.tensors[k]
    bad = Checkpoint(LazyTensors(names, load, {k: tuple(ck.tensors[k].shape) for k in names},
                                 {k: ck.tensors[k].dtype for k in names}), ck.manifest)
    for fmt in ("safetensors", "rwkvcpp", "hf"):
        dst = tmp_path / ("o" + EXT[fmt])
        with pytest.raises(RuntimeError):
            write_checkpoint(bad, str(dst), fmt)
        assert not dst.exists()
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------- CLI, errors
runner = CliRunner()


def cli(*args):
    return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_a_gate_fails_when_the_converted_model_gives_nan(tmp_path):
    """A head that overflows fp16 makes the converted model's perplexity NaN: the gate must fail
    (NaN compares false with every bound), exit 1, no DST; a NaN bound is refused."""
    ck = random_checkpoint("7", 2, 64, 256, 16, seed=2)
    ck.tensors["head.weight"][:3] = 1e6  # inf in fp16
    src, dst = tmp_path / "m.safetensors", tmp_path / "h.safetensors"
    write_safetensors(ck, str(src))
    res = cli("convert", src, dst, "--dtype", "fp16", "--max-ppl-increase", 50, "--eval-tokens", 200, "--json")
    assert res.exit_code == 1, res.output
    rep = json.loads(res.stdout, parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))
    assert rep["validation"]["ppl_after"] is None  # NaN, written as null
    assert rep["validation"]["passed"] is False and "not a number" in rep["validation"]["gates"][0]["detail"]
    assert not dst.exists()
    res = cli("convert", src, dst, "--max-ppl-increase", "nan")
    assert res.exit_code == 2 and "must be a finite number" in res.output and not dst.exists(), res.output


def test_output_format_comes_from_the_name_and_an_unknown_extension_is_refused(tmp_path):
    """An extension no format has used to mean safetensors (`x.onnx`, an HF folder named
    `RWKV-7-1.5B` got a safetensors file): now a clear error before anything is written; --format
    still names the format explicitly."""
    from rwkvtools.io.writers import format_from_path
    assert [format_from_path(str(tmp_path / n)) for n in ("a.pth", "a.PT", "a.safetensors", "a.bin", "a.gguf", "hf")] \
        == ["pth", "pth", "safetensors", "rwkvcpp", "gguf", "hf"]
    (tmp_path / "old.v2").mkdir()
    assert format_from_path(str(tmp_path / "old.v2")) == "hf"  # an existing folder is a folder
    src = tmp_path / "m.safetensors"
    write_safetensors(random_checkpoint("7", 2, 64, 256, 16, seed=2), str(src))
    for name, hint in (("m.onnx", "export-onnx"), ("RWKV-7-1.5B", "'.5B'"), ("m.xyz", "'.xyz'")):
        res = runner.invoke(main, ["convert", str(src), str(tmp_path / name), "--no-validate"])
        assert res.exit_code == 2 and "cannot tell the output format" in res.output and hint in res.output, res.output
        assert not (tmp_path / name).exists()
    res = cli("convert", src, tmp_path / "RWKV-7-1.5B", "--format", "hf", "--no-validate")
    assert res.exit_code == 0 and (tmp_path / "RWKV-7-1.5B" / "config.json").is_file(), res.output


def test_cli_convert_json_report(tmp_path):
    src = tmp_path / "m.safetensors"
    write_safetensors(random_checkpoint("5.2", 2, 64, 256, 16, seed=2), str(src))
    res = cli("convert", src, tmp_path / "m-rnn.safetensors", "--to", "rnn", "--json", "--eval-tokens", 200)
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output)
    assert rep["form_before"] == "parallel" and rep["form_after"] == "rnn" and rep["version"] == "5.2"
    assert rep["tensors_compared"]["max_abs_diff"] == 0.0
    assert rep["validation"]["logits_drift"]["max_abs"] == 0.0
    info = json.loads(cli("inspect", tmp_path / "m-rnn.safetensors", "--json").output)
    assert info["form"] == "rnn" and info["version"] == "5.2"
    res = cli("convert", tmp_path / "m-rnn.safetensors", tmp_path / "m.bin", "--no-validate")
    assert res.exit_code == 0 and "rwkvcpp" in res.output
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(tmp_path / "m.bin").st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def _bad_files(tmp_path, tiny_models):
    sd = dict(tiny_models["7"].tensors)
    sd["blocks.0.att.mystery"] = torch.zeros(3)
    torch.save(sd, tmp_path / "unknown.pth")
    sd = dict(tiny_models["7"].tensors)
    sd["blocks.2.att.key.weight"] = torch.zeros(64, 32)
    torch.save(sd, tmp_path / "shape.pth")
    torch.save(dict(tiny_models["5.1"].tensors), tmp_path / "v51.pth")
    torch.save(dict(tiny_models["7"].tensors), tmp_path / "ok.pth")
    (tmp_path / "exists.safetensors").write_bytes(b"keep me")


@pytest.mark.parametrize("case,args,match", [
    ("unknown keys", ["unknown.pth", "o.safetensors"], "blocks.0.att.mystery"),
    ("mismatched shape", ["shape.pth", "o.safetensors"], "blocks.2.att.key.weight"),
    ("v5.1 to rwkv.cpp", ["v51.pth", "o.bin"], "5.1"),
    ("v5.1 to hf", ["v51.pth", "o"], "5.1"),
    ("dst exists", ["ok.pth", "exists.safetensors"], "exists"),
    ("dst is src", ["ok.pth", "ok.pth", "--force"], "input"),
    ("rnn to rwkv.cpp", ["ok.pth", "o.bin", "--to", "parallel"], "rwkv.cpp"),
    ("rnn to hf", ["ok.pth", "o", "--to", "rnn"], "training"),
    ("bf16 rwkv.cpp", ["ok.pth", "o.bin", "--dtype", "bf16"], "bf16"),
    ("missing src", ["nope.pth", "o.safetensors"], "no such file"),
    ("bad writer option", ["ok.pth", "o.pth", "--writer-option", "colour=blue"], "no options"),
])
def test_cli_bad_input(tmp_path, tiny_models, case, args, match):
    _bad_files(tmp_path, tiny_models)
    before = sorted(os.listdir(tmp_path))
    res = cli("convert", *[tmp_path / a if not a.startswith("-") and a not in ("parallel", "rnn", "bf16", "colour=blue") else a
                           for a in args], "--no-validate")
    assert res.exit_code == 2, (case, res.output)
    assert "error:" in res.output and match in res.output, res.output
    assert "Traceback" not in res.output
    assert sorted(os.listdir(tmp_path)) == before  # no partial output, no temp files
    assert (tmp_path / "exists.safetensors").read_bytes() == b"keep me"


def test_hf_output_never_replaces_a_working_folder(tmp_path, tiny_models):
    src = tmp_path / "work" / "m.safetensors"
    src.parent.mkdir()
    write_safetensors(tiny_models["7"], str(src))
    (tmp_path / "work" / "notes.txt").write_text("precious")
    for dst in (tmp_path / "work", tmp_path):
        with pytest.raises(RwkvToolsError, match="holds the input|does not look like"):
            convert(str(src), str(dst), format="hf", force=True)
    assert (tmp_path / "work" / "notes.txt").read_text() == "precious"
    out = tmp_path / "hf"
    convert(str(src), str(out))
    convert(str(src), str(out), force=True)  # a model folder may be replaced
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]


def test_hf_reader_refuses_hostile_index(tmp_path, tiny_models):
    out = tmp_path / "hf"
    write_checkpoint(tiny_models["4"], str(out), "hf")
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"head.weight": "../../etc/passwd"}}))
    with pytest.raises(FormatError, match="plain file name"):
        read_checkpoint(str(out))
    os.unlink(out / "model.safetensors.index.json")
    cfg = json.load(open(out / "config.json"))
    cfg["hidden_size"] = 999
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match="hidden_size"):
        read_checkpoint(str(out))
    cfg["model_type"] = "llama"
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match="llama"):
        read_checkpoint(str(out))


def test_spec_error_for_rnn_manifest_damage(tmp_path, tiny_models):
    r = to_rnn(tiny_models["5.0"])
    man = dict(r.manifest)
    man.pop("rnn")
    with pytest.raises(SpecError, match="rnn"):
        to_parallel(Checkpoint(r.tensors, man))


def test_compare_checkpoints_reports_differences(tiny_models):
    a = tiny_models["7"]
    t = dict(a.tensors)
    t["blocks.1.att.key.weight"] = t["blocks.1.att.key.weight"] + 0.5
    rep = compare_checkpoints(a, Checkpoint(t, a.manifest))
    assert rep["max_abs_diff"] == pytest.approx(0.5) and rep["max_abs_diff_tensor"] == "blocks.1.att.key.weight"
    assert rep["identical"] == rep["compared"] - 1
    # a NaN the output has and the source has not is as far apart as can be (NaN compares false
    # with every bound); a NaN both have at the same place is kept, not a difference
    t2 = dict(a.tensors)
    t2["blocks.0.ffn.key.weight"] = t2["blocks.0.ffn.key.weight"].clone()
    t2["blocks.0.ffn.key.weight"][0, 0] = float("nan")
    rep = compare_checkpoints(a, Checkpoint(t2, a.manifest))
    assert rep["max_abs_diff"] == math.inf and rep["max_abs_diff_tensor"] == "blocks.0.ffn.key.weight"
    rep = compare_checkpoints(Checkpoint(t2, a.manifest), Checkpoint(dict(t2), a.manifest))
    assert rep["max_abs_diff"] == 0.0 and rep["identical"] == rep["compared"]  # though torch.equal is False on NaN


def test_python_convert_never_writes_into_or_over_its_input(tmp_path, tiny_models):
    """convert() (the Python API) refuses what the command refuses: DST inside an HF source
    folder, DST that is SRC through a symlink, a folder DST that holds SRC; the input is left
    byte for byte."""
    hf = tmp_path / "hf"
    write_checkpoint(tiny_models["7"], str(hf), "hf")
    before = {p.name: p.read_bytes() for p in hf.iterdir()}
    for dst in (hf / "model.safetensors", hf / "other.pth"):
        with pytest.raises(RwkvToolsError, match="inside the input folder"):
            convert(str(hf), str(dst), force=True)
    assert {p.name: p.read_bytes() for p in hf.iterdir()} == before

    src = tmp_path / "m.safetensors"
    write_checkpoint(tiny_models["7"], str(src), "safetensors")
    link = tmp_path / "link.safetensors"
    link.symlink_to(src)
    data = src.read_bytes()
    with pytest.raises(RwkvToolsError, match="is the input file"):
        convert(str(src), str(link), force=True)
    inner = tmp_path / "d"
    inner.mkdir()
    src2 = inner / "m.safetensors"
    src2.write_bytes(data)
    with pytest.raises(RwkvToolsError, match="holds the input"):
        convert(str(src2), str(inner), format="hf", force=True)
    assert src.read_bytes() == data and src2.read_bytes() == data


def test_rnn_form_keeps_no_original_where_the_decay_transform_inverts(tiny_models):
    """v4 -exp(td) is injective in fp32 for |td| >= 2 (test_invert_value_reproduces_the_stored_value):
    with every decay there, the RNN form must keep no original and still round-trip bit for bit."""
    ck = tiny_models["4"]
    t = dict(ck.tensors)
    for k in [k for k in t if k.endswith("time_decay")]:
        g = torch.Generator().manual_seed(len(k))
        x = torch.empty(t[k].shape).uniform_(2.0, 4.0, generator=g)
        t[k] = torch.where(torch.rand(t[k].shape, generator=g) < 0.5, -x, x)
    ck = ck.with_tensors(t, entry={"transform": "test-decays", "options": {}})
    rnn = to_rnn(ck)
    assert not [k for k in rnn.tensors if k.startswith(RESERVED)]
    assert rnn.manifest["rnn"]["tensors"]["blocks.0.att.time_decay"]["value"] == "neg_exp"
    assert_same_tensors(ck, to_parallel(rnn))


def test_rnn_form_with_another_rescale_is_redone_from_the_training_form(tiny_models):
    """to_rnn of an RNN-form checkpoint with another rescale_every undoes the first and applies
    the new one: the same tensors as converting the training form directly."""
    ck = tiny_models["5.2"]
    again = to_rnn(to_rnn(ck, 0), 2)
    direct = to_rnn(ck, 2)
    assert again.manifest["rnn"]["rescale_every"] == 2
    assert_same_tensors(direct, again)
    assert torch.equal(logits(ck), logits(again))
    with pytest.raises(SpecError, match="rescale_every must be >= 0"):
        to_rnn(ck, -1)


def test_rnn_manifest_record_with_a_shape_of_another_size_is_refused_up_front(tiny_models):
    """A record whose training-form shape holds another number of values than the stored tensor
    is damage, reported by to_parallel itself (not a reshape error when the tensor is read)."""
    rnn = to_rnn(tiny_models["5.2"])
    rec = rnn.manifest["rnn"]["tensors"]["blocks.0.ffn.key.weight"]
    assert "kept" not in rec and rec["T"]
    rec["shape"] = [7, 7]
    with pytest.raises(SpecError, match="record of 'blocks.0.ffn.key.weight' is damaged"):
        to_parallel(rnn)


def _fp16_with_tiny_values(ck):
    """ck in fp16 with values around fp16's smallest normal (2^-14 = 6.1e-5) and subnormals in the
    rescaled matrices: halving them loses their low bits (the audit's fixture case: 1.1700e-4 came
    back as 1.1706e-4 after a --rescale-every round trip)."""
    t = {k: (v.half() if v.is_floating_point() else v) for k, v in ck.tensors.items()}
    g = torch.Generator().manual_seed(3)
    for k in t:
        if k.endswith(("att.output.weight", "ffn.value.weight")):
            w = t[k].clone().flatten()
            pick = torch.randperm(w.numel(), generator=g)[:40]
            w[pick] = (torch.rand(40, generator=g) * 2.4e-4 - 1.2e-4).half()   # normals near 2^-14, subnormals
            w[pick[:2]] = torch.tensor([2 ** -24, -(2 ** -23) * 3], dtype=torch.float16)  # halved: 0 / rounded
            t[k] = w.reshape(t[k].shape)
    return Checkpoint(t, ck.manifest)


@pytest.mark.parametrize("rescale", [1, 2])
@pytest.mark.parametrize("version", ["5.2", "7"])
def test_fp16_rescale_round_trip_is_bit_exact(tiny_models, version, rescale):
    """fp16 / 2^k pushes small values below the normal range, where they lose low bits: to_rnn
    keeps those elements (indices and original values) so that to_parallel gives every tensor
    back bit for bit; the kept part is small."""
    ck = _fp16_with_tiny_values(tiny_models[version])
    rnn = to_rnn(ck, rescale)
    lost = [k for k in rnn.tensors if k.startswith(RESERVED) and k.endswith(".lost_value")]
    assert lost, "no element lost bits: the test's values do not exercise the rescale"
    assert sum(rnn.tensors[k].numel() for k in lost) < 0.05 * sum(
        ck.tensors[k].numel() for k in ck.tensors if k.endswith(("att.output.weight", "ffn.value.weight")))
    back = to_parallel(rnn)
    for k in ck.tensors:
        x, y = ck.tensors[k], back.tensors[k]
        assert x.dtype == y.dtype and torch.equal(x.view(torch.int16) if x.dtype == torch.float16 else x,
                                                  y.view(torch.int16) if y.dtype == torch.float16 else y), k


def test_rnn_form_counts_the_same_parameters(tiny_models):
    """The RNN form's reserved tensors (kept decays, elements a rescale lost bits of) are the way
    back, not parameters: inspect showed the v5.2 fixture's RNN form with 56K more parameters."""
    from rwkvtools.spec import param_groups
    for v in ("5.2", "7"):
        ck = _fp16_with_tiny_values(tiny_models[v])
        rnn = to_rnn(ck, 1)
        assert [k for k in rnn.tensors if k.startswith(RESERVED)]
        assert rnn.num_params() == ck.num_params() and param_groups(rnn.tensors) == param_groups(ck.tensors)


def test_fp16_rescale_lost_elements_are_checked_when_read(tiny_models):
    """The kept elements come from a file: indices outside the tensor, or index/value tensors of
    other lengths or dtypes, are damage reported before anything is indexed."""
    rnn = to_rnn(_fp16_with_tiny_values(tiny_models["7"]), 1)
    name, rec = next((k, r) for k, r in rnn.manifest["rnn"]["tensors"].items() if r.get("lost"))
    ik, vk = rec["lost"]
    tensors = {k: rnn.tensors[k] for k in rnn.tensors}
    for bad, msg in [({ik: tensors[ik] + 10 ** 9}, "indices outside"),
                     ({ik: tensors[ik].int()}, "expected as many int64 indices"),
                     ({vk: tensors[vk][:-1]}, "expected as many int64 indices")]:
        broken = Checkpoint({**tensors, **bad}, json.loads(json.dumps(rnn.manifest)))
        with pytest.raises(SpecError, match=msg):
            to_parallel(broken)
    gone = Checkpoint({k: v for k, v in tensors.items() if k != vk}, json.loads(json.dumps(rnn.manifest)))
    with pytest.raises(SpecError, match="does not contain"):
        to_parallel(gone)


def test_rnn_form_refuses_quantized_linears(tiny_models):
    from rwkvtools.transforms.quantize import QuantizeConfig, quantize
    q = quantize(tiny_models["7"], QuantizeConfig("int8"))
    with pytest.raises(SpecError, match="cannot be put in RNN form"):
        to_rnn(q)


def test_rwkvcpp_refusal_names_the_way_out_for_the_representation_it_meets(tiny_models, tmp_path):
    """int8 linears were told to 'merge low-rank factors' (lowrank --merge), which does nothing
    for them; each stored form gets its own way out."""
    from rwkvtools.transforms.lowrank import LowRankConfig, lowrank
    from rwkvtools.transforms.quantize import QuantizeConfig, quantize
    q = quantize(tiny_models["5.2"], QuantizeConfig("int8"))
    with pytest.raises(FormatError, match="quantize the dense original straight to rwkv.cpp") as e:
        write_rwkvcpp(q, str(tmp_path / "q.bin"))
    assert "low-rank" not in str(e.value) and "--merge" not in str(e.value)
    lr = lowrank(tiny_models["5.2"], LowRankConfig(rank=0.5, method="svd"))
    with pytest.raises(FormatError, match="merge the low-rank factors first .*--merge"):
        write_rwkvcpp(lr, str(tmp_path / "l.bin"))
    assert not list(tmp_path.iterdir())


def test_invert_value_of_a_decay_of_exactly_one_is_finite():
    """exp(-exp(td)) rounds to 1.0 in fp32 for td below ~-17: the inverse must be a finite td that
    reproduces 1.0 (not log(0) = -inf), and decay 0 likewise."""
    y = torch.tensor([1.0, 0.0])
    back, ok = invert_value("exp_neg_exp", y)
    assert bool(ok.all()) and bool(torch.isfinite(back).all())
    assert torch.equal(forward_value("exp_neg_exp", back), y)


def test_check_layout_refuses_a_vector_of_another_size(tiny_models):
    """Vectors may come in any layout of their values ((1, 1, C) or (C,)), but not another number
    of values."""
    from rwkvtools.transforms.convert import check_layout
    ck = tiny_models["5.2"]
    t = dict(ck.tensors)
    t["blocks.1.att.time_mix_k"] = t["blocks.1.att.time_mix_k"].reshape(-1)      # (C,): fine
    check_layout(ck.with_tensors(t))
    t["blocks.1.att.time_mix_k"] = torch.zeros(1, 1, 65)
    with pytest.raises(SpecError, match=r"'blocks.1.att.time_mix_k' has shape \(1, 1, 65\)"):
        check_layout(ck.with_tensors(t))


def test_convert_rnn_source_keeps_its_rescale_and_refuses_one_for_the_training_form(tmp_path, tiny_models):
    """convert of an RNN-form file keeps the file's rescale_every unless told otherwise; a rescale
    for a training-form output is refused (it exists only in the RNN form)."""
    ck = tiny_models["5.2"]
    src = tmp_path / "r.safetensors"
    write_safetensors(to_rnn(ck, 2), str(src))
    convert(str(src), str(tmp_path / "a.pth"))
    out = read_checkpoint(str(tmp_path / "a.pth"))
    assert out.form == "rnn" and out.manifest["rnn"]["rescale_every"] == 2
    assert_same_tensors(to_rnn(ck, 2), out)
    convert(str(src), str(tmp_path / "b.pth"), rescale_every=0)
    assert read_checkpoint(str(tmp_path / "b.pth")).manifest["rnn"]["rescale_every"] == 0
    with pytest.raises(RwkvToolsError, match="--rescale-every applies to the RNN form"):
        convert(str(src), str(tmp_path / "c.pth"), to="parallel", rescale_every=2)
    assert not (tmp_path / "c.pth").exists()


def test_compare_checkpoints_reports_a_shape_mismatch(tiny_models):
    a = tiny_models["5.2"]
    t = dict(a.tensors)
    t["blocks.0.att.key.weight"] = t["blocks.0.att.key.weight"][:32].clone()
    rep = compare_checkpoints(a, a.with_tensors(t))
    assert rep["shape_mismatch"] == "blocks.0.att.key.weight" and rep["max_abs_diff"] == math.inf


def test_python_convert_refuses_an_unknown_form_or_dtype(tmp_path, tiny_models):
    src = tmp_path / "m.safetensors"
    write_safetensors(tiny_models["5.2"], str(src))
    with pytest.raises(RwkvToolsError, match="--to must be one of parallel, rnn, got 'rnnn'"):
        convert(str(src), str(tmp_path / "a.pth"), to="rnnn")
    with pytest.raises(RwkvToolsError, match="--dtype must be one of"):
        convert(str(src), str(tmp_path / "a.pth"), dtype="fp8")
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]


# ---------------------------------------------------------------------- writer options
@pytest.mark.parametrize("dst,option,match", [
    ("o.safetensors", "bogus=1", "safetensors writer has no option 'bogus'; its options: extra_metadata"),
    ("o.bin", "bogus=1", "rwkvcpp writer has no option 'bogus'; its options: data_type"),
    ("o.gguf", "bogus=1", "gguf writer has no option 'bogus'; its options: dtype"),
    ("o", "bogus=1", "hf writer takes no options (bogus)"),
    ("o.bin", "version=abc", "option 'version' must be an integer, got 'abc'"),
    ("o.safetensors", "extra_metadata=5", "must be a JSON object of strings, got 5"),
    ("o.safetensors", 'extra_metadata={"a": 1}', "must be a JSON object of strings"),
    ("o.bin", "blocks=3", "rwkvcpp writer has no option 'blocks'"),       # Python only (quantize's blocks)
    ("o.gguf", "blocks=[1]", "gguf writer has no option 'blocks'"),
    ("o.bin", "progress=5", "no option 'progress' (use --progress)"),
])
def test_cli_bad_writer_option_is_a_clear_error_before_any_work(tmp_path, dst, option, match):
    """Each was an internal error (TypeError/AttributeError inside the writer, after the work)."""
    src = fixture_path("tiny-rwkv-7v0-834K.pth")
    res = cli("convert", src, tmp_path / dst, "--writer-option", option, "--no-validate")
    assert res.exit_code == 2, res.output
    assert "error:" in res.output and match in res.output and "internal error" not in res.output, res.output
    assert os.listdir(tmp_path) == []


def test_cli_writer_options_reach_the_writer_with_their_kind(tmp_path):
    import gguf
    from safetensors import safe_open
    src5 = fixture_path("tiny-rwkv-5v2-730K-FP32.bin")
    res = cli("convert", src5, tmp_path / "m.bin", "--writer-option", "version=100", "--no-validate")
    assert res.exit_code == 0, res.output
    assert read_checkpoint(str(tmp_path / "m.bin")).manifest["source_format"]["version"] == 100
    res = cli("convert", src5, tmp_path / "m.safetensors", "--writer-option", 'extra_metadata={"owner": "me"}',
              "--no-validate")
    assert res.exit_code == 0, res.output
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        assert f.metadata()["owner"] == "me"
    # a string option keeps the command line's text (the value 5 was passed on as the int 5)
    res = cli("convert", fixture_path("tiny-rwkv-7v0-834K.pth"), tmp_path / "m.gguf", "--writer-option", "name=5",
              "--no-validate")
    assert res.exit_code == 0, res.output
    assert gguf.GGUFReader(str(tmp_path / "m.gguf")).fields["general.name"].contents() == "5"


def test_python_convert_refuses_an_unknown_writer_option_before_any_work(tmp_path):
    with pytest.raises(RwkvToolsError, match="safetensors writer has no option 'form'; its options: extra_metadata"):
        convert(fixture_path("tiny-rwkv-7v0-834K.pth"), str(tmp_path / "m.safetensors"), form="rnn")
    with pytest.raises(RwkvToolsError, match="option 'version' must be an integer, got '101'"):
        convert(fixture_path("tiny-rwkv-7v0-834K.pth"), str(tmp_path / "m.bin"), version="101")
    assert os.listdir(tmp_path) == []


def test_writer_option_table_matches_the_writers_signatures():
    """WRITER_OPTIONS (+ the Python-only ones) names exactly each writer's keyword parameters."""
    import inspect
    from rwkvtools.io.gguf_io import write_gguf
    from rwkvtools.io.hf import write_hf
    from rwkvtools.io.pth import write_pth
    from rwkvtools.io.writers import PYTHON_ONLY_OPTIONS, WRITER_OPTIONS
    writers = {"pth": write_pth, "safetensors": write_safetensors, "rwkvcpp": write_rwkvcpp, "hf": write_hf,
               "gguf": write_gguf}
    assert set(writers) == set(WRITER_OPTIONS)
    for fmt, fn in writers.items():
        params = set(inspect.signature(fn).parameters) - {"ckpt", "path", "progress"}
        assert params == set(WRITER_OPTIONS[fmt]) | set(PYTHON_ONLY_OPTIONS.get(fmt, ())), fmt


def test_a_readers_source_format_is_not_written_into_safetensors(tmp_path):
    """What the rwkv.cpp (HF, GGUF) reader records of the file it read went into the manifest of a
    .safetensors written from it: `inspect` of that file said 'stored as rwkvcpp data_type=FP16',
    `convert` of it named rwkv.cpp as its source, and `quantize` of it to an rwkv.cpp .bin stored
    its non-quantized tensors in FP16 although they were fp32."""
    from rwkvtools.io.safetensors_io import read_safetensors
    from rwkvtools.inspect import describe
    st = str(tmp_path / "a.safetensors")
    r = runner.invoke(main, ["convert", fixture_path("tiny-rwkv-7v0-834K-FP16.bin"), st, "--dtype", "fp32",
                             "--no-validate", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["source_format"] == "rwkvcpp"                # the source itself: a .bin
    ck = read_safetensors(st)
    assert "source_format" not in ck.manifest and describe(ck).get("source_format") is None
    assert ck.manifest["history"][-1]["transform"] == "cast"                 # the history is kept
    r = runner.invoke(main, ["convert", st, str(tmp_path / "a.pth"), "--no-validate", "--json"])
    assert json.loads(r.output)["source_format"] == "safetensors"
    q = str(tmp_path / "q.bin")
    r = runner.invoke(main, ["quantize", st, q, "--scheme", "Q5_1", "--no-validate"])
    assert r.exit_code == 0, r.output
    assert read_checkpoint(q).manifest["source_format"]["tensor_types"] == ["FP32", "Q5_1"]   # not FP16
    # a file written with the stale entry (earlier builds) reads without it
    old = str(tmp_path / "old.safetensors")
    stale = Checkpoint(ck.tensors, {**ck.manifest, "source_format": {"format": "rwkvcpp", "data_type": "FP16"}})
    import safetensors.torch
    from safetensors import safe_open
    safetensors.torch.save_file({k: ck.tensors[k].contiguous() for k in ck.tensors}, old,
                                metadata={"rwkvtools": json.dumps(stale.manifest)})
    with safe_open(old, "pt") as f:
        assert "source_format" in json.loads(f.metadata()["rwkvtools"])
    assert "source_format" not in read_safetensors(old).manifest


def test_single_head_v52_to_rwkvcpp_keeps_its_shapes(tmp_path, monkeypatch):
    """v5.2 with one head: squeezing the (1, N) decay and bonus wrote (N, 1), read back as v5.1's
    per-channel decay ('heads 64 x 1', another model: ppl 288.67 -> 287.37) and convert's read-back
    check ended in an internal error (KeyError). The file keeps (H, N, 1) now; and a read-back
    whose shapes differ is a clear error with nothing written."""
    import rwkvtools.io.rwkvcpp as cpp
    ck = random_checkpoint("5.2", n_layer=2, n_embd=64, vocab=256, head_size=64, seed=4)
    assert detect(ck.tensors).n_head == 1
    src, dst = tmp_path / "one.pth", tmp_path / "one.bin"
    write_checkpoint(ck, str(src))
    r = CliRunner().invoke(main, ["convert", str(src), str(dst), "--eval-tokens", "64"])
    assert r.exit_code == 0, r.output
    back = read_checkpoint(str(dst))
    assert detect(back.tensors).version == "5.2" and detect(back.tensors).n_head == 1
    for k in ck.tensors:
        assert tuple(back.tensors[k].shape) == tuple(ck.tensors[k].shape), k
    toks = torch.randint(0, 97, (1, 24), generator=torch.Generator().manual_seed(0))
    assert max_rel(build_model(back)(toks)[0], build_model(ck)(toks)[0]) < 1e-4
    # the old layout, forced: refused with the tensor named, no file
    real = cpp._file_tensor

    def squeezed(x, name, last, v, spec, H):
        out = real(x, name, last, v, spec, H)
        return out.reshape(-1, 1) if last == "time_faaaa" else out
    monkeypatch.setattr(cpp, "_file_tensor", squeezed)
    bad = tmp_path / "bad.bin"
    r = CliRunner().invoke(main, ["convert", str(src), str(bad), "--eval-tokens", "64"])
    assert r.exit_code == 2 and "reads back with" in r.output and "time_faaaa" in r.output, r.output
    assert not bad.exists()


def test_rwkvcpp_output_keeps_an_fp16_model_fp16(tmp_path):
    """Without --dtype/--rwkvcpp-type an FP16 model was widened to FP32 (twice the bytes) while the
    report said 'dtype unchanged'; it stays FP16 now (the FP16 fixture: the same bytes), and the
    report names the type written (FP32 for a dequantized Q5_1 source)."""
    fp16 = fixture_path("tiny-rwkv-5v2-730K-FP16.bin")
    out = tmp_path / "c.bin"
    r = CliRunner().invoke(main, ["convert", str(fp16), str(out), "--no-validate", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["dtype"] == "FP16" and out.read_bytes() == pathlib.Path(fp16).read_bytes()
    st = tmp_path / "h.safetensors"
    write_checkpoint(cast(random_checkpoint("7", n_layer=2, n_embd=32, vocab=64, head_size=16, seed=2), "fp16"), str(st))
    r = CliRunner().invoke(main, ["convert", str(st), str(tmp_path / "h.bin"), "--no-validate", "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["dtype"] == "FP16", r.output
    assert read_checkpoint(str(tmp_path / "h.bin")).manifest["source_format"]["data_type"] == "FP16"
    r = CliRunner().invoke(main, ["convert", str(fixture_path("tiny-rwkv-7v0-834K-Q5_1.bin")), str(tmp_path / "q.bin"),
                                  "--no-validate", "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["dtype"] == "FP32", r.output


@pytest.mark.parametrize("dtype,name", [("bf16", "bfloat16"), ("fp16", "float16"), (None, "float32")])
def test_hf_config_torch_dtype_is_the_matrices_dtype(tmp_path, dtype, name):
    """torch_dtype followed the most common dtype by tensor count, i.e. the fp32 vectors: a bf16
    or fp16 model's config said float32."""
    dst = tmp_path / "hf"
    args = ["convert", str(fixture_path("tiny-rwkv-7v0-834K.pth")), str(dst), "--no-validate"]
    r = CliRunner().invoke(main, args + (["--dtype", dtype] if dtype else []))
    assert r.exit_code == 0, r.output
    assert json.loads((dst / "config.json").read_text())["torch_dtype"] == name


@pytest.mark.parametrize("fmt,args", [("q.gguf", ["--writer-option", "quant=Q8_0", "--quant", "Q4_0"]),
                                      ("q.bin", ["--writer-option", "data_type=FP16", "--rwkvcpp-type", "Q5_1"])])
def test_the_same_setting_given_twice_is_refused(tmp_path, fmt, args):
    """--writer-option quant=Q8_0 with --quant Q4_0 wrote Q4_0 and ignored the other silently."""
    src = tmp_path / "m.safetensors"
    write_checkpoint(random_checkpoint("7", n_layer=1, n_embd=64, vocab=256, head_size=16, seed=1), str(src))
    r = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / fmt), *args, "--no-validate"])
    assert r.exit_code == 2 and "set the same thing; give one" in r.output, r.output
    assert not (tmp_path / fmt).exists()


@pytest.mark.parametrize("version", ["6", "7"])
def test_vectors_stored_in_another_vector_layout_run_and_convert(tmp_path, version):
    """check_layout lets a per-channel vector through as (C, 1) or (1, C): a LayerNorm or group-norm
    weight so stored was an internal error in the model (eval, export) and a refused write ('the
    gguf writer cannot hold this model ... please report it') in every converter."""
    ck = random_checkpoint(version, n_layer=2, n_embd=64, vocab=256, head_size=16, seed=3)
    norm = ("ln0.", "ln1.", "ln2.", "ln_out.")  # LayerNorms (spec detection wants ln_x and decays 1-D)
    odd = {k: (v.reshape(-1, 1).clone() if any(n in k for n in norm) or (v.dim() == 3 and v.shape[:2] == (1, 1))
               else v) for k, v in ck.tensors.items()}
    assert odd["ln_out.weight"].shape == (64, 1)
    src = tmp_path / "odd.safetensors"
    write_safetensors(ck.with_tensors(odd), str(src))
    want = logits(ck)
    assert float((logits(read_checkpoint(str(src))) - want).abs().max()) == 0.0
    for dst in ("o.pth", "o.gguf", "o.bin", "hf"):
        r = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / dst), "--eval-tokens", "64"])
        assert r.exit_code == 0, (dst, r.output)
        back = read_checkpoint(str(tmp_path / dst))
        assert float((logits(back) - want).abs().max()) <= 1e-5, dst
    assert torch.load(str(tmp_path / "o.pth"), weights_only=True)["ln_out.weight"].shape == (64,)


def test_a_conversion_that_makes_the_outputs_nan_is_refused_without_a_gate(tmp_path):
    """A weight beyond fp16's range (70000) became inf with --dtype fp16: the model's perplexity went
    from finite to nan, and convert wrote it with exit 0 (no --max-ppl-increase given)."""
    ck = random_checkpoint("7", n_layer=2, n_embd=64, vocab=256, head_size=16, seed=3)
    t = dict(ck.tensors)
    t["blocks.0.att.key.weight"] = t["blocks.0.att.key.weight"].clone()
    t["blocks.0.att.key.weight"][0, 0] = 70000.0
    src = tmp_path / "big.safetensors"
    write_safetensors(ck.with_tensors(t), str(src))
    dst = tmp_path / "h.safetensors"
    r = CliRunner().invoke(main, ["convert", str(src), str(dst), "--dtype", "fp16", "--eval-tokens", "64",
                                  "--report", str(tmp_path / "r.json")])
    assert r.exit_code == 1 and "ppl_after = nan is not finite" in r.output, r.output
    assert not dst.exists()
    gates = json.loads((tmp_path / "r.json").read_text())["validation"]["gates"]
    assert [g["metric"] for g in gates if not g["passed"]] == ["ppl_after"]
    r = CliRunner().invoke(main, ["convert", str(src), str(dst), "--eval-tokens", "64"])  # fp32: finite, written
    assert r.exit_code == 0 and dst.exists(), r.output


def test_recursive_checkpoint_with_vectors_in_another_layout_converts(tmp_path):
    """The recursive branch of convert wrote the source as stored while the read-back check compared
    against the canonical shapes: 'the pth writer cannot hold this model ... please report it'."""
    from safetensors.torch import load_file, save_file
    rec = tmp_path / "rec.safetensors"
    r = CliRunner().invoke(main, ["recursive", fixture_path("tiny-rwkv-7v0-834K.pth"), str(rec), "--blocks", "4",
                                  "--share", "att", "--lora-rank", "8", "--no-validate"])
    assert r.exit_code == 0, r.output
    t = load_file(str(rec))
    for k in [k for k in t if k.endswith("ln1.weight") or k == "ln_out.weight"]:
        t[k] = t[k].reshape(-1, 1).clone()
    odd = tmp_path / "odd.safetensors"
    save_file(t, str(odd))
    r = CliRunner().invoke(main, ["convert", str(odd), str(tmp_path / "o.pth"), "--eval-tokens", "64"])
    assert r.exit_code == 0, r.output
    assert torch.load(str(tmp_path / "o.pth"), weights_only=True)["ln_out.weight"].shape == (64,)
    assert float((logits(read_checkpoint(str(tmp_path / "o.pth"))) - logits(read_checkpoint(str(rec)))).abs().max()) == 0


def test_validation_holds_one_model_at_a_time_and_scores_an_identical_output_once(tmp_path, monkeypatch):
    """The check built both fp32 models at once (7x the file at 0.4B: a 14B model could not be
    converted with the default check); the first model is gone before the second is built. A
    convert whose output reads back with every tensor, dtype and value equal is one model: scored
    once (half the time); one that changes the dtype is scored twice."""
    import gc
    import rwkvtools.model as M
    built, alive_at_build = [], []
    real = M.build_model

    def tracking(ckpt, *a, **k):
        gc.collect()
        alive_at_build.append(sum(r() is not None for r in built))
        m = real(ckpt, *a, **k)
        built.append(weakref.ref(m))
        return m
    monkeypatch.setattr(M, "build_model", tracking)
    src = tmp_path / "m.safetensors"
    write_safetensors(random_checkpoint("7", n_layer=2, n_embd=32, head_size=16, vocab=256, seed=2), str(src))
    r = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "o.pth"), "--eval-tokens", "64", "--json"])
    assert r.exit_code == 0, r.output
    v = json.loads(r.output)["validation"]
    assert len(built) == 1 and "scored_once" in v and v["ppl_after"] == v["ppl_before"]
    assert v["logits_drift"]["max_abs"] == 0
    built.clear(), alive_at_build.clear()
    r = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "h.pth"), "--dtype", "fp16", "--eval-tokens", "64",
                                  "--json"])
    assert r.exit_code == 0, r.output
    v = json.loads(r.output)["validation"]
    assert len(built) == 2 and alive_at_build == [0, 0], alive_at_build
    assert "scored_once" not in v and v["ppl_after"] != v["ppl_before"] and v["logits_drift"]["max_abs"] > 0

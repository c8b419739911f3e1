"""quantize --tune-steps: end-to-end scale tuning (rwkvtools.tune). Levels stay, scales move, the
held-out KL to the source model decides, and the files keep their formats."""
import json

import numpy as np
import pytest
import torch

from conftest import DATA, VERSIONS, fixture_path
from rwkvtools.errors import RwkvToolsError
from rwkvtools.gptq import make_grid, rtn
from rwkvtools.io import ggml_quants
from rwkvtools.model import build_model
from rwkvtools.transforms.quantize import QuantizeConfig, QuantizeError, quantize, write_quantized
from rwkvtools.tune import TensorScales, ggml_scales, int_scales

pytestmark = pytest.mark.usefixtures("one_thread")


def _kl(a, b, toks) -> float:
    """Mean KL(a || b) of the next-token distributions over ``toks`` (1, T)."""
    with torch.no_grad():
        la = torch.log_softmax(a(toks)[0], -1)
        lb = torch.log_softmax(b(toks)[0], -1)
    return float((la.exp() * (la - lb)).sum(-1).mean())


@pytest.mark.parametrize("qtype", list(ggml_quants.BLOCK_TYPES))
def test_ggml_scales_rebuild_the_dequantized_matrix(qtype):
    w = torch.randn(6, 96, generator=torch.Generator().manual_seed(3)) * 0.1
    w[1, :32] = 0.0                      # an all-zero block: d = 0
    blocks = ggml_quants.quantize(qtype, w.numpy())
    dq = torch.from_numpy(ggml_quants.dequantize(qtype, blocks, w.numel())).reshape(w.shape)
    ts = ggml_scales(qtype, blocks, dq)
    assert torch.equal(ts.weight(ts.scale, ts.offset), dq)
    assert (ts.offset is not None) == (qtype in ("Q4_1", "Q5_1"))
    assert torch.equal(ts.levels, ts.levels.round())
    assert ts.levels.abs().max() <= {"Q4_0": 8, "Q4_1": 15, "Q5_0": 16, "Q5_1": 31, "Q8_0": 127}[qtype]


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_int_scales_rebuild_the_dequantized_matrix(scheme):
    w = torch.randn(5, 128, generator=torch.Generator().manual_seed(4)) * 0.1
    q, ps, dq = rtn(w, make_grid(scheme, 32))
    ts = int_scales(scheme, q, ps)
    assert torch.allclose(ts.weight(ts.scale, None), dq, rtol=0, atol=1e-7)
    assert ts.storage == (torch.float32 if scheme == "int8" else torch.float16)


def test_transposed_scales_give_the_model_layout():
    lev = torch.arange(12.0).reshape(2, 6)
    ts = TensorScales(lev, torch.tensor([[1.0, 2.0], [3.0, 4.0]]), None, 3, True)
    w = ts.weight(ts.scale, None)
    assert w.shape == (6, 2)
    assert torch.equal(w.t()[1, 3:], lev[1, 3:] * 4.0)


def _ggml_fields(path, qtype):
    """{tensor: (scale bytes, level bytes)} of the quantized tensors of an rwkv.cpp file."""
    from rwkvtools.io.rwkvcpp import scan
    _, recs = scan(str(path))
    data = path.read_bytes()
    nb = ggml_quants.block_bytes(qtype)
    head = 4 if qtype in ("Q4_1", "Q5_1") else 2
    code = ggml_quants.BLOCK_TYPES[qtype][0]
    out = {}
    for r in recs:
        if r.dtype == code:
            b = np.frombuffer(data[r.offset:r.offset + r.nbytes], dtype=np.uint8).reshape(-1, nb)
            out[r.name] = (b[:, :head].tobytes(), b[:, head:].tobytes())
    assert out
    return out


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
def test_tuning_moves_only_the_scales_and_lowers_heldout_kl(tiny_models, tmp_path, qtype):
    ck = tiny_models["5.2"]
    calib = torch.randint(0, 97, (4096,), generator=torch.Generator().manual_seed(5)).tolist()
    plain = quantize(ck, QuantizeConfig(qtype))
    tuned = quantize(ck, QuantizeConfig(qtype, tune_steps=25, tune_lr=3e-3, tune_seq=128, tune_batch=8), calib)
    t = tuned.manifest["quantized"]["tuning"]
    assert t["kept"] and t["heldout_kl_after"] < t["heldout_kl_before"], t
    assert t["heldout_sequences"] == 4 and t["train_sequences"] == 28 and t["tensors"] == 3 * 8
    assert all(v.get("tuned") for v in tuned.manifest["quantized"]["tensors"].values())
    write_quantized(plain, tmp_path / "plain.bin")
    write_quantized(tuned, tmp_path / "tuned.bin")
    a, b = _ggml_fields(tmp_path / "plain.bin", qtype), _ggml_fields(tmp_path / "tuned.bin", qtype)
    assert a.keys() == b.keys()
    assert all(a[k][1] == b[k][1] for k in a)          # levels: the same bytes
    assert sum(a[k][0] != b[k][0] for k in a) == len(a)  # every tensor's scales moved
    # the file holds what the in-memory model ran, and it is closer to the source on new text
    from rwkvtools.io import read_checkpoint
    back = read_checkpoint(str(tmp_path / "tuned.bin"))
    for k in a:
        assert torch.equal(back.tensors[k].float(), tuned.tensors[k].float()), k
    m_file = build_model(back)
    x = torch.randint(0, 97, (1, 300), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():   # other tensors go through rwkv.cpp's stored transforms (e.g. decays): close
        torch.testing.assert_close(m_file(x)[0], build_model(tuned)(x)[0], rtol=0, atol=1e-4)
    src = build_model(ck)
    assert _kl(src, m_file, x) < _kl(src, build_model(plain), x)


def test_tuning_that_does_not_help_keeps_the_rounded_scales(tiny_models, tmp_path):
    ck = tiny_models["7"]
    calib = torch.randint(0, 97, (2048,), generator=torch.Generator().manual_seed(8)).tolist()
    plain = quantize(ck, QuantizeConfig("Q5_0"))
    same = quantize(ck, QuantizeConfig("Q5_0", tune_steps=2, tune_lr=1e-12, tune_seq=128, tune_batch=4), calib)
    t = same.manifest["quantized"]["tuning"]
    assert not t["kept"] and t["heldout_kl_after"] == t["heldout_kl_before"]
    assert "rounded scales kept" in same.manifest["quantized"]["summary"]
    write_quantized(plain, tmp_path / "a.bin")
    write_quantized(same, tmp_path / "b.bin")
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_every_version_tunes_packed_formats(tiny_models, version, scheme, tmp_path):
    ck = tiny_models[version]
    calib = torch.randint(0, 97, (2048,), generator=torch.Generator().manual_seed(9)).tolist()
    plain = quantize(ck, QuantizeConfig(scheme, group_size=32))
    tuned = quantize(ck, QuantizeConfig(scheme, group_size=32, tune_steps=15, tune_lr=3e-3, tune_seq=64,
                                        tune_batch=8), calib)
    t = tuned.manifest["quantized"]["tuning"]
    if scheme == "int4":
        assert t["kept"] and t["heldout_kl_after"] < t["heldout_kl_before"], t
    elif not t["kept"]:   # int8 of a random model: KL ~1e-8, at rounding noise; the guard keeps the rounded scales
        assert t["heldout_kl_after"] >= t["heldout_kl_before"]
        assert torch.equal(tuned.tensors["blocks.0.ffn.key.weight_scale"], plain.tensors["blocks.0.ffn.key.weight_scale"])
        return
    p = tmp_path / "t.safetensors"
    write_quantized(tuned, p)
    from rwkvtools import load
    m = load(str(p))
    x = torch.randint(0, 97, (1, 64), generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        torch.testing.assert_close(m(x)[0], build_model(tuned)(x)[0], rtol=0, atol=1e-4)
    # the integer levels (and int4's zero points) are the untuned ones
    pk = "blocks.0.ffn.key.weight_" + scheme
    assert torch.equal(tuned.tensors[pk], plain.tensors[pk])
    if scheme == "int4":
        assert torch.equal(tuned.tensors["blocks.0.ffn.key.weight_zero"], plain.tensors["blocks.0.ffn.key.weight_zero"])
    assert not torch.equal(tuned.tensors["blocks.0.ffn.key.weight_scale"], plain.tensors["blocks.0.ffn.key.weight_scale"])


def test_tuning_options_are_checked():
    with pytest.raises(QuantizeError, match="K-quants"):
        QuantizeConfig("Q4_K", target="gguf", tune_steps=5)
    for bad in ({"tune_steps": -1}, {"tune_lr": 0.0}, {"tune_lr": float("nan")}, {"tune_seq": 1},
                {"tune_batch": 0}, {"tune_steps": 2.5}):
        with pytest.raises(QuantizeError):
            QuantizeConfig("int8", **bad)
    assert "tune_steps" not in QuantizeConfig("int8").to_dict()      # off: manifests as before
    assert QuantizeConfig("int8", tune_steps=3).to_dict()["tune_steps"] == 3


def test_tuning_needs_calibration_tokens(tiny_models):
    with pytest.raises(QuantizeError, match="calibration tokens"):
        quantize(tiny_models["7"], QuantizeConfig("int8", tune_steps=3))
    with pytest.raises(RwkvToolsError, match="at least 4 calibration tokens"):
        quantize(tiny_models["7"], QuantizeConfig("int8", tune_steps=3), [1, 2, 3])


def test_cli_tune_report_and_errors(tmp_path):
    from click.testing import CliRunner
    from rwkvtools.cli import main
    src = fixture_path("tiny-rwkv-7v0-834K-FP32.bin")
    out = tmp_path / "q.bin"
    r = CliRunner().invoke(main, ["quantize", str(src), str(out), "--scheme", "Q5_0", "--method", "rtn",
                                  "--calib", str(DATA / "wikitext-2-valid.txt"), "--tune-steps", "4",
                                  "--tune-tokens", "2048", "--tune-seq", "256", "--tune-batch", "4",
                                  "--no-validate", "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["tuning"]["steps"] == 4 and rep["calibration"]["tokens"] == 2048
    assert rep["config"]["tune_steps"] == 4 and out.exists()
    r = CliRunner().invoke(main, ["quantize", str(src), str(tmp_path / "k.gguf"), "--scheme", "Q4_K",
                                  "--tune-steps", "4", "--no-validate"])
    assert r.exit_code != 0 and "K-quants" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "k.gguf").exists()
    r = CliRunner().invoke(main, ["quantize", str(src), str(tmp_path / "n.bin"), "--scheme", "Q5_0",
                                  "--tune-steps", "-2", "--no-validate"])
    assert r.exit_code != 0 and "--tune-steps" in r.output


def test_tuning_lowers_kl_of_gptq_q4_0_on_trained_fixture():
    """The trained v5.2 fixture, GPTQ Q4_0, a short tuning run: KL to the source model on
    wikitext-2-test (never seen by calibration or tuning) goes down."""
    from rwkvtools.io import read_checkpoint
    src = read_checkpoint(fixture_path("tiny-rwkv-5v2-730K-FP32.bin")).materialize()
    calib = list((DATA / "wikitext-2-valid.txt").read_bytes()[:32768])
    cfg = dict(method="gptq", calib_tokens=4096)
    g = quantize(src, QuantizeConfig("Q4_0", **cfg), calib)
    t = quantize(src, QuantizeConfig("Q4_0", tune_steps=30, tune_lr=3e-3, tune_seq=256, tune_batch=8, **cfg), calib)
    assert t.manifest["quantized"]["tuning"]["kept"]
    x = torch.tensor([list((DATA / "wikitext-2-test.txt").read_bytes()[:2048])])
    m0 = build_model(src)
    assert _kl(m0, build_model(t), x) < 0.8 * _kl(m0, build_model(g), x)

"""export-onnx: every version and both graph kinds against the torch reference in onnxruntime
(logits and states), sequence prefill + step stepping == stepping all the way, fp16, low-rank
linears, external data, the linear-kind registry, eval on .onnx files, and bad input."""
import json
import os

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from rwkvtools.cli import main
from rwkvtools.errors import RwkvToolsError
from rwkvtools.export.onnx import ExportError, build_onnx_model, export_onnx, register_onnx_linear
from rwkvtools.export.onnx_eval import OnnxModel
from rwkvtools.io import read_checkpoint
from rwkvtools.io.pth import write_pth
from rwkvtools.model import build_model
from conftest import DATA, VERSIONS, fixture_path, max_rel

import onnxruntime as ort  # noqa: E402  (a runtime dependency)
runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_thread")


def run(*args):
    return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)


def state_view(major, st):
    """v4's (aa, bb, pp) is defined up to a common scale: compare a/b and log b."""
    st = {k: v.float() for k, v in st.items()}
    if major == 4:
        return {"att_x": st["att_x"], "ffn_x": st["ffn_x"], "ab": st["aa"] / st["bb"],
                "logb": torch.log(st["bb"]) + st["pp"]}
    return st


def ort_run(sess, tokens: np.ndarray, state: dict) -> tuple[np.ndarray, dict]:
    """Raw onnxruntime call by the documented interface names (independent of OnnxModel): the
    model's stacked state {name: [L, batch, ...]} goes in as state_in_<name>.<layer>, and the
    state_out_<name>.<layer> come back stacked."""
    feeds = {"tokens": tokens.astype(np.int64)}
    feeds.update({f"state_in_{k}.{i}": part for k, v in state.items() for i, part in enumerate(v)})
    names = [o.name for o in sess.get_outputs()]
    out = dict(zip(names, sess.run(None, feeds)))
    return out["logits"], {k: np.stack([out[f"state_out_{k}.{i}"] for i in range(len(v))]) for k, v in state.items()}


def zero_state(model, B):
    return {k: np.zeros(v.shape, np.float32) for k, v in model.init_state(B).items()}


def reference(model, pieces):
    """Torch reference: the pieces in order, state carried; logits concatenated."""
    st, outs = None, []
    with torch.no_grad():
        for p in pieces:
            lo, st = model(torch.as_tensor(p), st)
            outs.append(lo)
    return torch.cat(outs, 1), st


def export(ck, path, **kw):
    kw.setdefault("progress", False)
    return export_onnx(ck, str(path), **kw)


# ------------------------------------------------------------------- every version, both modes
@pytest.mark.parametrize("mode", ["step", "sequence"])
@pytest.mark.parametrize("version", VERSIONS)
def test_export_matches_reference(tmp_path, tiny_models, version, mode):
    ck = tiny_models[version]
    out = tmp_path / "m.onnx"
    rep = export(ck, out, mode=mode, validate=False)
    assert rep["published"] and out.exists()
    model = build_model(ck)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    B = 3
    toks = torch.randint(0, 97, (B, 41), generator=torch.Generator().manual_seed(5)).numpy()
    # sequence: two prompt calls crossing chunk boundaries (16) with a short tail, then single steps
    pieces = [toks[:, :19], toks[:, 19:35]] + [toks[:, t:t + 1] for t in range(35, 41)]
    if mode == "step":
        pieces = [toks[:, t:t + 1] for t in range(41)]
    st = zero_state(model, B)
    outs = []
    for p in pieces:
        lo, st = ort_run(sess, p, st)
        outs.append(lo)
    got = torch.from_numpy(np.concatenate(outs, 1))
    ref, ref_st = reference(model, pieces)
    assert got.shape == ref.shape == (B, 41, 97)
    assert float((got - ref).abs().max()) <= 1e-4
    a = state_view(model.spec.major, {k: torch.from_numpy(v) for k, v in st.items()})
    b = state_view(model.spec.major, ref_st)
    for k in b:
        assert max_rel(a[k], b[k]) <= 1e-5, k


@pytest.mark.parametrize("version", VERSIONS)
def test_step_graph_with_conv_linears_matches_reference(tmp_path, tiny_models, version, monkeypatch):
    """--linear-op conv: the dense products of the step graph as 1x1 Conv (the size threshold
    lowered so the tiny models' matrices qualify; LoRA-sized ones stay MatMul at the real one)."""
    import rwkvtools.export.onnx as ox
    monkeypatch.setattr(ox, "CONV_GEMV_MIN", 0)
    ck = tiny_models[version]
    out = tmp_path / "c.onnx"
    rep = export(ck, out, mode="step", linear_op="conv", validate=True)
    assert rep["published"] and rep["linear_op"] == "conv"
    assert rep["validation"]["providers"]["CPUExecutionProvider"]["max_abs_logit_diff"] <= 1e-4
    m = onnx.load(str(out))
    model = build_model(ck)
    n_dense = sum(1 for mod in model.modules() if type(mod).__name__ == "DenseLinear")
    convs = [n for n in m.graph.node if n.op_type == "Conv"]
    assert len(convs) == n_dense                          # every dense linear (head included)
    assert json.loads({p.key: p.value for p in m.metadata_props}["rwkvtools"])["linear_op"] == "conv"
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    toks = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(6)).numpy()
    st, outs = zero_state(model, 2), []
    for t in range(12):
        lo, st = ort_run(sess, toks[:, t:t + 1], st)
        outs.append(lo)
    ref, _ = reference(model, [toks[:, t:t + 1] for t in range(12)])
    assert float((torch.from_numpy(np.concatenate(outs, 1)) - ref).abs().max()) <= 1e-4


def test_conv_linears_only_for_large_fp32_step_products(tmp_path, tiny_models):
    from rwkvtools.random_init import random_checkpoint
    ck = random_checkpoint("7", n_layer=1, n_embd=512, vocab=64, head_size=64, seed=2)
    out = tmp_path / "c.onnx"
    export(ck, out, mode="step", linear_op="conv", validate=False)
    nodes = onnx.load(str(out)).graph.node
    # 512 x 512 r/k/v/o/ffn matrices (>= 256K weights) become Conv; the LoRAs and the 64-row head stay MatMul
    conv_w = sorted(n.input[1] for n in nodes if n.op_type == "Conv")
    assert conv_w == sorted(f"blocks.0.{m}.weight.conv" for m in
                            ("att.receptance", "att.key", "att.value", "att.output", "ffn.key", "ffn.value"))
    mm_w = {i for n in nodes if n.op_type == "MatMul" for i in n.input}
    assert {"blocks.0.att.lora1", "blocks.0.att.lora2", "head.weight.T"} <= mm_w
    for kw in ({"mode": "sequence"}, {"mode": "step", "dtype": "fp16"}):
        with pytest.raises(ExportError, match="fp32 step graphs"):
            export(tiny_models["7"], tmp_path / "x.onnx", linear_op="conv", **kw)
    with pytest.raises(ExportError, match="linear_op"):
        export(tiny_models["7"], tmp_path / "x.onnx", linear_op="gemm")
    assert not (tmp_path / "x.onnx").exists()
    r = runner.invoke(main, ["export-onnx", str(fixture_path("tiny-rwkv-7v0-834K.pth")), str(tmp_path / "y.onnx"),
                             "--mode", "sequence", "--linear-op", "conv"])
    assert r.exit_code != 0 and "fp32 step graphs" in r.output and not (tmp_path / "y.onnx").exists()


@pytest.mark.parametrize("version", VERSIONS)
def test_sequence_prefill_then_steps_equals_stepping(tmp_path, tiny_models, version):
    ck = tiny_models[version]
    export(ck, tmp_path / "seq.onnx", mode="sequence", validate=False)
    export(ck, tmp_path / "step.onnx", mode="step", validate=False)
    seq = OnnxModel(str(tmp_path / "seq.onnx"))
    step = OnnxModel(str(tmp_path / "step.onnx"))
    toks = torch.randint(0, 97, (2, 45), generator=torch.Generator().manual_seed(9))
    lp, st = seq(toks[:, :37])                    # prefill: 3 chunks, the last one short
    outs = [lp]
    for t in range(37, 45):
        lo, st = step(toks[:, t:t + 1], st)
        outs.append(lo)
    mixed = torch.cat(outs, 1)
    stepped, st_all = step(toks)                  # OnnxModel steps one token per call
    assert stepped.shape == mixed.shape == (2, 45, 97)
    assert max_rel(mixed, stepped) <= 1e-5
    a, b = state_view(int(version[0]), st), state_view(int(version[0]), st_all)
    for k in b:
        assert max_rel(a[k], b[k]) <= 1e-5, k


def test_interface_names_shapes_and_metadata(tmp_path, tiny_models):
    for version, names in (("4", ["att_x", "ffn_x", "aa", "bb", "pp"]), ("7", ["att_x", "ffn_x", "wkv"])):
        out = tmp_path / f"m{version}.onnx"
        export(tiny_models[version], out, mode="sequence", validate=False)
        m = onnx.load(str(out))
        ins = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in m.graph.input}
        outs = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in m.graph.output}
        assert ins["tokens"] == ["batch", "seq"]
        assert m.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT64
        assert outs["logits"] == ["batch", "seq", 97]
        per_layer = [f"{n}.{i}" for n in names for i in range(3)]          # one tensor per layer
        assert sorted(k[len("state_in_"):] for k in ins if k.startswith("state_in_")) == sorted(per_layer)
        assert sorted(k[len("state_out_"):] for k in outs if k.startswith("state_out_")) == sorted(per_layer)
        for n in per_layer:
            assert ins[f"state_in_{n}"] == outs[f"state_out_{n}"]
            assert ins[f"state_in_{n}"][0] == "batch"
        assert ins["state_in_att_x.2"] == ["batch", 64]
        if version == "7":
            assert ins["state_in_wkv.1"] == ["batch", 4, 16, 16]
        meta = json.loads({p.key: p.value for p in m.metadata_props}["rwkvtools"])
        assert meta["rwkv_version"] == version and meta["mode"] == "sequence" and meta["vocab"] == 97
        assert meta["interface_version"] == 2 and meta["empty_state"] == "zeros"
        assert [s["name"] for s in meta["states"]] == per_layer
        assert [(s["group"], s["layer"]) for s in meta["states"]] == [(n, i) for n in names for i in range(3)]


# -------------------------------------------------------------------------------- fixtures
FIXTURES = ["tiny-rwkv-4v0-660K-FP32.bin", "tiny-rwkv-5v1-730K-FP32.bin", "tiny-rwkv-5v2-730K-FP32.bin",
            "tiny-rwkv-6v0-3m-Q5_1.bin", "tiny-rwkv-7v0-834K.pth"]


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_export_cli_validates(tmp_path, name):
    src = fixture_path(name)
    mode = "sequence" if name.startswith(("tiny-rwkv-5v2", "tiny-rwkv-7v0")) else "step"
    out = tmp_path / "f.onnx"
    res = run("export-onnx", src, out, "--mode", mode, "--json")
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output)
    cpu = rep["validation"]["providers"]["CPUExecutionProvider"]
    assert rep["validation"]["passed"] and cpu["max_abs_logit_diff"] <= 1e-4
    # and independently of the built-in check: bytes of wikitext, state carried in two calls
    toks = torch.tensor([list(open(DATA / "wikitext-2-test.txt", "rb").read(120))])
    model = build_model(read_checkpoint(src))
    ref, _ = reference(model, [toks[:, :70], toks[:, 70:]])
    om = OnnxModel(str(out))
    l1, st = om(toks[:, :70])
    l2, _ = om(toks[:, 70:], st)
    assert float((torch.cat([l1, l2], 1) - ref).abs().max()) <= 1e-4


def test_eval_accepts_onnx(tmp_path):
    from rwkvtools.random_init import random_checkpoint
    ck = random_checkpoint("5.2", n_layer=2, n_embd=32, vocab=256, head_size=8, seed=3)
    pth = tmp_path / "m.pth"
    write_pth(ck, str(pth))
    txt = tmp_path / "t.txt"
    txt.write_text("The quick brown fox jumps over the lazy dog. " * 12)
    ref = json.loads(run("eval", pth, "--text", txt, "--json", "--tokenizer", "bytes").output)
    for mode in ("step", "sequence"):
        out = tmp_path / f"{mode}.onnx"
        assert run("export-onnx", pth, out, "--mode", mode, "--no-validate").exit_code == 0
        res = run("eval", out, "--text", txt, "--json", "--tokenizer", "bytes", "--chunk-len", 100)
        assert res.exit_code == 0, res.output
        got = json.loads(res.output)
        assert got["backend"] == "onnxruntime-cpu" and got["tokens"] == ref["tokens"]
        assert abs(got["ppl"] / ref["ppl"] - 1) <= 1e-5
        assert (got["device"], got["dtype"]) == ("cpu", "float32")  # what ran, not what was asked
    # the file's dtype is fixed at export: another --dtype is refused, the matching one reported
    res = run("eval", tmp_path / "step.onnx", "--text", txt, "--tokenizer", "bytes", "--dtype", "fp16")
    assert res.exit_code == 2 and "exported in (fp32)" in res.output, res.output
    assert run("export-onnx", pth, tmp_path / "h.onnx", "--dtype", "fp16", "--no-validate").exit_code == 0
    got = json.loads(run("eval", tmp_path / "h.onnx", "--text", txt, "--json", "--tokenizer", "bytes").output)
    assert got["dtype"] == "float16" and abs(got["ppl"] / ref["ppl"] - 1) <= 2e-2


# ------------------------------------------------------------------------------------- fp16
@pytest.mark.parametrize("version,mode", [("5.2", "step"), ("6", "sequence"), ("7", "sequence")])
def test_fp16_keeps_decays_and_state_fp32(tmp_path, tiny_models, version, mode):
    ck = tiny_models[version]
    out = tmp_path / "h.onnx"
    rep = export(ck, out, mode=mode, dtype="fp16")
    v = rep["validation"]["providers"]["CPUExecutionProvider"]
    assert rep["validation"]["passed"] and v["max_abs_logit_diff"] <= 5e-2 * max(1.0, v["max_abs_logit"])
    m = onnx.load(str(out))
    inits = {t.name: t.data_type for t in m.graph.initializer}
    F16, F32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    assert inits["blocks.0.att.key.weight.T"] == F16 and inits["head.weight.T"] == F16
    decay = {"5.2": "blocks.1.att.log_decay", "6": "blocks.1.att.time_decay", "7": "blocks.1.att.w0"}[version]
    assert inits[decay] == F32 and inits["blocks.1.att.ln_x_w"] == F32
    for io in list(m.graph.input)[1:] + list(m.graph.output):
        assert io.type.tensor_type.elem_type == F32, io.name
    # against the fp32 export: the fp16 graph stays close and finite over a longer run
    export(ck, tmp_path / "f.onnx", mode=mode, validate=False)
    toks = torch.randint(0, 97, (2, 64), generator=torch.Generator().manual_seed(3))
    a, _ = OnnxModel(str(out))(toks)
    b, _ = OnnxModel(str(tmp_path / "f.onnx"))(toks)
    assert torch.isfinite(a).all() and float((a - b).abs().max()) <= 5e-2 * max(1.0, float(b.abs().max()))


def test_fp16_fixture_v4_rescaled(tmp_path):
    res = run("export-onnx", fixture_path("tiny-rwkv-4v0-660K.pth"), tmp_path / "h.onnx", "--dtype", "fp16", "--json")
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output)
    assert rep["validation"]["passed"] and rep["dtype"] == "fp16"


# -------------------------------------------------------------------------- low-rank linears
def _lowrank(ck, rank: int):
    """Replace every time-mix/channel-mix linear with U (out, r) V (r, in) from a truncated SVD."""
    t = dict(ck.tensors)
    for k in list(t):
        if k.endswith(".weight") and (".att." in k or ".ffn." in k) and t[k].dim() == 2 and "ln_x" not in k:
            U, S, Vh = torch.linalg.svd(t[k], full_matrices=False)
            r = min(rank, S.numel())
            t[k[:-len(".weight")] + ".weight_u"] = (U[:, :r] * S[:r]).contiguous()
            t[k[:-len(".weight")] + ".weight_v"] = Vh[:r].contiguous()
            del t[k]
    return ck.with_tensors(t, entry={"transform": "lowrank-test", "options": {"rank": rank}})


@pytest.mark.parametrize("version,mode", [("5.2", "sequence"), ("7", "step")])
def test_lowrank_checkpoint_exports_as_two_matmuls(tmp_path, tiny_models, version, mode):
    ck = _lowrank(tiny_models[version], 8)
    model = build_model(ck)
    assert type(model.blocks[0].att.key).__name__ == "LowRankLinear"
    out = tmp_path / "lr.onnx"
    rep = export(ck, out, mode=mode)
    assert rep["validation"]["passed"] and "LowRankLinear" in rep["linear_kinds"]
    m = onnx.load(str(out))
    inits = {t.name: tuple(t.dims) for t in m.graph.initializer}
    assert inits["blocks.0.att.key.weight_v.T"] == (64, 8) and inits["blocks.0.att.key.weight_u.T"] == (8, 64)
    assert "blocks.0.att.key.weight.T" not in inits
    toks = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(2))
    got, _ = OnnxModel(str(out))(toks)
    ref, _ = reference(model, [toks])
    dense, _ = reference(build_model(tiny_models[version]), [toks])
    assert float((got - ref).abs().max()) <= 1e-4
    assert float((got - dense).abs().max()) > 1e-3   # it is the rank-8 model, not the original


# ---------------------------------------------------------------------- linear-kind registry
class _Int8Linear(torch.nn.Module):
    """A made-up quantized kind: int8 weights with one scale per output row."""

    def __init__(self, w, prefix):
        super().__init__()
        scale = w.abs().amax(1) / 127
        self.qweight = torch.nn.Parameter(torch.round(w / scale[:, None]).to(torch.int8), requires_grad=False)
        self.scale = torch.nn.Parameter(scale, requires_grad=False)
        self.prefix = prefix

    def forward(self, x):
        return torch.nn.functional.linear(x, self.qweight.float() * self.scale[:, None])


def test_linear_registry_and_unknown_kind(tiny_models):
    model = build_model(tiny_models["7"])
    lin = model.blocks[1].ffn.key
    model.blocks[1].ffn.key = _Int8Linear(lin.weight.data, lin.prefix)
    with pytest.raises(ExportError, match="_Int8Linear.*DenseLinear"):
        build_onnx_model(model, "step")

    def emit(em, mod, x):   # the packed int8 weight goes into the file; DequantizeLinear + MatMul
        g = em.g
        q = g.tensor(mod.qweight.t().contiguous().numpy(), name=mod.prefix + ".qweight.T")       # (in, out) int8
        w = g.op("DequantizeLinear", q, g.tensor(mod.scale.numpy(), name=mod.prefix + ".scale"), axis=1)
        return g.op("MatMul", x, w)
    register_onnx_linear(_Int8Linear, emit)
    mp = build_onnx_model(model, "step")
    inits = {t.name: t.data_type for t in mp.graph.initializer}
    assert inits["blocks.1.ffn.key.qweight.T"] == onnx.TensorProto.INT8
    # onnxruntime fuses DequantizeLinear + MatMul into MatMulNBits, whose default accuracy level
    # quantizes the activations to int8 (about 5e-4 here); level 1 computes in fp32
    so = ort.SessionOptions()
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    sess = ort.InferenceSession(mp.SerializeToString(), so, providers=["CPUExecutionProvider"])
    toks = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(4)).numpy()
    st = zero_state(model, 2)
    outs = []
    for t in range(5):
        lo, st = ort_run(sess, toks[:, t:t + 1], st)
        outs.append(lo)
    ref, _ = reference(model, [toks])
    assert float((torch.from_numpy(np.concatenate(outs, 1)) - ref).abs().max()) <= 1e-4


# --------------------------------------------------------------------------- external data
def test_external_data_with_lowered_threshold(tmp_path, tiny_models):
    out = tmp_path / "ext.onnx"
    res = run("export-onnx", "--json", "--external-data-threshold", 1000, "--mode", "sequence",
              _pth(tmp_path, tiny_models["6"]), out)
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output)
    data = tmp_path / "ext.onnx.data"
    assert rep["external_data"] and rep["data_file"] == "ext.onnx.data" and data.exists()
    assert os.path.getsize(out) < 200_000 < os.path.getsize(data)
    m = onnx.load(str(out), load_external_data=False)
    ext = [t for t in m.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert ext and all({e.key: e.value for e in t.external_data}["location"] == "ext.onnx.data" for t in ext)
    assert rep["validation"]["passed"]
    assert sorted(os.listdir(tmp_path)) == ["ext.onnx", "ext.onnx.data", "m.pth"]
    # inspect reads the exported file's interface from the file itself, external data counted
    info = json.loads(run("inspect", out, "--json").output)
    assert info["kind"] == "onnx" and info["rwkv_version"] == "6" and info["mode"] == "sequence"
    from rwkvtools.spec import detect
    spec = detect(tiny_models["6"].tensors)
    assert (info["n_layer"], info["n_embd"], info["vocab"]) == (spec.n_layer, spec.n_embd, spec.vocab)
    assert info["bytes"] == os.path.getsize(out) and info["external_data_bytes"] == os.path.getsize(data)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i["name"] for i in info["inputs"]] == [i.name for i in sess.get_inputs()]
    assert [o["name"] for o in info["outputs"]] == [o.name for o in sess.get_outputs()]
    text = run("inspect", out).output
    assert "RWKV v6; sequence mode, fp32" in text and "external data" in text and "state_in_<name>.<layer>" in text


def _pth(tmp_path, ck):
    p = tmp_path / "m.pth"
    write_pth(ck, str(p))
    return p


# ------------------------------------------------------------------------------ other options
def test_other_opsets_chunk_lens_and_logits_last(tmp_path, tiny_models):
    # Reduce* axes are an attribute before opset 18 and an input from 18 on
    for version, opset, chunk in (("4", 17, 32), ("7", 18, 8), ("6", 21, 64)):
        ck = tiny_models[version]
        rep = export(ck, tmp_path / f"o{version}.onnx", mode="sequence", opset=opset, chunk_len=chunk)
        assert rep["validation"]["passed"] and rep["opset"] == opset
        assert onnx.load(str(tmp_path / f"o{version}.onnx")).opset_import[0].version == opset
    export(tiny_models["7"], tmp_path / "last.onnx", mode="sequence", logits="last", validate=False)
    toks = torch.randint(0, 97, (2, 30), generator=torch.Generator().manual_seed(6))
    last, st = OnnxModel(str(tmp_path / "last.onnx"))(toks)
    ref, ref_st = reference(build_model(tiny_models["7"]), [toks])
    assert last.shape == (2, 1, 97) and float((last[:, 0] - ref[:, -1]).abs().max()) <= 1e-4
    assert max_rel(st["wkv"], ref_st["wkv"]) <= 1e-5


# -------------------------------------------------------------------------------- bad input
def test_bad_input_clear_errors_no_partial_output(tmp_path, tiny_models):
    pth = _pth(tmp_path, tiny_models["5.0"])
    before = set(os.listdir(tmp_path))
    cases = [
        (["export-onnx", tmp_path / "missing.pth", tmp_path / "o.onnx"], "no such file"),
        (["export-onnx", pth, tmp_path / "o.bin"], "must end in .onnx"),
        (["export-onnx", pth, tmp_path / "o.onnx", "--opset", 12], "opset 12 is not supported"),
        (["export-onnx", pth, tmp_path / "o.onnx", "--opset", 99], "opset 99 is not supported"),
        (["export-onnx", pth, tmp_path / "o.onnx", "--external-data-threshold", -5], "must not be negative"),
        (["export-onnx", pth, tmp_path / "o.onnx", "--tol", -1], "tol must be a positive finite number"),
        (["export-onnx", pth, tmp_path / "o.onnx", "--tol", 0], "tol must be a positive finite number"),
        (["export-onnx", pth, tmp_path / "o.onnx", "--tol", "nan"], "must be a finite number"),
        (["export-onnx", pth, tmp_path / "o.onnx", "--chunk-len", 32], "--chunk-len applies to --mode sequence"),
        (["export-onnx", pth, tmp_path / "o.onnx", "--logits", "last"], "--logits applies to --mode sequence"),
    ]
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x80\x04garbage that is not a pickle of tensors")
    cases.append((["export-onnx", junk, tmp_path / "o.onnx"], "error:"))
    onnx_in = tmp_path / "in.onnx"
    onnx_in.write_bytes(b"\x08\x07not really")
    cases.append((["export-onnx", onnx_in, tmp_path / "o.onnx"], "not a checkpoint"))
    for args, msg in cases:
        res = run(*args)
        assert res.exit_code == 2, (args, res.output)
        assert msg in res.output and "Traceback" not in res.output, (args, res.output)
    assert set(os.listdir(tmp_path)) == before | {"junk.pth", "in.onnx"}
    # an existing output is refused without --force and left untouched
    existing = tmp_path / "keep.onnx"
    existing.write_bytes(b"keep me")
    res = run("export-onnx", pth, existing)
    assert res.exit_code == 2 and "exists" in res.output and existing.read_bytes() == b"keep me"


def test_failed_validation_exit_1_and_nothing_written(tmp_path, tiny_models):
    pth = _pth(tmp_path, tiny_models["7"])
    out = tmp_path / "o.onnx"
    report = tmp_path / "r.json"
    res = run("export-onnx", pth, out, "--tol", 1e-12, "--report", report)
    assert res.exit_code == 1, res.output
    assert "validation failed" in res.output and "FAIL" in res.output
    assert not out.exists() and json.loads(report.read_text())["validation"]["passed"] is False
    assert sorted(os.listdir(tmp_path)) == ["m.pth", "r.json"]


def test_onnx_model_rejects_foreign_files(tmp_path):
    with pytest.raises(RwkvToolsError, match="no such file"):
        OnnxModel(str(tmp_path / "nope.onnx"))
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(RwkvToolsError, match="cannot load"):
        OnnxModel(str(bad))
    # a valid ONNX model without rwkvtools metadata
    from onnx import helper
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(bad))
    with pytest.raises(RwkvToolsError, match="not an RWKV model exported by rwkvtools"):
        OnnxModel(str(bad))
    res = runner.invoke(main, ["inspect", str(bad)])
    assert res.exit_code == 2 and "not an RWKV model exported by rwkvtools" in res.output, res.output


def test_onnx_model_reads_stacked_state_files_of_interface_1(tmp_path, tiny_models):
    """Files of interface 1 (one [n_layer, batch, ...] tensor per state name) still run in
    OnnxModel: such a file is made here from a per-layer export by wrapping its state inputs
    in a Split/Squeeze and its outputs in Unsqueeze/Concat, with the old metadata."""
    from onnx import helper
    ck = tiny_models["7"]
    new = tmp_path / "v2.onnx"
    export(ck, new, mode="step", validate=False)
    m = onnx.load(str(new))
    meta = json.loads({p.key: p.value for p in m.metadata_props}["rwkvtools"])
    L = meta["n_layer"]
    groups = {}
    for s in meta["states"]:
        groups.setdefault(s["group"], s["shape"])
    g = m.graph
    per_in = {i.name: i for i in g.input}
    pre, post, ins, outs = [], [], [per_in["tokens"]], [g.output[0]]
    const = lambda name, vals: helper.make_tensor(name, onnx.TensorProto.INT64, [len(vals)], vals)  # noqa: E731
    g.initializer.extend([const("ax0", [0]), const("ones", [1] * L)])
    for grp, shape in groups.items():
        stacked = [L] + shape
        ins.append(helper.make_tensor_value_info(f"state_in_{grp}", onnx.TensorProto.FLOAT, stacked))
        outs.append(helper.make_tensor_value_info(f"state_out_{grp}", onnx.TensorProto.FLOAT, stacked))
        parts = [f"{grp}_part{i}" for i in range(L)]
        pre.append(helper.make_node("Split", [f"state_in_{grp}", "ones"], parts, axis=0))
        pre += [helper.make_node("Squeeze", [p, "ax0"], [f"state_in_{grp}.{i}"]) for i, p in enumerate(parts)]
        post += [helper.make_node("Unsqueeze", [f"state_out_{grp}.{i}", "ax0"], [f"{grp}_out{i}"]) for i in range(L)]
        post.append(helper.make_node("Concat", [f"{grp}_out{i}" for i in range(L)], [f"state_out_{grp}"], axis=0))
    nodes = pre + list(g.node) + post
    del g.node[:], g.input[:], g.output[:]
    g.node.extend(nodes), g.input.extend(ins), g.output.extend(outs)
    meta.update(interface_version=1,
                states=[{"name": k, "shape": [L] + s, "dtype": "float32"} for k, s in groups.items()])
    for p in m.metadata_props:
        if p.key == "rwkvtools":
            p.value = json.dumps(meta)
    old = tmp_path / "v1.onnx"
    onnx.save(m, str(old))
    toks = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(4))
    a, sa = OnnxModel(str(new))(toks)
    b, sb = OnnxModel(str(old))(toks)
    assert OnnxModel(str(old)).parts == {k: None for k in groups}
    assert torch.equal(a, b) and sa.keys() == sb.keys() == groups.keys()
    for k in groups:
        assert sa[k].shape == (L, 2, *groups[k][1:]) and torch.equal(sa[k], sb[k])
    ref, _ = build_model(ck)(toks)
    assert float((a - ref).abs().max()) < 1e-4


def test_onnx_model_refuses_metadata_that_lacks_a_layer_of_a_state(tmp_path, tiny_models):
    path = tmp_path / "m.onnx"
    export(tiny_models["7"], path, mode="step", validate=False)
    m = onnx.load(str(path))
    for p in m.metadata_props:
        if p.key == "rwkvtools":
            meta = json.loads(p.value)
            meta["states"] = [s for s in meta["states"] if s["name"] != "wkv.1"]
            p.value = json.dumps(meta)
    onnx.save(m, str(path))
    with pytest.raises(RwkvToolsError, match="unreadable rwkvtools metadata.*'wkv' lacks a layer"):
        OnnxModel(str(path))

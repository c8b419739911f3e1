"""The reference model of every version: parallel form vs token by token vs naive WKV vs any
split into pieces, logits and final state, fp32, odd lengths, batch > 1."""
import math

import pytest
import torch

from rwkvtools import ops
from rwkvtools.model import build_model
from conftest import VERSIONS, max_rel

TOL = 1e-5


def _state_view(spec, st):
    if spec.major == 4:  # (aa, bb, pp) is defined up to a common scale: compare a/b and log b
        return {"att_x": st["att_x"], "ffn_x": st["ffn_x"], "ab": st["aa"] / st["bb"],
                "logb": torch.log(st["bb"]) + st["pp"]}
    return st


def _assert_state_close(spec, s1, s0, tol=TOL):
    a, b = _state_view(spec, s1), _state_view(spec, s0)
    for k in b:
        assert max_rel(a[k], b[k]) <= tol, k


@pytest.fixture(autouse=True)
def _reset_backend():
    yield
    ops.set_backend(None)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("T", (1, 13, 64, 101))
def test_forms_agree(tiny_models, version, T):
    model = build_model(tiny_models[version])
    g = torch.Generator().manual_seed(T)
    toks = torch.randint(0, 97, (3, T), generator=g)
    with torch.no_grad():
        ops.set_backend("naive")
        ref, ref_state = model(toks)
        ops.set_backend(None)
        par, par_state = model(toks)
        st = None
        outs = []
        for t in range(T):
            o, st = model(toks[:, t:t + 1], st)
            outs.append(o)
        step = torch.cat(outs, 1)
    assert max_rel(par, ref) <= TOL
    assert max_rel(step, ref) <= TOL
    _assert_state_close(model.spec, par_state, ref_state)
    _assert_state_close(model.spec, st, ref_state)


@pytest.mark.parametrize("version", VERSIONS)
def test_any_split_gives_same_logits_and_state(tiny_models, version):
    model = build_model(tiny_models[version])
    toks = torch.randint(0, 97, (2, 90), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole, s_whole = model(toks)
        pieces, st = [], None
        for a, b in ((0, 5), (5, 6), (6, 47), (47, 90)):
            o, st = model(toks[:, a:b], st)
            pieces.append(o)
    assert max_rel(torch.cat(pieces, 1), whole) <= TOL
    _assert_state_close(model.spec, st, s_whole)


@pytest.mark.parametrize("version", VERSIONS)
def test_batch_rows_are_independent(tiny_models, version):
    model = build_model(tiny_models[version])
    toks = torch.randint(0, 97, (3, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        batched, _ = model(toks)
        single, _ = model(toks[1:2])
    assert max_rel(batched[1:2], single) <= TOL


@pytest.mark.parametrize("version", ("5.2", "7"))
def test_parallel_form_is_differentiable(tiny_models, version):
    model = build_model(tiny_models[version])
    params = [p for n, p in model.named_parameters() if n.endswith("ffn.key.weight")]
    for p in params:
        p.requires_grad_(True)
    toks = torch.randint(0, 97, (1, 50), generator=torch.Generator().manual_seed(3))
    logits, _ = model(toks)
    torch.nn.functional.cross_entropy(logits[0, :-1], toks[0, 1:]).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def test_zero_state_equals_fresh_state(tiny_models):
    model = build_model(tiny_models["4"])
    toks = torch.randint(0, 97, (1, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        a, _ = model(toks)
        b, _ = model(toks, model.init_state(1))
    assert torch.equal(a, b)
    assert all(float(v.abs().max()) == 0 for v in model.init_state(2).values())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("version", ("4", "5.2", "6", "7"))
def test_half_precision_tracks_fp32(tiny_models, version, dtype):
    """bf16/fp16 models (fp16 with the per-layer rescale for v4-v6) stay close to fp32."""
    ck = tiny_models[version]
    toks = torch.randint(0, 97, (1, 64), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref, _ = build_model(ck)(toks)
        low, _ = build_model(ck, dtype=dtype)(toks)
    assert torch.isfinite(low).all()
    tol = 0.15 if dtype == torch.bfloat16 else 0.03
    assert max_rel(low, ref) <= tol


@pytest.mark.parametrize("version", ("4", "5.2", "6", "7"))
def test_fp16_rescale_every_six_layers(version):
    """fp16 v4-v6 use ChatRWKV's rescale: layer i's att.output and ffn.value divided by 2^(i // 6),
    the residual halved after every 6th layer, logits those of fp32 (v7: no rescale). The 3-layer
    tiny models never reach a rescaled layer, so this model has 8."""
    from rwkvtools.random_init import random_checkpoint
    ck = random_checkpoint(version, n_layer=8, n_embd=64, head_size=16, vocab=97, seed=7)
    m16 = build_model(ck, dtype=torch.float16)
    assert m16.rescale_every == (0 if version == "7" else 6)
    for i in (0, 5, 6, 7):
        s = 1.0 if version == "7" else 2.0 ** (i // 6)
        for name in ("att.output", "ffn.value"):
            lin = m16.blocks[i].att.output if name == "att.output" else m16.blocks[i].ffn.value
            assert torch.equal(lin.weight, ck.tensors[f"blocks.{i}.{name}.weight"].half() / s), (i, name)
    toks = torch.randint(0, 97, (1, 32), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref, _ = build_model(ck)(toks)
        low, _ = m16(toks)
    assert max_rel(low.float(), ref) <= 0.01  # measured ~1e-3; a wrong rescale gives > 2e-2


def test_perplexity_matches_full_logits_cross_entropy(tiny_models):
    """perplexity() scores a dense head one vocabulary block at a time with a running logsumexp;
    it must equal cross_entropy on the model's full logits, with the state carried over chunks."""
    import math

    import torch.nn.functional as F

    from rwkvtools.validate import head_nll_sum, perplexity
    model = build_model(tiny_models["7"])
    toks = torch.randint(0, model.spec.vocab, (200,), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        logits, _ = model(toks[:-1].unsqueeze(0))
        want = F.cross_entropy(logits[0], toks[1:], reduction="mean").item()
        got = perplexity(model, toks, chunk_len=64, progress=False)
        h, _ = model.forward_hidden(toks[:-1].unsqueeze(0))
        # blocks smaller than the vocab and not dividing it: every target lands in some block
        blocked = head_nll_sum(model.head, h[0], toks[1:], vocab_block=7) / 199
    assert abs(got.nll_per_token - want) < 1e-5
    assert abs(blocked - want) < 1e-5
    assert got.ppl == pytest.approx(math.exp(want), rel=1e-5)


def test_perplexity_of_a_model_whose_logits_blow_up_is_inf_not_a_crash(tiny_models):
    """exp(mean NLL) overflows a float above ~709 nats: perplexity() reports inf (was an
    OverflowError), and a gate on a NaN or infinite measurement fails instead of passing."""
    import math

    from rwkvtools.checkpoint import Checkpoint
    from rwkvtools.errors import RwkvToolsError
    from rwkvtools.validate import Gate, perplexity
    ck = tiny_models["7"]
    t = dict(ck.tensors)
    t["head.weight"] = t["head.weight"] * 1e5
    model = build_model(Checkpoint(t, dict(ck.manifest)))
    toks = torch.randint(0, model.spec.vocab, (64,), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        r = perplexity(model, toks, chunk_len=32, progress=False)
    assert r.nll_per_token > 709 and r.ppl == math.inf
    gate = Gate("ppl_increase_pct", max=5.0)
    assert gate.check({"ppl_increase_pct": math.inf})[0] is False
    ok, why = gate.check({"ppl_increase_pct": math.nan})
    assert ok is False and "not a number" in why
    assert gate.check({"ppl_increase_pct": 4.0})[0] is True
    with pytest.raises(RwkvToolsError, match="bound must be a number"):
        Gate("ppl_increase_pct", max=math.nan)


def test_reports_are_strict_json(tmp_path):
    """NaN/inf in a report become null (Python's NaN/Infinity tokens are not JSON)."""
    import json
    import math

    from rwkvtools.io.atomic import json_text, write_json
    rep = {"ppl": math.nan, "rate": math.inf, "nested": [{"x": -math.inf, "y": 1.5}], "n": 3, "s": "nan"}
    want = {"ppl": None, "rate": None, "nested": [{"x": None, "y": 1.5}], "n": 3, "s": "nan"}
    strict = dict(parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))
    assert json.loads(json_text(rep), **strict) == want
    write_json(str(tmp_path / "r.json"), rep)
    assert json.loads((tmp_path / "r.json").read_text(), **strict) == want


def test_gate_bounds_are_inclusive_and_every_gate_must_pass():
    """A metric equal to its bound passes (max: v <= max, min: v >= min); one failing gate fails
    the report; a bool is not a measurement."""
    from rwkvtools.validate import Gate, apply_gates
    assert Gate("m", max=5.0).check({"m": 5.0})[0] is True
    assert Gate("m", max=5.0).check({"m": 5.0000001})[0] is False
    assert Gate("m", min=0.3).check({"m": 0.3})[0] is True
    assert Gate("m", min=0.3).check({"m": 0.2999999})[0] is False
    assert Gate("m", max=5.0).check({"m": True})[0] is False
    rep = {"a": 1.0, "b": 10.0}
    verdicts = apply_gates(rep, [Gate("a", max=2.0), Gate("b", max=2.0)])
    assert [v["passed"] for v in verdicts] == [True, False] and rep["passed"] is False
    rep = {"a": 1.0}
    apply_gates(rep, [Gate("a", max=2.0), Gate("a", min=0.5)])
    assert rep["passed"] is True


def test_ppl_of_keeps_nan():
    from rwkvtools.validate import ppl_of
    assert math.isnan(ppl_of(math.nan)) and ppl_of(math.inf) == math.inf
    assert ppl_of(2.0) == pytest.approx(math.exp(2.0))


def test_validate_transform_report_equals_a_direct_computation(tiny_models):
    """validate_transform's figures against plain torch: full-sequence logits and cross entropy
    of both models, their logit difference, parameter counts and bytes of the tensors."""
    import torch.nn.functional as F
    from rwkvtools.transforms.convert import cast
    from rwkvtools.validate import validate_transform
    before = tiny_models["5.2"]
    t = dict(before.tensors)
    for k in [k for k in t if k.endswith("ffn.value.weight")]:     # a rank-4 ffn.value: fewer parameters
        U, S, Vh = torch.linalg.svd(t.pop(k), full_matrices=False)
        t[k[:-len("weight")] + "weight_u"], t[k[:-len("weight")] + "weight_v"] = U[:, :4] * S[:4], Vh[:4]
    t["head.weight"] = t["head.weight"] * 3                           # sharper logits: another perplexity
    after = cast(before.with_tensors(t, entry={"transform": "test-rank4", "options": {}}), "fp16")
    toks = torch.randint(0, 97, (150,), generator=torch.Generator().manual_seed(12)).tolist()
    rep = validate_transform(before, after, toks, max_ppl_increase=1e9, chunk_len=64, drift_tokens=50)

    def ppl_and_logits(ck):
        with torch.no_grad():
            lo, _ = build_model(ck)(torch.tensor([toks]))
        return math.exp(float(F.cross_entropy(lo[0, :-1].float(), torch.tensor(toks[1:])))), lo[0].float()
    p0, l0 = ppl_and_logits(before)
    p1, l1 = ppl_and_logits(after)
    assert rep["ppl_before"] == pytest.approx(p0, rel=1e-4) and rep["ppl_after"] == pytest.approx(p1, rel=1e-4)
    assert abs(p1 / p0 - 1) > 1e-3                                  # the transform changed the model
    assert rep["ppl_increase_pct"] == pytest.approx(100 * (p1 / p0 - 1), rel=1e-2, abs=1e-3)
    d = (l1[:50] - l0[:50]).abs()
    assert rep["logits_drift"]["tokens"] == 50 and float(d.max()) > 1e-3
    assert rep["logits_drift"]["max_abs"] == pytest.approx(float(d.max()), rel=1e-3)
    assert rep["logits_drift"]["mean_abs"] == pytest.approx(float(d.mean()), rel=1e-3)
    nb = sum(v.numel() for v in before.tensors.values())
    na = sum(after.tensors[k].numel() for k in after.tensors)
    assert (rep["params_before"], rep["params_after"]) == (nb, na) and na < nb
    assert rep["bytes_before"] == 4 * nb
    assert rep["bytes_after"] == sum(after.tensors[k].numel() * (2 if after.tensors[k].dtype == torch.float16 else 4)
                                     for k in after.tensors)
    assert rep["passed"] is True and rep["gates"][0]["metric"] == "ppl_increase_pct"


def _bad_calls(model, vocab):
    """(tokens, state, message) a caller can get wrong, each with what the error must say."""
    st2 = model.init_state(2)
    return [
        (torch.tensor([[vocab]]), None, f"token id {vocab} is outside the model's vocabulary \\(0..{vocab - 1}\\)"),
        (torch.tensor([[3, -1]]), None, "token id -1 is outside"),
        (torch.tensor([[1.0]]), None, "integer ids, got torch.float32"),
        (torch.tensor([[True]]), None, "integer ids, got torch.bool"),
        (torch.tensor([1, 2]), None, r"\(batch, time\), got shape \(2,\)"),
        (torch.zeros(1, 0, dtype=torch.long), None, "at least one position"),
        (torch.tensor([[1]]), st2, r"for a batch of 1 \(init_state\(batch_size\)"),
        (torch.tensor([[1]]), {"x": torch.zeros(1)}, "state must be a dict of"),
    ]


@pytest.mark.parametrize("version", VERSIONS)
def test_bad_calls_are_clear_value_errors(tiny_models, version):
    """Token ids outside the vocabulary, float tokens and a state of another batch or model were an
    IndexError / RuntimeError from inside torch (or, for floats on the ONNX path, silently
    truncated); now one ValueError that says what is wrong."""
    model = build_model(tiny_models[version])
    vocab = model.spec.vocab
    for tokens, state, match in _bad_calls(model, vocab):
        with pytest.raises(ValueError, match=match):
            model(tokens, state)
    # what is right still runs: int32 and other integer dtypes, a list, the last id
    for toks in (torch.tensor([[1, vocab - 1]], dtype=torch.int32), torch.tensor([[1, 2]], dtype=torch.uint8),
                 [[1, vocab - 1]]):
        with torch.no_grad():
            logits, _ = model(toks, model.init_state(1))
        assert logits.shape == (1, 2, vocab)


def test_build_model_names_a_tensor_of_the_wrong_shape_or_an_unknown_one(tmp_path):
    """eval (build_model) did not check shapes: a short ffn.key in layer 1 ended in 'internal error
    (RuntimeError: mat1 and mat2 shapes cannot be multiplied)'; an unknown key was accepted (convert
    refused both). The layout check runs where every model is built."""
    from click.testing import CliRunner
    from rwkvtools.checkpoint import Checkpoint
    from rwkvtools.cli import main
    from rwkvtools.errors import RwkvToolsError
    from rwkvtools.io.writers import write_checkpoint
    from rwkvtools.random_init import random_checkpoint
    ck = random_checkpoint("7", n_layer=2, n_embd=32, vocab=256, head_size=16, seed=1)
    short = Checkpoint({**ck.tensors, "blocks.1.ffn.key.weight": torch.zeros(64, 32)}, ck.manifest)
    extra = Checkpoint({**ck.tensors, "foo.bar": torch.zeros(3)}, ck.manifest)
    with pytest.raises(RwkvToolsError, match=r"'blocks.1.ffn.key.weight' has shape \(64, 32\)"):
        build_model(short)
    with pytest.raises(RwkvToolsError, match="'foo.bar' is not a tensor of the RWKV 7 layout"):
        build_model(extra)
    p = tmp_path / "short.safetensors"
    write_checkpoint(short, str(p))
    text = tmp_path / "t.txt"
    text.write_text("hello world " * 20)
    r = CliRunner().invoke(main, ["eval", str(p), "--text", str(text), "--max-tokens", "16"])
    assert r.exit_code == 2 and "blocks.1.ffn.key.weight" in r.output and "internal error" not in r.output, r.output


@pytest.mark.parametrize("version", VERSIONS)
def test_an_empty_dimension_is_refused(version):
    """vocab 0 (or n_embd 0) passed detection: convert to .bin was an internal error (memoryview
    cast), eval a ValueError, quantize a ZeroDivisionError, and safetensors output wrote a
    vocab-0 model."""
    from rwkvtools.errors import SpecError
    from rwkvtools.random_init import random_checkpoint
    from rwkvtools.spec import detect
    ck = random_checkpoint(version, n_layer=1, n_embd=32, vocab=64, head_size=16, seed=1)
    t = dict(ck.tensors)
    t["emb.weight"], t["head.weight"] = t["emb.weight"][:0], t["head.weight"][:0]
    with pytest.raises(SpecError, match="vocab 0: an empty model"):
        detect(t)
    assert detect(ck.tensors).vocab == 64


def test_state_of_another_dtype_or_kind_and_bad_batch_size_are_value_errors():
    """A float64 state gave torch's 'expected m1 and m2 to have the same dtype' from deep inside,
    init_state(-1) torch's RuntimeError, a state of lists an AttributeError."""
    from rwkvtools.random_init import random_checkpoint
    from rwkvtools.model import build_model
    m = build_model(random_checkpoint("7", n_layer=1, n_embd=32, vocab=64, head_size=16, seed=1))
    st = m.init_state(1)
    toks = torch.tensor([[1, 2]])
    with pytest.raises(ValueError, match=r"state\['.*'\] is torch.float64, this model keeps it in torch.float32"):
        m(toks, {k: v.double() for k, v in st.items()})
    with pytest.raises(ValueError, match=r"must be a tensor, got list"):
        m(toks, {k: v.tolist() for k, v in st.items()})
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="batch_size must be a whole number >= 0"):
            m.init_state(bad)
    out, st2 = m(toks, st)   # the right state still works, and its output state is accepted again
    assert m(toks, st2)[0].shape == out.shape

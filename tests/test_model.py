"""The reference model of every version: parallel form vs token by token vs naive WKV vs any
split into pieces, logits and final state, fp32, odd lengths, batch > 1."""
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

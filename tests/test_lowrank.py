"""lowrank transform: factor pairs reproduce the model at full rank, the rank formula gives the
parameter count it promises, --merge equals the factored model, whitening minimises the output
error on the calibration inputs (and beats plain SVD on a trained model), every version's FFN,
plan/apply determinism, manifest/inspect, CLI gate and errors."""
import json

import pytest
import torch
from click.testing import CliRunner

from rwkvtools.cli import main

from conftest import DATA, VERSIONS, fixture_path, max_rel, wikitext_bytes
from rwkvtools.model import build_model
from rwkvtools.model.linear import DenseLinear, LowRankLinear
from rwkvtools.random_init import random_checkpoint
from rwkvtools.spec import detect
from rwkvtools.transforms.lowrank import (LowRankConfig, LowRankError, apply, energy_ranks, lowrank, plan,
                                          svd_factors, target_prefixes, uniform_rank, whitened_factors)


pytestmark = pytest.mark.usefixtures("one_thread")


def _toks(n, vocab=97, seed=0):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def _logits(ckpt, toks):
    with torch.no_grad():
        return build_model(ckpt)(toks.reshape(1, -1))[0]


def _ffn_names(version):
    return ("ffn.key", "ffn.value") + (() if version == "7" else ("ffn.receptance",))


# ------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("kw", [dict(rank=0), dict(rank=-0.5), dict(rank=1.5), dict(rank=float("nan")),
                                dict(rank=0.5, method="pca"), dict(rank=0.5, targets="all"),
                                dict(rank=0.5, alloc="greedy"), dict(rank=0.5, damp=-1.0),
                                dict(rank=0.5, calib_tokens=1), dict(rank=True)])
def test_config_rejects_bad_options(kw):
    with pytest.raises(LowRankError):
        LowRankConfig(**kw)


def test_config_is_frozen():
    cfg = LowRankConfig(rank=0.5)
    with pytest.raises(Exception):
        cfg.rank = 0.3  # type: ignore[misc]


# ------------------------------------------------------------------------------ factorisation
@pytest.mark.parametrize("m,n", [(24, 16), (16, 24)])
def test_whitening_truncation_error_is_the_discarded_whitened_energy(m, n):
    """On the calibration inputs X, ||X W^T - X W_r^T||^2 / rows equals the discarded squared
    singular values of W L (no damping, full-rank covariance; checked against torch's SVD), and
    the plain-SVD truncation of the same rank does clearly worse there."""
    g = torch.Generator().manual_seed(3)
    rows, r = 400, 5
    mix = torch.randn(n, n, generator=g, dtype=torch.float64) * torch.logspace(0, -2, n, dtype=torch.float64)
    x = torch.randn(rows, n, generator=g, dtype=torch.float64) @ mix  # strongly correlated inputs
    w = torch.randn(m, n, generator=g, dtype=torch.float64)
    f = whitened_factors(w, x.t() @ x, rows, damp=0.0)
    assert f.whitened and f.damp == 0.0
    ref_s = torch.linalg.svdvals(w @ torch.linalg.cholesky(x.t() @ x / rows))
    assert torch.allclose(f.s, ref_s, rtol=1e-7, atol=1e-10)
    u, v = f.pair(r)
    assert u.shape == (m, r) and v.shape == (r, n)
    err_w = float(((x @ w.t() - x @ (u @ v).t()) ** 2).sum()) / rows
    assert err_w == pytest.approx(float(ref_s[r:].square().sum()), rel=1e-7)
    assert f.kept_energy(r) == pytest.approx(1 - err_w / (float((x @ w.t()).square().sum()) / rows), rel=1e-7)
    sv = svd_factors(w)
    assert torch.allclose(sv.s, torch.linalg.svdvals(w), rtol=1e-9)
    us, vs = sv.pair(r)
    assert float((w - us @ vs).square().sum()) == pytest.approx(float(sv.s[r:].square().sum()), rel=1e-7)
    assert torch.allclose(us.norm(dim=0), vs.norm(dim=1))  # balanced split
    err_s = float(((x @ w.t() - x @ (us @ vs).t()) ** 2).sum()) / rows
    assert err_w < 0.8 * err_s
    u, v = f.pair(min(m, n))  # full rank reproduces W
    assert torch.allclose(u @ v, w, atol=1e-9)


@pytest.mark.parametrize("m,n", [(12, 8), (6, 8)])
def test_whitening_regularises_a_singular_covariance_and_dead_inputs(m, n):
    g = torch.Generator().manual_seed(4)
    w = torch.randn(m, n, generator=g, dtype=torch.float64)
    x = torch.randn(5, n, generator=g, dtype=torch.float64)  # rank 5 < n: singular Gram
    f = whitened_factors(w, x.t() @ x, 5, damp=0.0)
    if m > n:  # the Cholesky route needs a positive definite covariance: damping was raised
        assert f.damp > 0
    assert torch.isfinite(f.left).all() and torch.isfinite(f.right).all()
    u, v = f.pair(min(m, n))
    assert torch.allclose(u @ v, w, atol=1e-6)
    dead = whitened_factors(w, torch.zeros(n, n, dtype=torch.float64), 10, damp=1e-3)
    assert not dead.whitened  # no input energy: plain SVD
    assert torch.allclose(dead.s, torch.linalg.svdvals(w))


def test_energy_allocation_follows_the_spectrum_within_budget():
    shapes = [(40, 20), (40, 20), (20, 20)]
    peaked = torch.tensor([10.0] + [0.01] * 19)
    flat = torch.ones(20)
    budget = 8 * 60 + 8 * 60 + 5 * 40
    ranks = energy_ranks([peaked, flat, flat.clone()], shapes, budget)
    spent = sum(r * (m + n) for r, (m, n) in zip(ranks, shapes))
    caps = [m * n // (m + n) for m, n in shapes]  # never past the dense break-even rank
    assert spent <= budget
    # nothing more fits: every matrix is at its cap or costs more than what is left
    assert all(r == c or m + n > budget - spent for r, c, (m, n) in zip(ranks, caps, shapes))
    assert ranks[0] == 1  # all its energy is in one direction
    assert ranks[1] > 8 and ranks[2] > 5
    assert all(1 <= r <= c for r, c in zip(ranks, caps))


def test_uniform_rank_formula():
    """r = round(R m n / (m + n)) for R < 1 (in [1, min(m, n)]), R itself for R >= 1."""
    for R in (0.1, 0.25, 0.32, 0.5, 0.75):
        for m in range(1, 40, 3):
            for n in range(1, 40, 5):
                want = max(1, min(m, n, int(round(R * m * n / (m + n)))))
                assert uniform_rank(R, m, n) == want, (R, m, n)
    assert uniform_rank(7, 40, 30) == 7 and uniform_rank(100, 40, 30) == 30


def test_energy_allocation_weighs_the_cost_of_a_direction():
    """Directions are taken by energy share per parameter (share / (m + n)): the small matrix's
    flat directions (share 0.1, cost 20) come before the big one's second direction (share 0.23,
    cost 400), which then no longer fits."""
    big = torch.tensor([1.0, 0.5477] + [0.01] * 198, dtype=torch.float64)
    small = torch.ones(10, dtype=torch.float64)
    assert energy_ranks([big, small], [(200, 200), (10, 10)], 400 + 20 + 400) == [1, 5]


def test_whitening_damping_grows_only_as_far_as_needed():
    """A singular covariance on the Cholesky route (m > n) with damp 0: the regulariser starts at
    1e-12 (relative) and grows tenfold only while the factorisation fails."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(12, 8, generator=g, dtype=torch.float64)
    x = torch.randn(5, 8, generator=g, dtype=torch.float64)
    f = whitened_factors(w, x.t() @ x, 5, damp=0.0)
    assert 0 < f.damp <= 1e-9


# -------------------------------------------------------------------------- model contracts
@pytest.mark.parametrize("version", VERSIONS)
def test_full_rank_reproduces_the_model(tiny_models, version):
    ck = tiny_models[version]
    toks = _toks(160)
    ref = _logits(ck, toks)
    for method in ("svd", "whiten"):
        out = lowrank(ck, LowRankConfig(rank=10 ** 6, method=method, targets="ffn+att"), toks)
        model = build_model(out)
        assert isinstance(model.blocks[0].ffn.key, LowRankLinear)
        assert isinstance(model.blocks[-1].att.output, LowRankLinear)
        assert max_rel(_logits(out, toks), ref) <= 1e-5, method


@pytest.mark.parametrize("version", VERSIONS)
def test_every_version_ffn_is_factored(tiny_models, version):
    ck = tiny_models[version]
    spec = detect(ck.tensors)
    toks = _toks(120, seed=1)
    out = lowrank(ck, LowRankConfig(rank=0.5), toks)
    names = _ffn_names(version)
    for i in range(spec.n_layer):
        for n in names:
            p = f"blocks.{i}.{n}"
            assert f"{p}.weight" not in out.tensors and f"{p}.weight_u" in out.tensors
        assert f"blocks.{i}.att.key.weight" in out.tensors  # time-mix untouched by default
    assert len(out.manifest["lowrank"]["ranks"]) == spec.n_layer * len(names)
    model = build_model(out)
    assert isinstance(model.blocks[1].ffn.value, LowRankLinear)
    assert isinstance(model.blocks[1].att.key, DenseLinear)
    lo = _logits(out, toks)
    assert torch.isfinite(lo).all()
    assert not torch.allclose(lo, _logits(ck, toks))  # rank 0.5 really changes something
    # ffn+att adds the time-mix projections the version has (gate: 5.1, 5.2, 6)
    att = target_prefixes(ck.tensors, spec, "ffn+att")
    has_gate = version in ("5.1", "5.2", "6")
    assert ("blocks.0.att.gate" in att) == has_gate
    assert {"blocks.0.att.receptance", "blocks.0.att.key", "blocks.0.att.value", "blocks.0.att.output"} <= set(att)


@pytest.mark.parametrize("ffn_dim", [192, 224])
def test_rank_half_gives_the_formula_parameter_count(ffn_dim):
    ck = random_checkpoint("5.2", n_layer=2, n_embd=64, vocab=97, head_size=16, ffn_dim=ffn_dim, seed=2)
    out = lowrank(ck, LowRankConfig(rank=0.5, method="svd"))
    shapes = [(ffn_dim, 64), (64, ffn_dim), (64, 64)] * 2  # key, value, receptance per layer
    want_targets = sum(round(0.5 * m * n / (m + n)) * (m + n) for m, n in shapes)
    dense_targets = sum(m * n for m, n in shapes)
    assert out.num_params() == ck.num_params() - dense_targets + want_targets
    assert out.manifest["lowrank"]["params_after"] == want_targets
    if ffn_dim == 192:  # 0.5*192*64/256 = 24 and 0.5*64*64/128 = 16: exactly half
        assert want_targets * 2 == dense_targets
    else:
        assert abs(want_targets - dense_targets / 2) <= sum(m + n for m, n in shapes) / 2


def test_energy_allocation_spends_the_uniform_budget(tiny_models):
    ck = tiny_models["6"]
    toks = _toks(200, seed=5)
    uni = plan(ck, LowRankConfig(rank=0.32), toks)
    eng = plan(ck, LowRankConfig(rank=0.32, alloc="energy"), toks)
    assert [x["prefix"] for x in uni["layers"]] == [x["prefix"] for x in eng["layers"]]
    assert eng["params_after"] <= uni["params_after"]
    for kind in ("ffn.key", "ffn.value", "ffn.receptance"):  # each role keeps its own budget
        u = [x for x in uni["layers"] if x["prefix"].endswith(kind)]
        e = [x for x in eng["layers"] if x["prefix"].endswith(kind)]
        spent_u, spent_e = sum(x["params_after"] for x in u), sum(x["params_after"] for x in e)
        assert spent_e <= spent_u and spent_u - spent_e < sum(e[0]["shape"])
    assert [x["rank"] for x in eng["layers"]] != [x["rank"] for x in uni["layers"]]
    # it keeps more of the summed energy share than the uniform ranks do
    assert eng["kept_energy_mean"] > uni["kept_energy_mean"]


def test_merge_equals_the_factored_model(tiny_models):
    ck = tiny_models["7"]
    toks = _toks(150, seed=2)
    fac = lowrank(ck, LowRankConfig(rank=0.32, targets="ffn+att"), toks)
    mer = lowrank(ck, LowRankConfig(rank=0.32, targets="ffn+att", merge=True), toks)
    assert not any(k.endswith(("weight_u", "weight_v")) for k in mer.tensors)
    assert mer.tensors["blocks.0.ffn.key.weight"].shape == ck.tensors["blocks.0.ffn.key.weight"].shape
    assert mer.num_params() == ck.num_params()
    assert torch.linalg.matrix_rank(mer.tensors["blocks.0.ffn.key.weight"].double(), rtol=1e-5) == \
        fac.tensors["blocks.0.ffn.key.weight_u"].shape[1]
    assert max_rel(_logits(mer, toks), _logits(fac, toks)) <= 1e-5


def test_plan_is_json_and_apply_is_deterministic(tiny_models):
    ck = tiny_models["5.2"]
    snapshot = {k: ck.tensors[k].clone() for k in ck.tensors}
    toks = _toks(200, seed=3)
    cfg = LowRankConfig(rank=0.4, alloc="energy", targets="ffn+att")
    p = plan(ck, cfg, toks)
    p2 = json.loads(json.dumps(p))
    a = apply(ck, p2, toks)
    b = apply(ck, p2, toks)
    c = lowrank(ck, cfg, toks)
    assert sorted(a.tensors) == sorted(c.tensors)
    for k in a.tensors:
        assert torch.equal(a.tensors[k], b.tensors[k]), k
        assert torch.allclose(a.tensors[k], c.tensors[k], rtol=0, atol=1e-6), k
    for k in snapshot:  # the input is never mutated
        assert torch.equal(ck.tensors[k], snapshot[k]), k
    with pytest.raises(LowRankError, match="calibration tokens differ"):
        apply(ck, p2, _toks(200, seed=4))
    other = random_checkpoint("5.2", n_layer=3, n_embd=32, vocab=97, head_size=16, seed=1)
    with pytest.raises(LowRankError, match="does not fit"):
        apply(other, p2, toks)


def test_manifest_history_and_inspect(tmp_path, tiny_models):
    from rwkvtools.cli import main
    from rwkvtools.inspect import describe
    from rwkvtools.io import read_checkpoint
    from rwkvtools.io.writers import write_checkpoint
    ck = tiny_models["4"]
    out = lowrank(ck, LowRankConfig(rank=0.5, method="svd"))
    assert "lowrank" not in ck.manifest and len(ck.history) == len(out.history) - 1
    entry = out.history[-1]
    assert entry["transform"] == "lowrank" and entry["options"]["method"] == "svd"
    assert len(entry["plan"]["layers"]) == 9
    path = tmp_path / "lr.safetensors"
    write_checkpoint(out, str(path))
    back = read_checkpoint(str(path))
    info = describe(back)
    assert info["lowrank"]["ranks"]["blocks.0.ffn.key"] == round(0.5 * 256 * 64 / 320)
    assert info["parameters"]["total"] == out.num_params()
    assert max_rel(_logits(back, _toks(50)), _logits(out, _toks(50))) == 0.0
    res = CliRunner().invoke(main, ["inspect", str(path)])
    assert res.exit_code == 0, res.output
    assert "lowrank" in res.output and "ranks" in res.output


def test_refactoring_a_factored_checkpoint_and_dtypes():
    ck = random_checkpoint("7", n_layer=2, n_embd=64, vocab=97, head_size=16, seed=4, dtype=torch.float16)
    a = lowrank(ck, LowRankConfig(rank=0.5, method="svd"))
    assert a.tensors["blocks.0.ffn.key.weight_u"].dtype == torch.float16
    b = lowrank(a, LowRankConfig(rank=8, method="svd"))
    assert b.tensors["blocks.1.ffn.value.weight_u"].shape == (64, 8)
    assert b.num_params() < a.num_params()
    assert [h["transform"] for h in b.history][-2:] == ["lowrank", "lowrank"]


@pytest.mark.parametrize("alloc", ["uniform", "energy"])
def test_refactoring_never_raises_a_stored_rank(alloc):
    """A factored target re-factored at a larger rank (a larger share, or an absolute rank above
    the stored one) grew the file with zero-energy directions (ranks 16-26 -> 36 at 0.7); the rank
    only goes down, as the README says."""
    ck = random_checkpoint("5.2", n_layer=2, n_embd=64, vocab=97, head_size=16, seed=5)
    a = lowrank(ck, LowRankConfig(rank=0.3, method="svd", alloc=alloc))
    stored = {n: a.tensors[n].shape[1] for n in a.tensors if n.endswith(".weight_u")}
    for rank in (0.7, 0.95, 40):
        b = lowrank(a, LowRankConfig(rank=rank, method="svd", alloc=alloc))
        assert {n: b.tensors[n].shape[1] for n in stored} == stored, rank
        assert b.num_params() == a.num_params()
        assert b.history[-1]["plan"]["params_after"] == b.history[-1]["plan"]["params_before"]
    c = lowrank(a, LowRankConfig(rank=4, method="svd", alloc=alloc))   # going down still works
    assert all(c.tensors[n].shape[1] <= r for n, r in stored.items()) and c.num_params() < a.num_params()
    if alloc == "uniform":
        assert all(c.tensors[n].shape[1] == min(4, r) for n, r in stored.items())


def test_unreadable_linear_forms_are_refused(tiny_models):
    ck = tiny_models["7"]
    t = dict(ck.tensors)
    w = t.pop("blocks.1.ffn.key.weight")
    t["blocks.1.ffn.key.shape"] = torch.tensor(list(w.shape))  # as a quantized/shared linear stores it
    with pytest.raises(LowRankError, match="blocks.1.ffn.key"):
        target_prefixes(t, detect(ck.tensors), "ffn")


# ----------------------------------------------------------------------------- trained model
def test_whiten_beats_svd_on_the_trained_v52_fixture():
    from rwkvtools.io import read_checkpoint
    from rwkvtools.transforms.lowrank import calibration_tokens
    from rwkvtools.validate import perplexity
    ck = read_checkpoint(fixture_path("tiny-rwkv-5v2-730K-FP32.bin")).materialize()
    ev = list(wikitext_bytes(1024))
    cal = calibration_tokens(None, 256, 2048)
    base = perplexity(build_model(ck), ev).ppl
    ppl = {m: perplexity(build_model(lowrank(ck, LowRankConfig(rank=0.5, method=m), cal)), ev).ppl
           for m in ("svd", "whiten")}
    loss_svd, loss_whiten = ppl["svd"] - base, ppl["whiten"] - base
    assert loss_svd > 0 and loss_whiten > 0
    assert loss_whiten < 0.75 * loss_svd, (base, ppl)


# ------------------------------------------------------------------------------------------ CLI
def _run(*args):
    from rwkvtools.cli import main
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_gate_fails_and_passes_with_report(tmp_path):
    src = fixture_path("tiny-rwkv-5v2-730K-FP32.bin")
    rep = tmp_path / "rep.json"
    dst = tmp_path / "out.safetensors"
    res = _run("lowrank", src, dst, "--rank", 0.32, "--method", "svd", "--eval-tokens", 1024,
               "--max-ppl-increase", 5, "--report", rep)
    assert res.exit_code == 1, res.output
    r = json.loads(rep.read_text())
    assert r["validation"]["passed"] is False and r["ppl_after"] > 1.05 * r["ppl_before"]
    assert not dst.exists() and r["written"] is False
    res = _run("lowrank", src, dst, "--rank", 0.32, "--method", "svd", "--eval-tokens", 1024,
               "--max-ppl-increase", 1000, "--json")
    assert res.exit_code == 0, res.output
    r = json.loads(res.output)
    assert dst.exists() and r["written"] is True and r["validation"]["passed"] is True
    assert len(r["layers"]) == 36 and {"rank", "kept_energy", "params_before", "params_after"} <= set(r["layers"][0])
    assert r["params_after"] < r["params_before"] and r["target_params_after"] < r["target_params_before"]
    assert r["ppl_before"] == pytest.approx(r["validation"]["ppl_before"])
    assert r["validation"]["eval_tokens"] == 1024


def test_cli_whiten_merge_and_errors(tmp_path):
    src = tmp_path / "m.safetensors"
    assert _run("init", src, "--version", "5.2", "--layers", 2, "--dim", 32, "--vocab", 256,
                "--head-size", 8).exit_code == 0
    calib = tmp_path / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    dst = tmp_path / "o.pth"
    res = _run("lowrank", src, dst, "--rank", 0.5, "--calib", calib, "--calib-tokens", 300, "--merge",
               "--eval-tokens", 256, "--json")
    assert res.exit_code == 0, res.output
    r = json.loads(res.output)
    assert r["calibration"]["tokens"] == 300 and r["config"]["merge"] is True
    assert r["params_after"] == r["params_before"]
    assert _run("lowrank", src, dst, "--rank", 0.5).exit_code == 2  # exists, no --force
    bad = _run("lowrank", src, tmp_path / "x.pth", "--rank", 1.5)
    assert bad.exit_code == 2 and "whole number" in bad.output and not (tmp_path / "x.pth").exists()
    nolr = _run("lowrank", src, tmp_path / "x.bin", "--rank", 0.5)
    assert nolr.exit_code == 2 and "--merge" in nolr.output
    same = _run("lowrank", src, src, "--rank", 0.5, "--force")
    assert same.exit_code == 2 and "input" in same.output
    missing = _run("lowrank", tmp_path / "nope.pth", tmp_path / "y.pth", "--rank", 0.5)
    assert missing.exit_code == 2 and "Traceback" not in missing.output


def test_refusals_of_factored_linears_name_a_merge_that_works(tmp_path):
    """quantize of a checkpoint whose every linear is factored said 'every tensor is kept (check
    --skip)' with no --skip given, and rwkv.cpp's refusal said 're-densify it' without saying how;
    both now name the merge, and the merge they name keeps the model (the factors' product)."""
    from rwkvtools.io import read_checkpoint
    from rwkvtools.io.safetensors_io import write_safetensors
    ck = random_checkpoint("5.2", n_layer=2, n_embd=64, vocab=256, head_size=16, seed=6)
    lr = str(tmp_path / "lr.safetensors")
    write_safetensors(lowrank(ck, LowRankConfig(rank=0.4, method="svd", targets="ffn+att")), lr)
    r = _run("quantize", lr, str(tmp_path / "q.safetensors"), "--scheme", "int4", "--no-validate")
    assert r.exit_code == 2 and "low-rank factors" in r.output and "check --skip" not in r.output, r.output
    r = _run("convert", lr, str(tmp_path / "x.bin"), "--no-validate")
    advice = "--merge --method svd --rank 100000 --targets ffn+att"      # time-mix linears are factored too
    assert r.exit_code == 2 and advice in r.output, r.output
    dense = str(tmp_path / "dense.safetensors")
    r = _run("lowrank", lr, dense, *advice.split(), "--no-validate")
    assert r.exit_code == 0, r.output
    toks = _toks(40, vocab=256)
    assert max_rel(_logits(read_checkpoint(dense), toks), _logits(read_checkpoint(lr), toks)) < 1e-4
    assert _run("convert", dense, str(tmp_path / "x.bin"), "--no-validate").exit_code == 0


@pytest.mark.parametrize("extra", [["--damp", "0.1"], ["--calib-tokens", "300"], ["--chunk-len", "64"],
                                   ["--calib", str(DATA / "wikitext-2-test.txt")]])
def test_cli_calibration_options_with_svd_are_refused(tmp_path, extra):
    """--method svd uses no calibration: --calib, --calib-tokens, --damp, --chunk-len were accepted
    and ignored (the same file as without them)."""
    src, dst = fixture_path("tiny-rwkv-5v2-730K-FP32.bin"), tmp_path / "o.safetensors"
    res = _run("lowrank", src, dst, "--rank", 0.5, "--method", "svd", *extra, "--no-validate")
    assert res.exit_code == 2 and f"error: {extra[0]} applies to --method whiten" in res.output, res.output
    assert not dst.exists()


def test_fp16_rwkvcpp_source_written_as_bin_stays_fp16(tmp_path):
    """lowrank/recursive/heal wrote an FP16 .bin source's merged result to .bin as FP32 (twice the
    size); convert kept FP16. The rwkv.cpp writer now defaults to the matrices' own type."""
    src = fixture_path("tiny-rwkv-7v0-834K-FP16.bin")
    dst = tmp_path / "m.bin"
    r = CliRunner().invoke(main, ["lowrank", src, str(dst), "--rank", "0.5", "--merge", "--no-validate"])
    assert r.exit_code == 0, r.output
    from rwkvtools.io import read_checkpoint
    assert read_checkpoint(str(dst)).manifest["source_format"]["data_type"] == "FP16"
    assert dst.stat().st_size == __import__("os").path.getsize(src)


def test_gate_with_no_validate_is_refused(tmp_path):
    src = tmp_path / "m.safetensors"
    CliRunner().invoke(main, ["init", str(src), "--version", "7", "--layers", "1", "--dim", "64", "--vocab", "256",
                              "--head-size", "16"])
    for args in (["--no-validate", "--max-ppl-increase", "1"], ["--max-ppl-increase", "1", "--no-validate"]):
        r = CliRunner().invoke(main, ["lowrank", str(src), str(tmp_path / "o.safetensors"), "--rank", "0.5", *args])
        assert r.exit_code == 2 and "no effect with --no-validate" in r.output, r.output
        assert not (tmp_path / "o.safetensors").exists()


def test_inspect_marks_an_earlier_transforms_summary_as_before_the_later_one(tmp_path):
    """After recursive then lowrank, inspect showed the recursive summary's sizes (2,991,968 bytes)
    as if they were the file's (2,267,424)."""
    from rwkvtools.inspect import describe, format_description
    from rwkvtools.io import read_checkpoint
    rec, out = tmp_path / "r.safetensors", tmp_path / "x.safetensors"
    src = fixture_path("tiny-rwkv-7v0-834K.pth")
    assert CliRunner().invoke(main, ["recursive", src, str(rec), "--blocks", "4", "--share", "att",
                                     "--lora-rank", "8", "--no-validate"]).exit_code == 0
    assert CliRunner().invoke(main, ["lowrank", str(rec), str(out), "--rank", "0.5", "--no-validate"]).exit_code == 0
    info = describe(read_checkpoint(str(out)))
    assert info["stale_summaries"] == {"recursive": "lowrank"}
    text = format_description(info)
    assert "recursive   (as written, before lowrank)" in text and "lowrank     24 ffn" in text
    assert "stale_summaries" not in describe(read_checkpoint(str(rec)))

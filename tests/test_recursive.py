"""recursive transform: full-rank relaxation and K = L 'lower' reproduce the model, cycle and
sequence mappings, block initialisation, unique parameter counts against a hand formula, every
version collapses / loads (.safetensors and .pth) / merges / exports to ONNX, the shared weights
exist once in memory, tied small tensors, whitened LoRA beats plain SVD on the calibration
inputs, fp16 rescale leaves shared weights alone, hostile files, CLI."""
import json
import pathlib
import re

import pytest
import torch
from click.testing import CliRunner

from conftest import DATA, VERSIONS, fixture_path, max_rel
from rwkvtools.checkpoint import Checkpoint
from rwkvtools.errors import RwkvToolsError
from rwkvtools.model import build_model
from rwkvtools.model.shared import SharedLoRALinear
from rwkvtools.random_init import random_checkpoint
from rwkvtools.spec import SHARED_MAP, detect
from rwkvtools.transforms.recursive import (RecursiveConfig, RecursiveError, apply, init_sources, layer_mapping,
                                            merge, plan, recursive)


pytestmark = pytest.mark.usefixtures("one_thread")


def _ck(version, n_layer=4, seed=3):
    return random_checkpoint(version, n_layer=n_layer, n_embd=32, head_size=16, vocab=61, seed=seed)


def _toks(n, vocab=61, seed=0):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def _logits(ckpt, toks, dtype=torch.float32):
    with torch.no_grad():
        return build_model(ckpt, dtype=dtype)(toks.reshape(1, -1))[0][0].float()


# -------------------------------------------------------------------------------- mapping
def test_cycle_and_sequence_mappings():
    assert layer_mapping(12, 4, "cycle") == [0, 1, 2, 3] * 3
    assert layer_mapping(12, 4, "sequence") == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert layer_mapping(6, 6, "sequence") == list(range(6))
    assert layer_mapping(12, 5, "cycle", keep_first=1, keep_last=1) == [-1, 0, 1, 2, 3, 4, 0, 1, 2, 3, 4, -1]
    assert layer_mapping(12, 2, "sequence", keep_first=2) == [-1, -1] + [0] * 5 + [1] * 5


def test_mapping_that_does_not_fit_says_what_would():
    with pytest.raises(RecursiveError) as e:
        layer_mapping(12, 5)
    msg = str(e.value)
    assert "12 layers" in msg and "5 blocks" in msg
    assert "--blocks 1 or 2 or 3 or 4 or 6 or 12" in msg
    assert "--keep-first 0 --keep-last 2" in msg  # 10 shared layers fit 5 blocks
    with pytest.raises(RecursiveError, match="no layer"):
        layer_mapping(4, 1, keep_first=2, keep_last=2)


def test_init_sources():
    m = layer_mapping(12, 6, "cycle")
    assert init_sources(m, 6, "lower") == {b: [b] for b in range(6)}
    assert init_sources(m, 6, "stepwise") == {0: [0], 1: [2], 2: [4], 3: [7], 4: [9], 5: [11]}  # evenly, ends kept
    assert init_sources(m, 6, "average") == {b: [b, b + 6] for b in range(6)}
    m = layer_mapping(12, 3, "sequence", keep_first=3)
    assert init_sources(m, 3, "stepwise") == {0: [3], 1: [7], 2: [11]}
    assert init_sources(m, 3, "lower") == {0: [3], 1: [4], 2: [5]}


def test_block_values_follow_the_init():
    ck = _ck("5.2", n_layer=4)
    t = ck.tensors
    avg = recursive(ck, RecursiveConfig(blocks=2, init="average")).tensors
    w = (t["blocks.0.att.key.weight"].double() + t["blocks.2.att.key.weight"].double()) / 2
    assert torch.allclose(avg["shared.0.att.key.weight"].double(), w, atol=1e-7)
    step = recursive(ck, RecursiveConfig(blocks=2, init="stepwise")).tensors  # blocks from layers 0 and 3
    assert torch.equal(step["shared.1.ffn.value.weight"], t["blocks.3.ffn.value.weight"])
    assert torch.equal(step["shared.0.ffn.value.weight"], t["blocks.0.ffn.value.weight"])


# ------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("version", VERSIONS)
def test_full_rank_relaxation_reproduces_the_model(version):
    ck = _ck(version)
    toks = _toks(70)
    ref = _logits(ck, toks)
    for cfg in (RecursiveConfig(blocks=2, lora_rank="full"),
                RecursiveConfig(blocks=1, order="sequence", init="average", lora_rank="full")):
        out = recursive(ck, cfg)
        assert SHARED_MAP in out.tensors and "blocks.1.att.key.weight" not in out.tensors
        assert (_logits(out, toks) - ref).abs().max() <= 1e-5


def test_full_rank_whitened_relaxation_reproduces_the_model():
    ck = _ck("7")
    toks = _toks(70)
    out = recursive(ck, RecursiveConfig(blocks=2, lora_rank="full", lora_method="whiten"), _toks(300, seed=5))
    assert (_logits(out, toks) - _logits(ck, toks)).abs().max() <= 1e-5


@pytest.mark.parametrize("order", ["cycle", "sequence"])
def test_k_equals_l_lower_rank0_is_the_model(order):
    ck = _ck("6")
    out = recursive(ck, RecursiveConfig(blocks=4, init="lower", order=order, lora_rank=0))
    assert not any(k.endswith(".lora_a") for k in out.tensors)
    toks = _toks(50)
    assert torch.equal(_logits(out, toks), _logits(ck, toks))


def test_rank0_is_a_pure_recursive_model():
    ck = _ck("5.2")
    out = recursive(ck, RecursiveConfig(blocks=2, lora_rank=0))
    m = build_model(out)
    lin0, lin2 = m.blocks[0].att.key, m.blocks[2].att.key
    assert isinstance(lin0, SharedLoRALinear) and lin0.rank == 0
    x = torch.randn(3, 32)
    assert torch.equal(lin0(x), lin2(x))  # layers 0 and 2 run the very same matrix
    assert not torch.equal(_logits(out, _toks(40)), _logits(ck, _toks(40)))


# --------------------------------------------------------------------------- parameters
def test_unique_parameters_match_the_formula():
    C, F, L, K, r, V = 32, 96, 6, 3, 5, 61
    ck = random_checkpoint("5.2", n_layer=L, n_embd=C, head_size=16, vocab=V, ffn_dim=F, seed=1)
    out = recursive(ck, RecursiveConfig(blocks=K, lora_rank=r, keep_first=0))
    matrices = 5 * C * C + 2 * F * C + C * C          # att r, k, v, g, o; ffn key, value, receptance
    lora = r * (5 * 2 * C + 2 * (F + C) + 2 * C)       # r (out + in) for each of the 8 matrices
    expected = ck.num_params() - L * matrices + K * matrices + L * lora
    stored = sum(v.numel() for k, v in out.tensors.items() if k != SHARED_MAP)
    assert stored == expected == out.manifest["recursive"]["unique_params"]
    assert out.manifest["recursive"]["params_original"] == ck.num_params()
    # keep-first/last: the kept layers keep their matrices and get no LoRA
    out2 = recursive(ck, RecursiveConfig(blocks=2, lora_rank=r, keep_first=1, keep_last=1))
    exp2 = ck.num_params() - 4 * matrices + 2 * matrices + 4 * lora
    assert out2.manifest["recursive"]["unique_params"] == exp2
    assert "blocks.0.att.key.weight" in out2.tensors and "blocks.0.att.key.lora_a" not in out2.tensors


def test_rank_is_capped_and_dead_directions_are_trainable():
    ck = _ck("5.2")
    out = recursive(ck, RecursiveConfig(blocks=2, init="lower", lora_rank=1000))
    assert out.tensors["blocks.1.ffn.key.lora_a"].shape[0] == 32  # min(out, in) of (F, C)
    # layer 0 is block 0's source: D = 0, so B is zero (nothing changes) and A is unit rows
    b, a = out.tensors["blocks.0.att.key.lora_b"], out.tensors["blocks.0.att.key.lora_a"]
    assert torch.count_nonzero(b) == 0
    assert torch.allclose(a.norm(dim=1), torch.ones(a.shape[0]), atol=1e-5)


# ------------------------------------------------------------------- every version, files
@pytest.mark.parametrize("version", VERSIONS)
def test_every_version_collapses_loads_and_merges(version, tmp_path):
    import rwkvtools
    ck = _ck(version)
    out = recursive(ck, RecursiveConfig(blocks=2, order="sequence", init="average", lora_rank=3))
    toks = _toks(45)
    got = _logits(out, toks)
    for ext in (".safetensors", ".pth"):
        from rwkvtools.io.writers import write_checkpoint
        p = str(tmp_path / f"r{ext}")
        write_checkpoint(out, p)
        m = rwkvtools.load(p)
        with torch.no_grad():
            assert torch.equal(m(toks.reshape(1, -1))[0][0], got)
        # the shared weights exist once in memory: layers of a block hold the same Parameter
        lins = [blk.att.key for blk in m.blocks]
        assert lins[0].shared_weight is lins[1].shared_weight and lins[2].shared_weight is lins[3].shared_weight
        assert lins[0].shared_weight is not lins[2].shared_weight
        ptrs = {p_.data_ptr() for blk in m.blocks for p_ in (blk.att.key.shared_weight, blk.ffn.value.shared_weight)}
        assert len(ptrs) == 4
    plain = merge(out)
    assert set(plain.tensors) == set(ck.tensors)
    assert "recursive" not in plain.manifest and plain.history[-1]["transform"] == "recursive-merge"
    assert detect(plain.tensors) == detect(ck.tensors)
    assert (_logits(plain, toks) - got).abs().max() <= 1e-5


@pytest.mark.parametrize("version", ["6", "7"])
def test_tied_small_tensors_are_stored_once(version, tmp_path):
    ck = _ck(version)
    out = recursive(ck, RecursiveConfig(blocks=2, share="all", lora_rank=2))
    small = "att.time_maa_w1" if version == "6" else "att.w1"
    vec = "att.time_decay" if version == "6" else "att.w0"
    for rest in (small, vec, "ln1.weight", "att.ln_x.bias"):
        assert f"shared.0.{rest}" in out.tensors and f"blocks.2.{rest}" not in out.tensors
    if version == "7":  # layer 0 never has the value-residual mix; layer 2 reads block 0's
        assert "blocks.0.att.v1" not in merge(out).tensors and "blocks.2.att.v1" in merge(out).tensors
    m = build_model(out)
    name = small.split(".")[1]
    attr = {"time_maa_w1": "maa_w1", "w1": "w1"}[name]
    assert getattr(m.blocks[0].att, attr).data_ptr() == getattr(m.blocks[2].att, attr).data_ptr()
    assert torch.equal(getattr(m.blocks[2].att, attr), out.tensors[f"shared.0.{small}"])
    toks = _toks(30)
    assert (_logits(merge(out), toks) - _logits(out, toks)).abs().max() <= 1e-5
    from rwkvtools.io import read_checkpoint
    from rwkvtools.io.writers import write_checkpoint
    write_checkpoint(out, str(tmp_path / "t.pth"))
    assert torch.equal(_logits(read_checkpoint(str(tmp_path / "t.pth")), toks), _logits(out, toks))


@pytest.mark.parametrize("version", VERSIONS)
def test_convert_keeps_a_recursive_checkpoint_recursive(version, tmp_path):
    """convert copies a recursive checkpoint between .safetensors and .pth (and casts it) as stored:
    every shared tensor once, the same tensors, the same logits; tied small tensors included."""
    from rwkvtools.io import read_checkpoint
    from rwkvtools.io.writers import write_checkpoint
    from rwkvtools.transforms.convert import convert
    share = "all" if version in ("6", "7") else "att,ffn"
    out = recursive(_ck(version), RecursiveConfig(blocks=2, lora_rank=3, share=share))
    src = str(tmp_path / "r.safetensors")
    write_checkpoint(out, src)
    toks = _toks(40)
    want = _logits(out, toks)
    for dst in ("c.pth", "c.safetensors"):
        convert(src, str(tmp_path / dst))
        back = read_checkpoint(str(tmp_path / dst))
        assert set(back.tensors) == set(out.tensors)  # nothing expanded, nothing dropped
        assert all(torch.equal(back.tensors[k], out.tensors[k]) for k in out.tensors)
        if dst.endswith(".safetensors"):  # (.pth files hold tensors only: the map is the tensor shared.map)
            assert back.manifest["recursive"]["mapping"] == out.manifest["recursive"]["mapping"]
        assert torch.equal(_logits(back, toks), want)
    convert(src, str(tmp_path / "h.safetensors"), dtype="fp16")
    half = read_checkpoint(str(tmp_path / "h.safetensors"))
    assert set(half.tensors) == set(out.tensors)
    assert half.tensors["shared.0.ffn.key.weight"].dtype == torch.float16
    assert max_rel(_logits(half, toks), want) < 2e-2


def test_convert_and_quantize_refuse_a_recursive_checkpoint_where_they_cannot_keep_it(tmp_path):
    """Formats that hold one matrix per layer, the RNN form and quantize name the way out (merge)
    instead of listing the 'shared.*' tensors as unknown; nothing is written."""
    from rwkvtools.io.writers import write_checkpoint
    from rwkvtools.transforms.convert import convert
    from rwkvtools.transforms.quantize import QuantizeConfig, QuantizeError
    from rwkvtools.transforms.quantize import plan as qplan
    out = recursive(_ck("7"), RecursiveConfig(blocks=2, lora_rank=2))
    src = str(tmp_path / "r.safetensors")
    write_checkpoint(out, src)
    for dst, kw in (("o.bin", {}), ("o-hf", {"format": "hf"}), ("o.gguf", {}), ("o.safetensors", {"to": "rnn"})):
        with pytest.raises(RwkvToolsError) as e:
            convert(src, str(tmp_path / dst), **kw)
        assert "recursive checkpoint" in str(e.value) and "--merge" in str(e.value), str(e.value)
        assert "is not a tensor" not in str(e.value)
        assert not (tmp_path / dst).exists()
    for scheme in ("int8", "Q5_1"):
        with pytest.raises(QuantizeError, match="recursive checkpoint.*--merge"):
            qplan(out, QuantizeConfig(scheme=scheme))


def test_convert_checks_the_shapes_of_shared_block_tensors(tmp_path):
    from rwkvtools.transforms.convert import convert
    out = recursive(_ck("7"), RecursiveConfig(blocks=2, lora_rank=2))
    for bad, msg in (("shared.0.att.key.weight", "has shape"), ("shared.x.att.key.weight", r"named 'shared\.<block>\.<name>'"),
                     ("shared.1.no_such.weight", "not a shared block tensor")):
        t = dict(out.tensors)
        t[bad] = torch.zeros(5, 7)
        p = str(tmp_path / "bad.safetensors")
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in t.items()}, p)
        with pytest.raises(RwkvToolsError, match=msg):
            convert(p, str(tmp_path / "o.safetensors"))
        assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("version", VERSIONS)
def test_every_version_exports_to_onnx(version, tmp_path):
    from rwkvtools.export.onnx import export_onnx
    out = recursive(_ck(version), RecursiveConfig(blocks=2, lora_rank=3))
    mode = "sequence" if version in ("5.2", "7") else "step"
    rep = export_onnx(out, str(tmp_path / "r.onnx"), mode=mode)  # validated in onnxruntime vs the torch model
    assert rep["validation"]["passed"] and "SharedLoRALinear" in rep["linear_kinds"]
    dense = export_onnx(merge(out), str(tmp_path / "m.onnx"), mode=mode)
    assert dense["validation"]["passed"]
    r = recursive(_ck(version), RecursiveConfig(blocks=1, lora_rank=0))
    assert export_onnx(r, str(tmp_path / "r0.onnx"), mode=mode)["bytes"] < dense["bytes"]  # shared stored once


# ------------------------------------------------------------------------------ whitening
def test_whitened_lora_has_lower_output_error_on_the_calibration_inputs():
    from rwkvtools.calibrate import collect_grams
    ck = _ck("5.2", seed=4)
    calib = _toks(400, seed=9)
    cfg = dict(blocks=2, lora_rank=4, init="average")
    sv = recursive(ck, RecursiveConfig(**cfg)).tensors
    wh = recursive(ck, RecursiveConfig(**cfg, lora_method="whiten", damp=0.0), calib).tensors
    grams = collect_grams(build_model(ck), calib, lambda p: p.startswith("blocks.1."))
    wins = 0
    for p, g in grams.items():
        w = ck.tensors[f"{p}.weight"].double()
        rest = p.split(".", 2)[2]
        errs = []
        for t in (sv, wh):
            approx = t[f"shared.1.{rest}.weight"].double() + t[f"{p}.lora_b"].double() @ t[f"{p}.lora_a"].double()
            d = w - approx
            errs.append(float(torch.trace(d @ g.xtx @ d.t())))  # ||X (W - W')^T||^2
        assert errs[1] <= errs[0] * (1 + 1e-6), p
        wins += errs[1] < errs[0] * 0.999
    assert wins >= len(grams) // 2


# ------------------------------------------------------------------------------ numerics
def test_fp16_rescale_leaves_the_shared_weight_alone():
    ck = random_checkpoint("5.2", n_layer=12, n_embd=32, head_size=16, vocab=61, seed=2)
    out = recursive(ck, RecursiveConfig(blocks=1, lora_rank=2))
    m16 = build_model(out, dtype=torch.float16)
    assert torch.equal(m16.blocks[0].att.output.shared_weight.float(), out.tensors["shared.0.att.output.weight"].half().float())
    assert float(m16.blocks[11].att.output.out_scale) == 0.5  # layer 11 is after one rescale (every 6)
    toks = _toks(40)
    assert max_rel(_logits(out, toks, torch.float16), _logits(out, toks)) < 2e-2


# ---------------------------------------------------------------------------- bad inputs
def test_options_and_inputs_are_checked():
    for kw in (dict(blocks=0), dict(blocks=2, order="zigzag"), dict(blocks=2, init="top"),
               dict(blocks=2, lora_rank=-1), dict(blocks=2, lora_rank="half"), dict(blocks=2, share="att,heads"),
               dict(blocks=2, lora_method="pca"), dict(blocks=2, keep_first=-1)):
        with pytest.raises(RecursiveError):
            RecursiveConfig(**kw)
    out = recursive(_ck("5.2"), RecursiveConfig(blocks=2, lora_rank=1))
    with pytest.raises(RecursiveError, match="already recursive"):
        recursive(out, RecursiveConfig(blocks=2))
    with pytest.raises(RecursiveError, match="not a recursive checkpoint"):
        merge(_ck("5.2"))
    with pytest.raises(RecursiveError, match="not a recursive plan"):
        apply(_ck("5.2"), {"transform": "lowrank"})
    p = plan(_ck("5.2"), RecursiveConfig(blocks=2))
    with pytest.raises(RecursiveError, match="plan is for"):
        apply(_ck("5.2", n_layer=6), p)


@pytest.mark.parametrize("form", ["lowrank", "int8", "int4"])
def test_factored_or_quantized_linears_are_refused_not_left_untied(form):
    """A low-rank or int8/int4 checkpoint: its linears are not '<name>.weight' tensors, so recursive
    left them out of the shared set and 'collapsed' only the norms and vectors (lowrank), or
    stopped with an internal parameter-count error (int8). Refused now, naming the way out; sharing
    only groups that are dense still works, with the unique parameters counted the same way."""
    from rwkvtools.transforms.lowrank import LowRankConfig, lowrank
    from rwkvtools.transforms.quantize import QuantizeConfig, quantize
    ck = _ck("7")
    t = (lowrank(ck, LowRankConfig(rank=0.5, method="svd")) if form == "lowrank"
         else quantize(ck, QuantizeConfig(form, group_size=32) if form == "int4" else QuantizeConfig(form)))
    with pytest.raises(RecursiveError, match="not a dense matrix.*apply it before lowrank/quantize"):
        recursive(t, RecursiveConfig(blocks=2))
    out = recursive(t, RecursiveConfig(blocks=2, share=("norm",)))
    assert out.num_params() < t.num_params()
    assert out.manifest["recursive"]["unique_params"] == out.num_params()  # the shared.map index is no parameter


def test_hostile_recursive_files_give_clear_errors():
    out = recursive(_ck("5.2"), RecursiveConfig(blocks=2, lora_rank=2))
    t = dict(out.tensors)
    bad = dict(t)
    bad["blocks.1.att.key.lora_a"] = torch.zeros(2, 7)
    with pytest.raises(RwkvToolsError, match="do not fit the shared matrix"):
        build_model(Checkpoint(bad, out.manifest))
    bad = dict(t)
    del bad["blocks.1.att.key.lora_b"]
    with pytest.raises(RwkvToolsError, match="without"):
        build_model(Checkpoint(bad, out.manifest))
    bad = dict(t)
    bad[SHARED_MAP] = torch.tensor([0.0, 1.0, 0.0, 1.0])
    with pytest.raises(RwkvToolsError, match="integer"):
        build_model(Checkpoint(bad, out.manifest))
    bad = dict(t)
    bad[SHARED_MAP] = torch.tensor([0, 5, 0, 1])  # block 5 stores nothing: layer 1 has no key matrix
    with pytest.raises(RwkvToolsError):
        build_model(Checkpoint(bad, out.manifest))


# ----------------------------------------------------------------------------------- CLI
def test_cli_recursive_fixture_json_inspect_and_merge(tmp_path):
    from rwkvtools.cli import main
    src = fixture_path("tiny-rwkv-5v2-730K-FP32.bin")
    dst = str(tmp_path / "r.safetensors")
    r = CliRunner().invoke(main, ["recursive", src, dst, "--blocks", "6", "--lora-rank", "8", "--eval-tokens", "600",
                                  "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    assert rep["mapping"] == [0, 1, 2, 3, 4, 5] * 2 and rep["written"]
    assert rep["unique_params"] < rep["params_original"] and rep["bytes_after"] < rep["bytes_before"]
    v = rep["validation"]
    assert v["ppl_after"] > v["ppl_before"] > 1  # sharing costs quality before healing
    r = CliRunner().invoke(main, ["inspect", dst])
    assert r.exit_code == 0 and "6 shared blocks (cycle)" in r.output and "LoRA rank 8" in r.output
    info = json.loads(CliRunner().invoke(main, ["inspect", dst, "--json"]).output)
    assert info["recursive"]["blocks"] == 6 and info["recursive"]["ranks"]["att.key"] == 8
    plain = str(tmp_path / "plain.safetensors")
    r = CliRunner().invoke(main, ["recursive", dst, plain, "--merge", "--eval-tokens", "300", "--json"])
    assert r.exit_code == 0, r.output
    v = json.loads(r.output)["validation"]
    assert abs(v["ppl_after"] / v["ppl_before"] - 1) < 1e-5 and v["logits_drift"]["max_abs"] < 1e-4
    r = CliRunner().invoke(main, ["recursive", dst, plain, "--force", "--blocks", "2"])
    assert r.exit_code == 2 and "already recursive" in r.output
    # expanding takes none of the options that configure a collapse: refused, not ignored
    for extra, named in ((["--lora-rank", "8", "--order", "sequence"], "--order, --lora-rank"),
                         (["--calib", str(DATA / "wikitext-2-valid.txt"), "--lora-method", "whiten"],
                          "--lora-method, --calib")):
        r = CliRunner().invoke(main, ["recursive", dst, str(tmp_path / "x.safetensors"), "--merge", "--no-validate",
                                      *extra])
        assert r.exit_code == 2 and named in r.output and "without --blocks" in r.output, r.output
        assert not (tmp_path / "x.safetensors").exists()
    # a forgotten --blocks (no --merge) is named as such, not as an option to drop
    r = CliRunner().invoke(main, ["recursive", src, str(tmp_path / "x.safetensors"), "--lora-rank", "8"])
    assert r.exit_code == 2 and "--blocks K is required" in r.output, r.output
    dst2 = str(tmp_path / "m.pth")
    r = CliRunner().invoke(main, ["recursive", src, dst2, "--blocks", "4", "--merge", "--no-validate",
                                  "--order", "sequence", "--init", "average"])
    assert r.exit_code == 0, r.output
    import rwkvtools
    from rwkvtools.io import read_checkpoint
    assert SHARED_MAP not in read_checkpoint(dst2).tensors
    assert rwkvtools.load(dst2).spec.n_layer == 12


def test_cli_recursive_errors(tmp_path):
    from rwkvtools.cli import main
    src = str(tmp_path / "s.safetensors")
    from rwkvtools.io.writers import write_checkpoint
    write_checkpoint(random_checkpoint("7", n_layer=4, n_embd=32, head_size=16, vocab=256, seed=3), src)
    r = CliRunner().invoke(main, ["recursive", src, str(tmp_path / "o.safetensors"), "--blocks", "3"])
    assert r.exit_code == 2 and "error:" in r.output and "--blocks 1 or 2 or 4" in r.output
    assert not (tmp_path / "o.safetensors").exists()
    r = CliRunner().invoke(main, ["recursive", src, src, "--blocks", "2", "--force"])
    assert r.exit_code == 2 and "input file" in r.output
    r = CliRunner().invoke(main, ["recursive", src, str(tmp_path / "o.bin"), "--blocks", "2"])
    assert r.exit_code == 2 and "--merge" in r.output
    r = CliRunner().invoke(main, ["recursive", fixture_path("tiny-rwkv-5v2-730K-FP32.bin"), str(tmp_path / "o.safetensors"),
                                  "--blocks", "2", "--max-ppl-increase", "1", "--eval-tokens", "200",
                                  "--report", str(tmp_path / "rep.json")])
    assert r.exit_code == 1 and "FAIL" in r.output and not (tmp_path / "o.safetensors").exists()  # not written
    assert json.loads((tmp_path / "rep.json").read_text())["validation"]["passed"] is False
    for cmd in ("recursive", "heal"):
        h = CliRunner().invoke(main, [cmd, "--help"])
        assert h.exit_code == 0 and "Example" in h.output



def test_shared_lora_dense_weight_is_what_the_layer_computes():
    """SharedLoRALinear.dense_weight() (W_block + lora_b @ lora_a, used to densify a linear) is the
    matrix the layer applies: its forward on the identity."""
    model = build_model(recursive(_ck("7"), RecursiveConfig(blocks=2, lora_rank=3)))
    mods = [m for m in model.modules() if isinstance(m, SharedLoRALinear) and m.rank > 0]
    assert mods
    for m in mods:
        n_in = m.shared_weight.shape[1]
        with torch.no_grad():
            assert torch.allclose(m.dense_weight(), m(torch.eye(n_in)).t(), atol=1e-6)


@pytest.mark.parametrize("extra,match", [
    (["--calib-tokens", "300"], "--calib-tokens applies to --lora-method whiten"),
    (["--lora-rank", "2", "--calib-tokens", "300"], "--calib-tokens applies to --lora-method whiten"),
    (["--lora-method", "whiten"], "--lora-method chooses how the LoRA relaxation starts"),
])
def test_cli_options_nothing_uses_are_refused(tmp_path, extra, match):
    """Calibration options without a whitened LoRA, or --lora-method without LoRA, were accepted and
    ignored (the same file as without them)."""
    from rwkvtools.cli import main
    dst = tmp_path / "o.safetensors"
    r = CliRunner().invoke(main, ["recursive", fixture_path("tiny-rwkv-5v2-730K-FP32.bin"), str(dst), "--blocks", "2",
                                  *extra, "--no-validate"])
    assert r.exit_code == 2 and f"error: {match}" in r.output, r.output
    assert not dst.exists()


def test_inspect_counts_unique_parameters_not_the_layer_map(tmp_path):
    """inspect counted the int64 layer -> block map as parameters (928,524 against the recursive
    summary's 928,512 unique parameters for the README's rec6 example)."""
    from rwkvtools.cli import main
    from rwkvtools.io.writers import write_checkpoint
    src, dst = tmp_path / "m.safetensors", tmp_path / "r.safetensors"
    write_checkpoint(_ck("7", n_layer=4), str(src))
    r = CliRunner().invoke(main, ["recursive", str(src), str(dst), "--blocks", "2", "--lora-rank", "2",
                                  "--no-validate", "--json"])
    assert r.exit_code == 0, r.output
    unique = json.loads(r.stdout)["unique_params"]
    r = CliRunner().invoke(main, ["inspect", str(dst), "--json"])
    info = json.loads(r.stdout)
    assert info["parameters"]["total"] == unique


def test_every_share_group_and_alias_is_documented():
    """Each group and alias --share accepts is named in its --help and in the README."""
    from rwkvtools.cli import main
    from rwkvtools.transforms.recursive import GROUP_SETS, GROUPS
    helptext = " ".join(CliRunner().invoke(main, ["recursive", "--help"]).output.split())
    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    para = " ".join(readme[readme.index("**What is shared**"):].split("\n- **")[0].split())
    for name in (*GROUPS, *GROUP_SETS):
        assert f"{name} (" in helptext or f"{name} =" in helptext or f"; {name}." in helptext, name
        assert re.search(rf"`{name}[`,]|,{name}`", para), name

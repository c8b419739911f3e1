"""heal: distillation lowers the held-out KL to the teacher and the perplexity of a collapsed v5.2
fixture within seconds; only the requested parameters change (lora, lowrank, shared, all), every
float tensor of every version is trainable with 'all', tied tensors stay tied, the run is
deterministic for a seed, the manifest records it, CLI and errors."""
import json
import math
import os

import pytest
import torch
from click.testing import CliRunner

from conftest import VERSIONS, fixture_path
from rwkvtools.errors import RwkvToolsError
from rwkvtools.model import build_model
from rwkvtools.random_init import random_checkpoint
from rwkvtools.transforms.heal import HealConfig, HealError, evaluate_pair, heal
from rwkvtools.transforms.recursive import RecursiveConfig, merge, recursive


pytestmark = pytest.mark.usefixtures("one_thread")


def _ck(version="7", n_layer=4, seed=3, vocab=61):
    return random_checkpoint(version, n_layer=n_layer, n_embd=32, head_size=16, vocab=vocab, seed=seed)


def _toks(n, vocab=61, seed=0):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _changed(a, b):
    return {k for k in a.tensors if not torch.equal(a.tensors[k], b.tensors[k])}


def test_heal_lowers_kl_and_perplexity_of_a_collapsed_v52_fixture():
    from rwkvtools.io import read_checkpoint
    from rwkvtools.validate import text_tokens
    teacher = read_checkpoint(fixture_path("tiny-rwkv-5v2-730K-FP32.bin"))
    student = recursive(teacher, RecursiveConfig(blocks=6, lora_rank=4))
    train = text_tokens(None, 256, "calib", max_tokens=20000)
    ev = text_tokens(None, 256, "heldout", max_tokens=600)
    out, rep = heal(student, teacher, train, HealConfig(tokens=2048, seq_len=64, batch_size=4, lr=3e-3), eval_tokens=ev)
    assert rep["steps"] == 8 and rep["tokens_trained"] == 2048
    assert rep["kl_after"] < 0.9 * rep["kl_before"]
    assert rep["ppl_after"] < rep["ppl_before"] and rep["ppl_teacher"] < rep["ppl_after"]
    assert 0 < rep["recovered"] < 1
    # the numbers are the models': re-measure independently
    again = evaluate_pair(build_model(out), build_model(teacher), ev)
    assert math.isclose(again["ppl_student"], rep["ppl_after"], rel_tol=1e-5)
    assert math.isclose(again["kl"], rep["kl_after"], rel_tol=1e-4)
    # only the LoRA factors changed (default --train auto), every one of them
    changed = _changed(student, out)
    loras = {k for k in student.tensors if k.endswith((".lora_a", ".lora_b"))}
    assert changed and changed <= loras and len(changed) >= 0.9 * len(loras)
    entry = out.history[-1]
    assert entry["transform"] == "heal" and entry["results"]["ppl_after"] == rep["ppl_after"]
    assert entry["options"]["train"] == "auto" and out.manifest["recursive"] == student.manifest["recursive"]


def test_heal_is_deterministic_for_a_seed():
    t = _ck("7")
    s = recursive(t, RecursiveConfig(blocks=2, lora_rank=2))
    cfg = HealConfig(tokens=256, seq_len=32, batch_size=2, seed=5)
    a, _ = heal(s, t, _toks(500), cfg)
    b, _ = heal(s, t, _toks(500), cfg)
    c, _ = heal(s, t, _toks(500), HealConfig(tokens=256, seq_len=32, batch_size=2, seed=6))
    assert not _changed(a, b)
    assert _changed(a, c)


@pytest.mark.parametrize("version", VERSIONS)
def test_train_all_reaches_every_float_tensor(version):
    t = _ck(version)
    out, rep = heal(t, t, _toks(300), HealConfig(tokens=64, seq_len=32, batch_size=2, train="all", lm_weight=1.0))
    floats = {k for k in t.tensors if t.tensors[k].is_floating_point()}
    assert rep["trained_tensors"] == len(floats)
    assert _changed(t, out) == floats  # the LM loss moves every tensor (the KL to itself is 0)


def test_only_requested_groups_change():
    from rwkvtools.transforms.lowrank import LowRankConfig, lowrank
    t = _ck("6")
    lr = lowrank(t, LowRankConfig(rank=0.5, method="svd"))
    out, _ = heal(lr, t, _toks(300), HealConfig(tokens=64, seq_len=32, batch_size=2, train="lowrank"))
    ch = _changed(lr, out)
    assert ch and all(k.endswith((".weight_u", ".weight_v")) for k in ch)
    rec = recursive(t, RecursiveConfig(blocks=2, lora_rank=2))
    out, _ = heal(rec, t, _toks(300), HealConfig(tokens=64, seq_len=32, batch_size=2, train="shared"))
    ch = _changed(rec, out)
    assert ch and all(k.startswith("shared.") and k.endswith(".weight") for k in ch)
    with pytest.raises(HealError, match="nothing to train"):
        heal(t, t, _toks(300), HealConfig(tokens=64, seq_len=32, batch_size=2))  # a plain model: auto finds nothing


def test_tied_tensors_train_as_one():
    t = _ck("7")
    rec = recursive(t, RecursiveConfig(blocks=2, lora_rank=2, share="all"))
    out, _ = heal(rec, t, _toks(300), HealConfig(tokens=64, seq_len=32, batch_size=2, train="all", lm_weight=1.0))
    assert "shared.0.att.w1" in _changed(rec, out) and "blocks.2.att.w1" not in out.tensors
    toks = torch.tensor(_toks(40)).reshape(1, -1)
    with torch.no_grad():  # the healed recursive model and its merge agree: still one tensor per block
        a = build_model(out)(toks)[0]
        b = build_model(merge(out))(toks)[0]
    assert (a - b).abs().max() <= 1e-5


def test_heal_checks_its_inputs():
    t = _ck("7")
    s = recursive(t, RecursiveConfig(blocks=2, lora_rank=2))
    with pytest.raises(HealError, match="vocabulary"):
        heal(s, _ck("7", vocab=70), _toks(300), HealConfig(tokens=64, seq_len=32))
    with pytest.raises(HealError, match="seq-len"):
        heal(s, t, _toks(20), HealConfig(tokens=64, seq_len=32))
    with pytest.raises(HealError, match=r"\[0, 61\)"):
        heal(s, t, [0, 99] * 40, HealConfig(tokens=64, seq_len=32))
    for kw in (dict(tokens=0), dict(lr=-1.0), dict(train="everything"), dict(warmup=2.0), dict(seq_len=1)):
        with pytest.raises(HealError):
            HealConfig(**kw)
    with pytest.raises(RwkvToolsError, match="device"):
        heal(s, t, _toks(300), HealConfig(tokens=64, seq_len=32, device="tpu:0"))


def test_cli_heal(tmp_path):
    from rwkvtools.cli import main
    from rwkvtools.io import read_checkpoint
    from rwkvtools.io.writers import write_checkpoint
    t = random_checkpoint("5.2", n_layer=4, n_embd=32, head_size=16, vocab=256, seed=1)
    tp, sp, dp = str(tmp_path / "t.safetensors"), str(tmp_path / "s.safetensors"), str(tmp_path / "h.safetensors")
    write_checkpoint(t, tp)
    r = CliRunner().invoke(main, ["recursive", tp, sp, "--blocks", "2", "--lora-rank", "2", "--no-validate"])
    assert r.exit_code == 0, r.output
    args = ["heal", sp, dp, "--teacher", tp, "--tokens", "128", "--seq-len", "32", "--batch-size", "2",
            "--eval-tokens", "300", "--device", "cpu"]
    r = CliRunner().invoke(main, args + ["--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    assert rep["written"] and rep["steps"] == 2 and rep["validation"]["logits_drift"]["tokens"] > 0
    assert rep["validation"]["kl_after"] < rep["validation"]["kl_before"]
    # the validation record has what every transform's has (README: "validation": {"backend": ...})
    v = rep["validation"]
    assert v["backend"] == "chunked" and v["params_before"] == v["params_after"] == read_checkpoint(sp).num_params()
    assert v["bytes_before"] == v["bytes_after"] > 0
    healed = read_checkpoint(dp)
    assert healed.history[-1]["transform"] == "heal" and healed.history[-2]["transform"] == "recursive"
    r = CliRunner().invoke(main, args)  # exists
    assert r.exit_code == 2 and "--force" in r.output
    r = CliRunner().invoke(main, args + ["--force", "--train", "lowrank"])
    assert r.exit_code == 2 and "nothing to train" in r.output
    r = CliRunner().invoke(main, ["heal", sp, tp, "--teacher", tp, "--force"])
    assert r.exit_code == 2 and "error:" in r.output
    r = CliRunner().invoke(main, args + ["--force", "--max-ppl-increase", "-99"])  # gate vs the teacher
    assert r.exit_code == 1 and "FAIL" in r.output
    assert "max |logit drift| from the teacher" in r.output   # not SRC's: the line shows SRC before -> after
    assert "above the teacher's" in CliRunner().invoke(main, ["heal", "--help"]).output.replace("\n", " ")


def test_batch_larger_than_the_texts_windows_is_refused():
    # 100 tokens give 3 windows of 32: a batch of 4 would repeat windows (--batch-size 10**12 built
    # shuffled orders of the 3 windows until memory ran out); 3 trains
    t = _ck("7")
    with pytest.raises(HealError, match="--batch-size 4 is more than the 3 windows of --seq-len 32"):
        heal(t, t, _toks(100), HealConfig(tokens=64, seq_len=32, batch_size=4, train="all"))
    out, _ = heal(t, t, _toks(100), HealConfig(tokens=64, seq_len=32, batch_size=3, train="all"))
    assert out.tensors.keys() == t.tensors.keys()


@pytest.mark.parametrize("opt,value,match", [
    ("--lr", "1e308", "lr must be at most 3.4e+38"),
    ("--temperature", "1e308", "temperature must be at most 1.84e+19"),
])
def test_cli_lr_or_temperature_beyond_float32_is_refused(tmp_path, opt, value, match):
    """--lr 1e308 was an internal error mid-training (RuntimeError 'value cannot be converted to
    type float without overflow'), --temperature 1e308 too (OverflowError in temperature**2)."""
    from rwkvtools.cli import main
    from rwkvtools.io.writers import write_checkpoint
    tp, dp = str(tmp_path / "t.safetensors"), tmp_path / "h.safetensors"
    write_checkpoint(_ck("7"), tp)
    r = CliRunner().invoke(main, ["heal", tp, str(dp), "--teacher", tp, "--train", "all", "--tokens", "64",
                                  "--seq-len", "16", "--batch-size", "2", "--no-validate", opt, value])
    assert r.exit_code == 2, r.output
    assert f"error: {match}" in r.output and "internal error" not in r.output
    assert not dp.exists()
    HealConfig(lr=3.4e38, temperature=1.8e19)  # the largest float32 values are still accepted


@pytest.mark.parametrize("dst,match", [("h.bin", "rwkv.cpp needs dense matrices"),
                                       ("hf", "Hugging Face layouts need dense matrices"),
                                       ("h.gguf", "llama.cpp runs RWKV-6 and RWKV-7 only")])
def test_cli_output_the_healed_model_cannot_go_to_is_refused_before_training(tmp_path, monkeypatch, dst, match):
    """A low-rank v5.2 student healed into rwkv.cpp / HF (dense only) or GGUF (v6/v7 only) trained
    for the whole budget and only then was refused by the writer."""
    from rwkvtools.cli import main
    from rwkvtools.io.writers import write_checkpoint
    from rwkvtools.transforms import heal as heal_module
    from rwkvtools.transforms.lowrank import LowRankConfig, lowrank
    t = random_checkpoint("5.2", n_layer=2, n_embd=32, head_size=16, vocab=256, seed=1)
    tp, sp = str(tmp_path / "t.safetensors"), str(tmp_path / "s.safetensors")
    write_checkpoint(t, tp)
    write_checkpoint(lowrank(t, LowRankConfig(rank=0.5, method="svd")), sp)
    monkeypatch.setattr(heal_module, "heal", lambda *a, **k: pytest.fail("trained before refusing the output"))
    r = CliRunner().invoke(main, ["heal", sp, str(tmp_path / dst), "--teacher", tp, "--tokens", "64",
                                  "--seq-len", "16", "--no-validate"])
    assert r.exit_code == 2 and "error:" in r.output and match in r.output, r.output
    assert sorted(os.listdir(tmp_path)) == ["s.safetensors", "t.safetensors"]


@pytest.mark.parametrize("form", ["rnn", "int8"])
def test_students_heal_cannot_give_back_bit_for_bit_are_refused(form):
    """An RNN-form student was healed and written in the parallel form (every tensor changed
    shape or value, the promise 'every other tensor is SRC's, bit for bit' broken); an int8/int4
    student got two errors pointing at each other ('--train all' / 'choose other groups')."""
    from rwkvtools.transforms.lowrank import LowRankConfig, lowrank
    from rwkvtools.transforms.quantize import QuantizeConfig, quantize
    from rwkvtools.transforms.rnn_form import to_rnn
    teacher = _ck()
    student = lowrank(teacher, LowRankConfig(rank=0.5, method="svd"))
    student = to_rnn(student, 0) if form == "rnn" else quantize(teacher, QuantizeConfig("int8"))
    cfg = HealConfig(tokens=32, seq_len=16, batch_size=1, train=("all",) if form == "int8" else ("auto",))
    with pytest.raises(HealError, match="RNN form; heal trains the parallel" if form == "rnn" else "int8/int4"):
        heal(student, teacher, _toks(64), cfg)


def test_held_out_kl_is_the_plain_kl_whatever_the_training_temperature():
    """With --temperature 2 the reported 'held-out KL to the teacher' was T^2 x KL at T (0.2524
    against a plain KL of 0.1975): a figure of the training setting, not of the model."""
    teacher = _ck()
    student = recursive(teacher, RecursiveConfig(blocks=2, lora_rank=2))
    ev = _toks(64, seed=5)
    plain = evaluate_pair(build_model(student), build_model(teacher), ev)["kl"]
    _, rep = heal(student, teacher, _toks(32), HealConfig(tokens=16, seq_len=16, batch_size=1, temperature=2.0),
                  eval_tokens=ev)
    assert rep["kl_before"] == pytest.approx(plain, rel=1e-6)

"""CLI: every subcommand's --help, inspect / eval / init end to end, and bad input: a clear
message, exit code 2, no traceback, no partial output."""
import json
import pickle

import pytest
import torch
from click.testing import CliRunner

from rwkvtools.cli import main
from conftest import DATA, fixture_path

runner = CliRunner()


def run(*args):
    return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_every_command_has_help():
    res = run("--help")
    assert res.exit_code == 0
    commands = [line.split()[0] for line in res.output.split("Commands:")[1].strip().splitlines() if line.strip()]
    assert {"inspect", "eval", "init"} <= set(commands)
    for c in commands:
        sub = run(c, "--help")
        assert sub.exit_code == 0, c
        assert "Example" in sub.output, f"{c} --help has no example"


@pytest.mark.parametrize("version", ["4", "5.0", "5.2", "6", "7"])
def test_init_inspect_eval_roundtrip(tmp_path, version):
    out = tmp_path / f"m{version}.safetensors"
    res = run("init", out, "--version", version, "--layers", 2, "--dim", 32, "--vocab", 256, "--head-size", 8)
    assert res.exit_code == 0, res.output
    info = json.loads(run("inspect", out, "--json").output)
    assert info["version"] == version
    assert info["hyperparameters"]["n_layer"] == 2 and info["hyperparameters"]["n_embd"] == 32
    assert info["history"][0]["transform"] == "init"
    txt = tmp_path / "t.txt"
    txt.write_text("hello world " * 50)
    ev = run("eval", out, "--text", txt, "--json", "--max-tokens", 300)
    assert ev.exit_code == 0, ev.output
    r = json.loads(ev.output)
    assert set(r) >= {"ppl", "nll_per_token", "tokens", "tokens_per_s", "backend"}
    assert r["tokens"] == 300 and r["predictions"] == 299


def test_init_refuses_existing_file(tmp_path):
    out = tmp_path / "m.pth"
    out.write_bytes(b"keep me")
    res = run("init", out, "--version", "7", "--layers", 1, "--dim", 32, "--vocab", 16, "--head-size", 8)
    assert res.exit_code == 2 and "exists" in res.output
    assert out.read_bytes() == b"keep me"


@pytest.mark.parametrize("opt,value,words", [
    ("--head-size", "0", "--head-size must be positive"),      # was ZeroDivisionError
    ("--head-size", "-1", "--head-size must be positive"),     # was a negative-dimension RuntimeError
    ("--ffn-dim", "0", "--ffn-dim must be positive"),          # was ZeroDivisionError
    ("--ffn-dim", "-1", "--ffn-dim must be positive"),         # was 'math domain error'
    ("--dim", str(2**31), "more than this machine's memory"),  # was the allocator's RuntimeError
    ("--vocab", str(10**12), "more than this machine's memory"),
    ("--layers", str(10**12), "more than this machine's memory"),  # ran layer by layer until memory ran out
])
def test_init_bad_sizes_are_clear_errors(tmp_path, opt, value, words):
    """Each was an internal error (or, for --layers, an endless run) instead of a clear message."""
    args = {"--layers": "1", "--dim": "32", "--vocab": "16", "--head-size": "8"}
    args[opt] = value
    out = tmp_path / "m.safetensors"
    res = run("init", out, "--version", "7", *[x for kv in args.items() for x in kv])
    assert res.exit_code == 2 and "error:" in res.output and words in res.output, res.output
    assert "internal error" not in res.output and not out.exists(), res.output


@pytest.mark.parametrize("seed", [str(-2**63 - 1), str(2**64)])
@pytest.mark.parametrize("command", ["init", "recursive", "heal"])
def test_seed_outside_torchs_range_is_refused_while_parsing(tmp_path, command, seed):
    """Was an internal error ('Overflow when unpacking long long' from torch.manual_seed)."""
    out = tmp_path / "out.safetensors"
    src = fixture_path("tiny-rwkv-5v2-730K-FP32.bin")
    args = {"init": ["init", out, "--version", "7", "--layers", 1, "--dim", 32, "--vocab", 16, "--head-size", 8],
            "recursive": ["recursive", src, out, "--blocks", 6, "--lora-rank", 2, "--no-validate"],
            "heal": ["heal", tmp_path / "absent.safetensors", out, "--teacher", src]}[command]
    res = run(*args, "--seed", seed)
    assert res.exit_code == 2 and "a seed must lie between -2**63 and 2**64 - 1" in res.output, res.output
    assert "internal error" not in res.output and not out.exists(), res.output


def test_init_pth_loads_as_blinkdl(tmp_path):
    out = tmp_path / "m.pth"
    assert run("init", out, "--version", "7", "--layers", 2, "--dim", 32, "--vocab", 50, "--head-size", 8).exit_code == 0
    sd = torch.load(out, weights_only=True)
    assert sd["blocks.0.att.r_k"].shape == (4, 8) and sd["emb.weight"].shape == (50, 32)
    # the zip's inner folder is named after the file, as torch.save names it (not a temporary name)
    import zipfile
    with zipfile.ZipFile(out) as z:
        assert {n.split("/")[0] for n in z.namelist()} == {"m"}, z.namelist()[:3]


def test_eval_fixture_text_output(shared):
    res = run("eval", fixture_path("tiny-rwkv-7v0-834K.pth"), "--text", DATA / "wikitext-2-test.txt", "--max-tokens", 2048)
    assert res.exit_code == 0
    assert "ppl" in res.output and "backend" in res.output


def test_inspect_fixture_text_output(shared):
    res = run("inspect", fixture_path("tiny-rwkv-5v2-730K-Q5_1.bin"))
    assert res.exit_code == 0
    assert "RWKV v5.2" in res.output and "Q5_1" in res.output


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def _bad_inputs(tmp_path):
    trunc = tmp_path / "trunc.bin"
    trunc.write_bytes(open(fixture_path("tiny-rwkv-7v0-834K-FP32.bin"), "rb").read()[:5000])
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"emb.weight": _Evil()}))
    notckpt = tmp_path / "notes.txt"
    notckpt.write_text("just some text")
    nokeys = tmp_path / "nokeys.pth"
    torch.save({"foo": torch.zeros(3)}, nokeys)
    return {"missing": tmp_path / "missing.pth", "truncated": trunc, "evil pickle": evil,
            "not a checkpoint": notckpt, "unknown layout": nokeys}


@pytest.mark.parametrize("case", ["missing", "truncated", "evil pickle", "not a checkpoint", "unknown layout"])
@pytest.mark.parametrize("command", ["inspect", "eval"])
def test_bad_input_is_a_clear_error(tmp_path, capsys, case, command):
    path = _bad_inputs(tmp_path)[case]
    txt = tmp_path / "t.txt"
    txt.write_text("abc" * 10)
    args = [command, path] + (["--text", txt] if command == "eval" else [])
    res = run(*args)
    assert res.exit_code == 2, res.output
    assert "error:" in res.output
    assert "Traceback" not in res.output
    assert "pwned" not in res.output and "pwned" not in capsys.readouterr().out


def test_eval_bad_options(tmp_path):
    out = tmp_path / "m.safetensors"
    run("init", out, "--version", "7", "--layers", 1, "--dim", 32, "--vocab", 300, "--head-size", 8)
    txt = tmp_path / "t.txt"
    txt.write_text("abc")
    res = run("eval", out, "--text", txt)  # vocab 300: auto cannot pick
    assert res.exit_code == 2 and "--tokenizer" in res.output
    res = run("eval", out, "--text", tmp_path / "nope.txt", "--tokenizer", "bytes")
    assert res.exit_code == 2 and "no such text file" in res.output
    res = run("eval", out, "--text", txt, "--tokenizer", "neox")
    assert res.exit_code == 2 and "20B_tokenizer.json" in res.output
    res = run("eval", out, "--text", txt, "--tokenizer", "bytes", "--device", "tpu")  # was an internal error
    assert res.exit_code == 2 and "expected auto, cpu, cuda or cuda:N" in res.output and "Traceback" not in res.output
    import torch
    res = run("eval", out, "--text", txt, "--tokenizer", "bytes", "--device", "auto", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["device"].startswith("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("command", ["lowrank", "quantize", "convert"])
def test_transform_validation_device(tmp_path, command):
    """Every transform's perplexity check takes --device: auto/cpu run (the report names the backend);
    an unusable device is a clear error before anything is written."""
    src = tmp_path / "m.safetensors"
    assert CliRunner().invoke(main, ["init", str(src), "--version", "7", "--layers", "2", "--dim", "64",
                                     "--vocab", "256", "--head-size", "16"]).exit_code == 0
    extra = {"lowrank": ["--rank", "0.5", "--method", "svd"], "quantize": ["--scheme", "int8"], "convert": []}[command]
    out = tmp_path / "out.safetensors"
    res = CliRunner().invoke(main, [command, str(src), str(out), *extra, "--eval-tokens", "64", "--device", "auto",
                                    "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert rep["validation"]["backend"] == ("cuda" if torch.cuda.is_available() else "chunked")
    bad = ["bogus"] + ([] if torch.cuda.is_available() else ["cuda"])
    for dev in bad:
        dst = tmp_path / f"bad-{dev}.safetensors"
        res = CliRunner().invoke(main, [command, str(src), str(dst), *extra, "--device", dev])
        assert res.exit_code == 2 and "--device" in res.output and "Traceback" not in res.output, res.output
        assert not dst.exists()


@pytest.mark.parametrize("module", ["rwkvtools", "rwkvtools.cli"])
def test_python_dash_m_has_every_command(module):
    """`python -m rwkvtools` and `python -m rwkvtools.cli` offer the same commands as the
    `rwkvtools` entry point (the command modules register on the importable rwkvtools.cli)."""
    import subprocess
    import sys
    expected = set(main.commands)
    r = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    listed = {line.split()[0] for line in r.stdout.split("Commands:")[1].strip().splitlines() if line.strip()}
    assert listed == expected and {"convert", "export-onnx", "recipe"} <= listed


def test_eval_of_a_model_whose_outputs_are_nan_fails(tmp_path):
    """One NaN weight: eval printed 'ppl nan' and exited 0, as if it had measured something."""
    from safetensors.torch import load_file, save_file
    out = tmp_path / "m.safetensors"
    run("init", out, "--version", "7", "--layers", 2, "--dim", 32, "--vocab", 256, "--head-size", 8)
    txt = tmp_path / "t.txt"
    txt.write_text("some text to score " * 20)
    assert run("eval", out, "--text", txt, "--max-tokens", 64).exit_code == 0
    t = load_file(str(out))
    t["blocks.1.ffn.key.weight"][0, 0] = float("nan")
    save_file(t, str(tmp_path / "nan.safetensors"))
    res = runner.invoke(main, ["eval", str(tmp_path / "nan.safetensors"), "--text", str(txt), "--json"])
    assert res.exit_code == 1 and "error: the perplexity is nan" in res.stderr, res.output
    assert json.loads(res.stdout)["ppl"] is None


@pytest.mark.parametrize("name,fmt", [("m.pth", "pth"), ("m.safetensors", "safetensors"), ("m.bin", "rwkvcpp"),
                                      ("m.gguf", "gguf"), ("m", "hf")])
def test_init_writes_every_format_its_help_names(tmp_path, name, fmt):
    from rwkvtools.io import read_checkpoint, sniff
    out = tmp_path / name
    res = run("init", out, "--version", "7", "--layers", 1, "--dim", 32, "--vocab", 256, "--head-size", 8)
    assert res.exit_code == 0 and f"({fmt})" in res.output, res.output
    assert sniff(str(out)) == fmt and read_checkpoint(str(out)).tensors["emb.weight"].shape == (256, 32)


def test_init_unknown_extension_names_the_formats_not_an_option_it_lacks(tmp_path):
    res = run("init", tmp_path / "m.xyz", "--version", "7", "--layers", 1, "--dim", 32, "--vocab", 50)
    assert res.exit_code == 2 and ".gguf" in res.output and "give the format (convert --format)" not in res.output
    assert not (tmp_path / "m.xyz").exists()

"""The output contract of every command that writes (init, convert, lowrank, recursive, quantize,
heal, export-onnx, recipe run), for every output format each offers, on tiny random models:

(a) an input is never overwritten: DST equal to SRC (as given, spelled another way, through a
    symlink), DST inside a Hugging Face SRC folder, a DST folder that holds SRC, a --report on
    an input or on DST are refused (exit 2) and every input stays byte for byte the same;
(b) an existing DST is refused without --force and replaced with it;
(c) a failure at any point (a bad option found late, a failed gate, an exception in the
    transform, an exception or Ctrl-C at the very rename onto DST) leaves no DST, no temporary
    entry, and a pre-existing DST as it was (a failed gate still writes --report, as documented);
(d) user errors print `error:` and exit 2, with no traceback and no "internal error"; gates
    exit 1; an internal error (an unexpected exception) exits 3;
(e) with --json, stdout is exactly one JSON document (progress bars go to stderr);
(f) --help shows examples, and each of them parses.

Each check compares a snapshot of the whole working folder (every file's bytes, every entry,
hidden ones included) before and after, so a stray temporary file fails it as much as a
damaged input."""
import contextlib
import hashlib
import json
import os
import shlex
import shutil

import pytest
from click.testing import CliRunner

from rwkvtools.cli import main
from rwkvtools.io import read_checkpoint
from rwkvtools.io.writers import write_checkpoint
from rwkvtools.random_init import random_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

LR = ["--rank", "0.5", "--method", "svd"]
REC = ["--blocks", "1", "--lora-rank", "2"]
HEAL = ["--tokens", "32", "--seq-len", "16", "--batch-size", "1"]
INT4 = ["--scheme", "int4", "--group-size", "32"]
EXTERNAL = ["--external-data-threshold", "0"]  # the weights in OUT.data beside OUT
INIT = ["--version", "7", "--layers", "1", "--dim", "32", "--vocab", "64", "--head-size", "16"]
VAL = ["--eval-tokens", "64", "--device", "cpu"]
GATE = {"export-onnx": ["--tol", "1e-30"]}  # others: --max-ppl-increase -100 (perplexity must vanish)

# case id -> (command, source, DST name, options); the sources are made by the `models` fixture
CASES = {
    "init-safetensors": ("init", None, "out.safetensors", INIT),
    "init-pth": ("init", None, "out.pth", INIT),
    "convert-pth": ("convert", "src.safetensors", "out.pth", []),
    "convert-safetensors": ("convert", "src.pth", "out.safetensors", []),
    "convert-hf": ("convert", "src.safetensors", "out", []),
    "convert-rwkvcpp": ("convert", "src.safetensors", "out.bin", []),
    "convert-gguf": ("convert", "src.safetensors", "out.gguf", []),
    "lowrank-safetensors": ("lowrank", "src.safetensors", "out.safetensors", LR),
    "lowrank-pth": ("lowrank", "src.safetensors", "out.pth", LR),
    "lowrank-merge-hf": ("lowrank", "src.safetensors", "out", LR + ["--merge"]),
    "lowrank-merge-rwkvcpp": ("lowrank", "src.safetensors", "out.bin", LR + ["--merge"]),
    "lowrank-merge-gguf": ("lowrank", "src.safetensors", "out.gguf", LR + ["--merge"]),
    "recursive-safetensors": ("recursive", "src.safetensors", "out.safetensors", REC),
    "recursive-pth": ("recursive", "src.pth", "out.pth", REC),
    "recursive-merge-hf": ("recursive", "src.safetensors", "out", REC + ["--merge"]),
    "recursive-merge-rwkvcpp": ("recursive", "src.safetensors", "out.bin", REC + ["--merge"]),
    "recursive-merge-gguf": ("recursive", "src.safetensors", "out.gguf", REC + ["--merge"]),
    "quantize-int8-safetensors": ("quantize", "src.safetensors", "out.safetensors", ["--scheme", "int8"]),
    "quantize-int4-pth": ("quantize", "src.safetensors", "out.pth", INT4),
    "quantize-Q8_0-rwkvcpp": ("quantize", "src.safetensors", "out.bin", ["--scheme", "Q8_0"]),
    "quantize-Q8_0-gguf": ("quantize", "src.safetensors", "out.gguf", ["--scheme", "Q8_0"]),
    "heal-safetensors": ("heal", "student.safetensors", "out.safetensors", HEAL),
    "heal-pth": ("heal", "student.safetensors", "out.pth", HEAL),
    "export-onnx": ("export-onnx", "src.safetensors", "out.onnx", []),
    "export-onnx-external": ("export-onnx", "src.safetensors", "out.onnx", EXTERNAL),
}
WITH_INPUT = [c for c in CASES if CASES[c][0] != "init"]
FOLDER_OUT = [c for c in CASES if CASES[c][2] == "out"]
# a failed gate stops these before anything is written, whatever the format: one format each
GATED = [c for c in WITH_INPUT if c.startswith(("convert-", "export-onnx"))] + [
    "lowrank-merge-hf", "recursive-safetensors", "quantize-Q8_0-gguf", "heal-pth"]
# the transform (or, for init, the model maker) each command runs before writing
TRANSFORM = {"init": "rwkvtools.random_init.random_checkpoint",
             "convert": "rwkvtools.transforms.convert.check_layout",
             "lowrank": "rwkvtools.transforms.lowrank.lowrank",
             "recursive": "rwkvtools.transforms.recursive.apply",
             "quantize": "rwkvtools.transforms.quantize.apply",
             "heal": "rwkvtools.transforms.heal.heal",
             "export-onnx": "rwkvtools.export.onnx.build_onnx_model"}
HF_READERS = ["convert", "lowrank", "recursive", "quantize", "export-onnx"]  # commands fed an HF folder here
DST_EXT = {"convert": ".pth", "lowrank": ".safetensors", "recursive": ".safetensors",
           "quantize": ".safetensors", "export-onnx": ".onnx"}
OPTS = {"convert": [], "lowrank": LR, "recursive": REC, "quantize": ["--scheme", "int8"], "export-onnx": []}


def invoke(args):
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert not isinstance(res.exception, AssertionError), res.exception  # a failed check inside a hook
    return res


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """src.safetensors, src.pth and the HF folder hf/ (RWKV v7, 2 layers, dim 32, vocab 256 for
    the bytes tokenizer), and student.safetensors (its low-rank form, which heal trains)."""
    d = tmp_path_factory.mktemp("models")
    ck = random_checkpoint("7", n_layer=2, n_embd=32, vocab=256, head_size=16, seed=1)
    for name in ("src.safetensors", "src.pth", "hf"):
        write_checkpoint(ck, str(d / name))
    res = invoke(["lowrank", d / "src.safetensors", d / "student.safetensors", *LR, "--no-validate"])
    assert res.exit_code == 0, res.output
    return d


@pytest.fixture
def ws(models, tmp_path):
    """A private copy of the models: the working folder every command reads from and writes to."""
    w = tmp_path / "ws"
    shutil.copytree(models, w)
    return w


def snapshot(root):
    """Every entry under root (hidden ones too): a file's sha1, a link's target, a folder's None."""
    out = {}
    for d, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(d, name)
            rel = os.path.relpath(p, root)
            if os.path.islink(p):
                out[rel] = "-> " + os.readlink(p)
            elif os.path.isdir(p):
                out[rel] = None
            else:
                with open(p, "rb") as f:
                    out[rel] = hashlib.sha1(f.read()).hexdigest()
    return out


def source(case, ws):
    return ws / CASES[case][1]


def args_for(case, ws, dst, *extra):
    cmd, src, _, opts = CASES[case]
    if cmd == "init":
        return ["init", dst, *opts, *extra]
    args = [cmd, ws / src, dst, *opts]
    if cmd == "heal":
        args += ["--teacher", ws / "src.safetensors"]
    return args + list(extra)


def written(case):
    """The entries a successful run adds to the working folder: DST, and an ONNX file's weights."""
    dst = CASES[case][2]
    return {dst, dst + ".data"} if "--external-data-threshold" in CASES[case][3] else {dst}


def no_validate(case):
    return [] if CASES[case][0] == "init" else ["--no-validate"]


def placeholder(dst, folder):
    """Something at DST that a run must either keep or replace: a model-like folder or a file."""
    if folder:
        dst.mkdir()
        (dst / "config.json").write_text("{}")
        (dst / "model.safetensors").write_bytes(b"keep me")
    else:
        dst.write_bytes(b"keep me")


def assert_user_error(res, *words):
    assert res.exit_code == 2, res.output
    assert "error:" in res.output and "Traceback" not in res.output, res.output
    assert "internal error" not in res.output, res.output
    for w in words:
        assert w in res.output, res.output


def assert_one_json(res) -> dict:
    """stdout holds exactly one JSON document and nothing else."""
    return json.loads(res.stdout)


# ------------------------------------------------------------------------------ (a) inputs
@pytest.mark.parametrize("spelling", ["as given", "respelled", "symlink"])
@pytest.mark.parametrize("case", WITH_INPUT)
def test_dst_equal_to_src_is_refused(ws, case, spelling):
    src = source(case, ws)
    dst = {"as given": str(src), "respelled": os.path.join(str(ws), ".", "hf", "..", src.name),
           "symlink": ws / ("link" + src.suffix)}[spelling]
    if spelling == "symlink":
        os.symlink(src, dst)
    before = snapshot(ws)
    res = invoke(args_for(case, ws, dst, "--force", *no_validate(case)))
    assert_user_error(res, "input")
    assert snapshot(ws) == before


@pytest.mark.parametrize("where", ["the folder", "the folder/", "its weights", "a new file in it"])
@pytest.mark.parametrize("command", HF_READERS)
def test_dst_in_a_folder_source_is_refused(ws, command, where):
    """SRC is a Hugging Face folder: DST may be neither the folder nor anything inside it."""
    ext = DST_EXT[command]
    dst = {"the folder": str(ws / "hf"), "the folder/": str(ws / "hf") + "/",
           "its weights": str(ws / "hf" / "model.safetensors"),
           "a new file in it": str(ws / "hf" / ("new" + ext))}[where]
    before = snapshot(ws)
    res = invoke([command, ws / "hf", dst, *OPTS[command], "--force", "--no-validate"])
    assert_user_error(res, "input")
    assert snapshot(ws) == before


@pytest.mark.parametrize("where", ["the folder", "a new file in it"])
def test_dst_in_a_folder_teacher_is_refused(ws, where):
    dst = ws / "hf" if where == "the folder" else ws / "hf" / "healed.safetensors"
    before = snapshot(ws)
    res = invoke(["heal", ws / "student.safetensors", dst, "--teacher", ws / "hf", *HEAL, "--force",
                  "--no-validate"])
    assert_user_error(res, "input")
    assert snapshot(ws) == before


@pytest.mark.parametrize("case", FOLDER_OUT)
def test_dst_folder_holding_src_is_refused(ws, case):
    """A folder DST replaced with --force must not be one that holds SRC (e.g. SRC saved next to
    an HF model's files)."""
    src = ws / "hf" / "blink.safetensors"
    shutil.copy(source(case, ws), src)
    cmd, _, _, opts = CASES[case]
    before = snapshot(ws)
    res = invoke([cmd, src, ws / "hf", *opts, "--force", "--no-validate"])
    assert_user_error(res, "input")
    assert snapshot(ws) == before


@pytest.mark.parametrize("on", ["SRC", "DST"])
@pytest.mark.parametrize("case", WITH_INPUT)
def test_report_on_an_input_or_dst_is_refused(ws, case, on):
    dst = ws / CASES[case][2]
    report = source(case, ws) if on == "SRC" else dst
    before = snapshot(ws)
    res = invoke(args_for(case, ws, dst, "--report", report, *no_validate(case)))
    assert_user_error(res, "--report")
    assert snapshot(ws) == before


def test_dst_equal_to_teacher_or_text_is_refused(ws):
    text = ws / "calib.safetensors"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    before = snapshot(ws)
    teacher = ws / "src.safetensors"
    res = invoke(["heal", ws / "student.safetensors", teacher, "--teacher", teacher, *HEAL, "--force",
                  "--no-validate"])
    assert_user_error(res, "input")
    res = invoke(["lowrank", ws / "src.safetensors", text, "--rank", "0.5", "--calib", text, "--force",
                  "--no-validate"])
    assert_user_error(res, "input")
    assert snapshot(ws) == before


# --------------------------------------------------------------------------- (b) --force
@pytest.mark.parametrize("case", list(CASES))
def test_existing_dst_needs_force_then_is_replaced(ws, case):
    dst = ws / CASES[case][2]
    placeholder(dst, case in FOLDER_OUT)
    before = snapshot(ws)
    res = invoke(args_for(case, ws, dst, *no_validate(case)))
    assert_user_error(res, "exists", "--force")
    assert snapshot(ws) == before
    res = invoke(args_for(case, ws, dst, "--force", *no_validate(case)))
    assert res.exit_code == 0, res.output
    after = snapshot(ws)
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    assert {k.split(os.sep)[0] for k in changed} == written(case), changed
    if dst.suffix == ".onnx":
        assert dst.read_bytes() != b"keep me"
    else:
        read_checkpoint(str(dst))  # a readable model, not the placeholder


@pytest.mark.parametrize("existing", ["OUT.data", "OUT.data as SRC"])
def test_onnx_external_weights_file_counts_as_dst(ws, existing):
    """export-onnx may write OUT.data beside OUT: an existing one needs --force too, and it is
    never an input."""
    data = ws / "out.onnx.data"
    if existing == "OUT.data":
        data.write_bytes(b"keep me")
        src, force = ws / "src.safetensors", []
    else:
        shutil.copy(ws / "src.safetensors", data)
        src, force = data, ["--force"]
    before = snapshot(ws)
    res = invoke(["export-onnx", src, ws / "out.onnx", *EXTERNAL, "--no-validate", *force])
    assert_user_error(res, "exists" if existing == "OUT.data" else "input")
    assert snapshot(ws) == before


def test_forced_onnx_without_external_weights_removes_the_old_weights_file(ws, monkeypatch):
    """OUT.onnx.data belongs to the OUT it replaces: a forced export that keeps its weights
    inside OUT removes the old OUT.onnx.data, and puts it back if the rename onto OUT fails."""
    out = ws / "out.onnx"
    assert invoke(["export-onnx", ws / "src.safetensors", out, *EXTERNAL, "--no-validate"]).exit_code == 0
    assert (ws / "out.onnx.data").exists()
    before = snapshot(ws)
    with failing_rename(monkeypatch, out, OSError("disk gone")) as seen:
        res = invoke(["export-onnx", ws / "src.safetensors", out, "--no-validate", "--force"])
    assert seen and res.exit_code != 0
    assert snapshot(ws) == before
    res = invoke(["export-onnx", ws / "src.safetensors", out, "--no-validate", "--force"])
    assert res.exit_code == 0, res.output
    assert not (ws / "out.onnx.data").exists()
    from rwkvtools.export.onnx_eval import OnnxModel
    assert OnnxModel(str(out)).vocab == 256


@pytest.mark.parametrize("case", [c for c in CASES if c not in FOLDER_OUT])
def test_existing_folder_where_a_file_goes_is_a_clear_error(ws, case):
    dst = ws / CASES[case][2]
    dst.mkdir()
    (dst / "notes.txt").write_text("mine")
    before = snapshot(ws)
    res = invoke(args_for(case, ws, dst, "--force", *no_validate(case)))
    assert_user_error(res, "folder")
    assert snapshot(ws) == before


@pytest.mark.parametrize("case", list(CASES))
def test_dst_under_a_file_is_a_clear_error(ws, case):
    dst = ws / "src.pth" / CASES[case][2]
    before = snapshot(ws)
    res = invoke(args_for(case, ws, dst, *no_validate(case)))
    assert_user_error(res, "not a folder")
    assert snapshot(ws) == before


# a folder no file can be created in, whoever runs the tests (root included): /proc
UNWRITABLE = "/proc/rwkvtools-no-such-folder"


@pytest.mark.parametrize("case,where", [(c, w) for c in CASES for w in ("empty DST", "DST in /proc", "--report in /proc")
                                        if not (w == "--report in /proc" and CASES[c][0] == "init")])  # no --report
def test_dst_or_report_where_nothing_can_be_written_is_a_clear_error(ws, case, where):
    """DST '' and a DST or --report under /proc were internal errors (FileNotFoundError,
    PermissionError at the first write); lowrank, recursive, quantize and heal wrote DST before
    failing on the report."""
    if "/proc" in where and not os.path.isdir("/proc"):
        pytest.skip("no /proc here")
    dst = "" if where == "empty DST" else ws / CASES[case][2]
    if where == "DST in /proc":
        dst = f"{UNWRITABLE}/{CASES[case][2]}"
    extra = ["--report", f"{UNWRITABLE}/r.json"] if where.startswith("--report") else []
    before = snapshot(ws)
    res = invoke(args_for(case, ws, dst, *extra))
    assert_user_error(res, "empty path" if where == "empty DST" else "cannot create files in /proc")
    assert snapshot(ws) == before


@pytest.mark.parametrize("value", ["0", "-1"])
@pytest.mark.parametrize("case", ["convert-safetensors", "lowrank-safetensors", "recursive-safetensors",
                                  "quantize-int8-safetensors", "heal-safetensors"])
def test_eval_tokens_below_two_is_refused_while_parsing(ws, case, value):
    """--eval-tokens 0 scored the whole held-out text and -1 all of it but the last token (a
    Python slice), both with exit 0."""
    dst = ws / CASES[case][2]
    before = snapshot(ws)
    res = invoke(args_for(case, ws, dst, "--eval-tokens", value, "--device", "cpu"))
    assert res.exit_code == 2 and "--eval-tokens" in res.output and "must be at least 2" in res.output, res.output
    assert snapshot(ws) == before


def test_existing_file_where_a_folder_goes_is_a_clear_error(ws):
    dst = ws / "out"
    dst.write_bytes(b"keep me")
    before = snapshot(ws)
    res = invoke(["convert", ws / "src.safetensors", dst, "--format", "hf", "--force", "--no-validate"])
    assert_user_error(res, "file")
    assert snapshot(ws) == before


# -------------------------------------------------------------------------- (c) failures
@contextlib.contextmanager
def failing_rename(monkeypatch, dst, exc):
    """os.replace raises ``exc`` on the first rename onto DST (the output is complete in its
    temporary place at that moment); every other rename, and later ones onto DST (a restore),
    go through. Yields the list of (temporary path, existed) it saw."""
    real = os.replace
    seen = []

    def replace(a, b, **kw):
        if not seen and os.path.abspath(b) == os.path.abspath(dst):
            seen.append((a, os.path.exists(a)))
            raise exc
        return real(a, b, **kw)
    monkeypatch.setattr(os, "replace", replace)
    yield seen
    monkeypatch.setattr(os, "replace", real)


@pytest.mark.parametrize("exc", [KeyboardInterrupt, OSError], ids=["ctrl-c", "oserror"])
@pytest.mark.parametrize("preexisting", [False, True], ids=["new", "forced"])
@pytest.mark.parametrize("case", list(CASES))
def test_failure_at_the_rename_leaves_nothing(ws, monkeypatch, case, preexisting, exc):
    dst = ws / CASES[case][2]
    if preexisting:
        placeholder(dst, case in FOLDER_OUT)
    before = snapshot(ws)
    with failing_rename(monkeypatch, dst, exc("disk gone")) as seen:
        res = invoke(args_for(case, ws, dst, "--force", *no_validate(case)))
    assert seen and seen[0][1], "the output was not written to a temporary path renamed onto DST"
    assert res.exit_code != 0 and "Traceback" not in res.output, res.output
    if exc is KeyboardInterrupt:
        assert res.exit_code == 130 and res.output.strip() == "Aborted!", res.output
    assert snapshot(ws) == before


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError], ids=["ctrl-c", "bug"])
@pytest.mark.parametrize("case", list(CASES))
def test_exception_in_the_transform_leaves_nothing(ws, monkeypatch, case, exc):
    dst = ws / CASES[case][2]
    placeholder(dst, case in FOLDER_OUT)
    before = snapshot(ws)

    def boom(*a, **k):
        raise exc("boom")
    monkeypatch.setattr(TRANSFORM[CASES[case][0]], boom)
    res = invoke(args_for(case, ws, dst, "--force", *no_validate(case)))
    assert res.exit_code == (130 if exc is KeyboardInterrupt else 3), res.output   # a bug: 3, not bad input's 2
    assert "Traceback" not in res.output
    if exc is RuntimeError:
        assert "error: internal error (RuntimeError: boom); please report it" in res.output, res.output
    assert snapshot(ws) == before


@pytest.mark.parametrize("case", GATED)
def test_failed_gate_exit_1_report_written_dst_untouched(ws, case):
    dst, report = ws / CASES[case][2], ws / "report.json"
    placeholder(dst, case in FOLDER_OUT)
    before = snapshot(ws)
    gate = GATE.get(CASES[case][0], ["--max-ppl-increase", "-100"])
    val = [] if CASES[case][0] == "export-onnx" else VAL
    res = invoke(args_for(case, ws, dst, "--force", "--json", "--report", report, *val, *gate))
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output and "error:" not in res.output
    rep = assert_one_json(res)
    assert json.loads(report.read_text()) == rep
    assert rep["validation"]["passed"] is False
    after = snapshot(ws)
    assert after.pop("report.json") and after == before


@pytest.mark.parametrize("case,late", [(c, late) for late in ("missing --eval-text", "--report under a file")
                                       for c in WITH_INPUT if late.startswith("--report") or "onnx" not in c])
def test_bad_option_found_late_leaves_nothing(ws, case, late):
    """Options that fail only when used (a text read after the transform, a report written
    after DST) must fail before DST appears."""
    dst = ws / CASES[case][2]
    placeholder(dst, case in FOLDER_OUT)
    before = snapshot(ws)
    if late == "missing --eval-text":
        extra = ["--eval-text", ws / "missing.txt", *VAL]
    else:
        extra = ["--report", ws / "student.safetensors" / "report.json", *no_validate(case)]
    res = invoke(args_for(case, ws, dst, "--force", "--json", *extra))
    assert_user_error(res)
    assert res.stdout == ""  # the error is on stderr; nothing half-printed on stdout
    assert snapshot(ws) == before


# ---------------------------------------------------------------------------- (e) --json
@pytest.mark.parametrize("case", WITH_INPUT)
def test_json_is_the_whole_stdout(ws, case):
    """A run with validation, progress bars forced on: stdout is one JSON document, DST is
    written and nothing else appears but DST (and --report)."""
    dst, report = ws / CASES[case][2], ws / "report.json"
    before = snapshot(ws)
    val = [] if CASES[case][0] == "export-onnx" else VAL
    res = invoke(args_for(case, ws, dst, "--json", "--progress", "--report", report, *val))
    assert res.exit_code == 0, res.output
    rep = assert_one_json(res)
    assert rep == json.loads(report.read_text())
    after = snapshot(ws)
    new = {k.split(os.sep)[0] for k in set(after) - set(before)}
    assert new == written(case) | {"report.json"}
    # every writing command's report leads with the same keys, named alike (README, "Commands")
    cmd = CASES[case][0]
    assert list(rep)[:9] == ["command", "src", "dst", "written", "version", "file_bytes_before",
                             "file_bytes_after", "ppl_before", "ppl_after"], list(rep)[:9]
    assert rep["command"] == cmd and rep["src"] == str(source(case, ws)) and rep["dst"] == str(dst)
    assert rep["written"] is True and rep["version"] == "7"
    assert rep["file_bytes_before"] == sum(f.stat().st_size for f in [source(case, ws)] if f.is_file()) or \
        source(case, ws).is_dir()
    assert rep["file_bytes_after"] == sum(
        f.stat().st_size for w in written(case) for f in ([ws / w] if (ws / w).is_file() else (ws / w).rglob("*"))
        if f.is_file())
    if cmd == "export-onnx":
        assert rep["ppl_before"] is None and rep["ppl_after"] is None
    else:
        v = rep["validation"]
        assert rep["ppl_before"] == v["ppl_before"] and rep["ppl_after"] == v["ppl_after"] > 1
        assert {"backend", "ppl_before", "ppl_after", "bytes_before", "bytes_after", "params_before",
                "params_after", "logits_drift", "gates", "passed"} <= set(v), sorted(v)
    assert {k: v for k, v in after.items() if k in before} == before


# ---------------------------------------------------------------------------- (f) --help
def _examples(cmd_path):
    """The `rwkvtools ...` lines of a command's --help, continuation lines joined."""
    res = invoke([*cmd_path, "--help"])
    assert res.exit_code == 0 and "Example" in res.output, res.output
    text = res.output.split("Example", 1)[1].replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [shlex.split(line)[1:] for line in lines if line.startswith("rwkvtools ")]


@pytest.mark.parametrize("cmd_path", [[c] for c in TRANSFORM] + [["recipe", "run"]], ids=" ".join)
def test_help_examples_parse(cmd_path):
    """Every example of the command itself parses: its options exist and take those values."""
    own = [ex for ex in _examples(cmd_path) if ex[:len(cmd_path)] == cmd_path]
    assert own, f"{' '.join(cmd_path)} --help shows no example of itself"
    cmd = main
    for name in cmd_path:
        cmd = cmd.commands[name]
    for ex in own:
        cmd.make_context(" ".join(cmd_path), ex[len(cmd_path):])


# ----------------------------------------------------------------------------- recipe run
def _recipe(path, model, steps, **kw):
    import yaml
    doc = {"name": "t", "model": str(model), "eval": {"tokens": 64}, "steps": steps, **kw}
    path.write_text(yaml.safe_dump(doc))
    return path


def test_recipe_run_json_outputs_and_gate(ws, tmp_path):
    """--json: stdout is report.json; a failed gate exits 1 after writing the reports; the source
    is left as it was."""
    r = _recipe(tmp_path / "r.yaml", ws / "src.safetensors", [{"quantize": {"scheme": "int8"}}],
                gates={"min_size_reduction": 0.99})
    before = snapshot(ws)
    out = tmp_path / "out"
    res = invoke(["recipe", "run", r, "--out", out, "--json"])
    assert res.exit_code == 1, res.output
    rep = assert_one_json(res)
    assert rep == json.loads((out / "report.json").read_text()) and rep["passed"] is False
    assert sorted(os.listdir(out)) == ["01-quantize.json", "01-quantize.report.json",
                                       "01-quantize.safetensors", "plot.png", "report.json", "report.md"]
    assert snapshot(ws) == before


def test_recipe_run_never_rewrites_the_source(ws, tmp_path):
    """A recipe whose last stage is the source itself (only eval steps) must not stamp the
    recipe into the source model."""
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 10)
    r = _recipe(tmp_path / "r.yaml", ws / "src.safetensors", [{"eval": {"max-tokens": 64}}],
                eval={"text": str(text), "tokens": 64})
    before = snapshot(ws)
    res = invoke(["recipe", "run", r, "--out", tmp_path / "out"])
    assert res.exit_code == 0, res.output
    assert snapshot(ws) == before


@pytest.mark.parametrize("where", ["the model file", "the model folder", "inside the model folder",
                                   "--summary on the model"])
def test_recipe_run_outputs_never_hit_the_model(ws, tmp_path, where):
    model = ws / ("hf" if "folder" in where else "src.safetensors")
    r = _recipe(tmp_path / "r.yaml", model, [{"quantize": {"scheme": "int8", "no-validate": True}}])
    out = {"the model file": model, "the model folder": model, "inside the model folder": model / "runs"}.get(
        where, tmp_path / "out")
    extra = ["--summary", model] if where.startswith("--summary") else []
    before = snapshot(ws)
    res = invoke(["recipe", "run", r, "--out", out, *extra])
    assert_user_error(res)
    assert snapshot(ws) == before
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["--out ''", "--out in /proc", "--summary in /proc"])
def test_recipe_run_outputs_where_nothing_can_be_written_are_refused_first(ws, tmp_path, where):
    """Were internal errors (FileNotFoundError); --summary in /proc only after every step had run."""
    if "/proc" in where and not os.path.isdir("/proc"):
        pytest.skip("no /proc here")
    r = _recipe(tmp_path / "r.yaml", ws / "src.safetensors", [{"quantize": {"scheme": "int8", "no-validate": True}}])
    out = {"--out ''": "", "--out in /proc": UNWRITABLE}.get(where, tmp_path / "out")
    extra = ["--summary", f"{UNWRITABLE}/summary.md"] if where.startswith("--summary") else []
    res = invoke(["recipe", "run", r, "--out", out, *extra])
    assert_user_error(res, "empty path" if "''" in where else "cannot create files in /proc")
    assert not (tmp_path / "out").exists()


def test_recipe_run_failing_early_leaves_no_out_folder(ws, tmp_path):
    r = _recipe(tmp_path / "r.yaml", ws / "src.safetensors", [{"quantize": {"scheme": "int8"}}],
                eval={"text": str(tmp_path / "missing.txt")})
    res = invoke(["recipe", "run", r, "--out", tmp_path / "out"])
    assert_user_error(res, "missing.txt")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("first", ["quantize", "convert"])
def test_recipe_run_stops_on_ctrl_c(ws, tmp_path, monkeypatch, first):
    """Ctrl-C in a stage stops the whole recipe (exit 130, 'Aborted!'): no later stage runs, no
    report is written and no temporary entry is left; finished stages are kept (resume), an
    --out folder the run made and nothing finished in is removed, one the user made is kept."""
    steps = [{"quantize": {"scheme": "int8", "no-validate": True}}, {"convert": {"no-validate": True}}]
    r = _recipe(tmp_path / "r.yaml", ws / "src.safetensors", steps if first == "quantize" else steps[::-1])

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr("rwkvtools.transforms.quantize.apply", interrupted)
    out = tmp_path / "out"
    res = invoke(["recipe", "run", r, "--out", out])
    assert res.exit_code == 130 and "Aborted" in res.output, res.output
    if first == "convert":
        assert sorted(os.listdir(out)) == ["01-convert.json", "01-convert.report.json", "01-convert.safetensors"]
        return
    assert not out.exists()  # the run made it, nothing finished in it: removed
    out.mkdir()  # a folder the user made is never removed
    res = invoke(["recipe", "run", r, "--out", out])
    assert res.exit_code == 130 and "Aborted" in res.output, res.output
    assert out.is_dir() and os.listdir(out) == []


def test_recipe_run_summary_that_is_a_folder_is_refused_first(ws, tmp_path):
    """--summary FOLDER was an internal error (IsADirectoryError) after every step had run."""
    r = _recipe(tmp_path / "r.yaml", ws / "src.safetensors", [{"quantize": {"scheme": "int8", "no-validate": True}}])
    (tmp_path / "sums").mkdir()
    res = invoke(["recipe", "run", r, "--out", tmp_path / "out", "--summary", tmp_path / "sums"])
    assert_user_error(res, "sums is a folder; give a file to append the table to")
    assert not (tmp_path / "out").exists()
    assert list((tmp_path / "sums").iterdir()) == []


@pytest.mark.parametrize("link", ["symlink", "hardlink"])
@pytest.mark.parametrize("command", [["quantize", "--scheme", "int8"], ["convert"]])
def test_dst_that_is_a_linked_file_of_an_input_folder_is_refused(tmp_path, link, command):
    """A Hugging Face folder whose weights file is a link to a blob (the hub cache's layout):
    writing DST = the blob replaced the model's weights (exit 0; the folder then read as another
    layout). The link's target is an input file too."""
    hf, blob = tmp_path / "hf", tmp_path / "blob.safetensors"
    write_checkpoint(random_checkpoint("7", n_layer=2, n_embd=32, vocab=64, head_size=16, seed=1), str(hf))
    os.replace(hf / "model.safetensors", blob)
    (os.symlink if link == "symlink" else os.link)(blob, hf / "model.safetensors")
    before = blob.read_bytes()
    r = CliRunner().invoke(main, [command[0], str(hf), str(blob), *command[1:], "--force", "--no-validate"])
    assert r.exit_code == 2 and "is the input file" in r.output, r.output
    assert blob.read_bytes() == before
    assert read_checkpoint(str(hf)).num_params() > 0


def test_small_refusals_the_audit_found(tmp_path):
    """--report '' was ignored (an empty DST is refused); init --dtype bf16 to .bin wrote FP32
    without a word (convert refuses bf16 for rwkv.cpp); a failed convert left the folders it made
    for DST behind."""
    src = str(tmp_path / "m.safetensors")
    write_checkpoint(random_checkpoint("7", n_layer=1, n_embd=32, vocab=256, head_size=16, seed=1), src)
    r = CliRunner().invoke(main, ["quantize", src, str(tmp_path / "q.safetensors"), "--scheme", "int8", "--report", "",
                                  "--no-validate"])
    assert r.exit_code == 2 and "--report is an empty path" in r.output, r.output
    r = CliRunner().invoke(main, ["init", str(tmp_path / "i.bin"), "--version", "7", "--layers", "1", "--dim", "32",
                                  "--vocab", "64", "--head-size", "16", "--dtype", "bf16"])
    assert r.exit_code == 2 and "no bf16 type" in r.output and not (tmp_path / "i.bin").exists(), r.output
    r = CliRunner().invoke(main, ["init", str(tmp_path / "h.bin"), "--version", "7", "--layers", "1", "--dim", "32",
                                  "--vocab", "64", "--head-size", "16", "--dtype", "fp16"])
    assert r.exit_code == 0 and read_checkpoint(str(tmp_path / "h.bin")).manifest["source_format"]["data_type"] == "FP16"
    r = CliRunner().invoke(main, ["convert", src, str(tmp_path / "new" / "sub" / "o.safetensors"),
                                  "--max-ppl-increase", "-1", "--eval-tokens", "64"])
    assert r.exit_code == 1 and not (tmp_path / "new").exists(), r.output


# --------------------------------------------------- session 11: the write-path audit's findings
REPORTING = [c for c in WITH_INPUT]  # every command with an input has --report


@pytest.mark.parametrize("case", REPORTING)
def test_existing_report_needs_force(ws, case):
    """An existing --report was replaced without --force (only DST was checked)."""
    dst, report = ws / CASES[case][2], ws / "keep.json"
    report.write_text('{"precious": 1}')
    before = snapshot(ws)
    res = invoke(args_for(case, ws, dst, "--report", report, *no_validate(case)))
    assert_user_error(res, "--report", "exists; pass --force")
    assert snapshot(ws) == before
    res = invoke(args_for(case, ws, dst, "--report", report, "--force", *no_validate(case)))
    assert res.exit_code == 0, res.output
    assert json.loads(report.read_text())["dst"] if "onnx" not in case else json.loads(report.read_text())["output"]


@pytest.mark.parametrize("case,what", [(c, w) for c in CASES if c not in FOLDER_OUT for w in ("DST", "--report")
                                       if not (w == "--report" and CASES[c][0] == "init")])  # init: no --report
def test_file_output_with_a_trailing_slash_is_refused_first(ws, monkeypatch, case, what):
    """`out.pth/` ran the whole transform, then failed at the rename ('internal error', with the
    temporary name); a --report 'r.json/' failed after DST was published (exit 2, DST left)."""
    dst = ws / CASES[case][2]
    extra = []
    if what == "DST":
        dst = str(dst) + "/"
    else:
        extra = ["--report", str(ws / "r.json") + "/"]
    monkeypatch.setattr(TRANSFORM[CASES[case][0]], lambda *a, **k: pytest.fail("the transform ran"))
    before = snapshot(ws)
    res = invoke(args_for(case, ws, dst, *extra, *no_validate(case)))
    assert_user_error(res, "ends with '/'")
    assert snapshot(ws) == before


@pytest.mark.parametrize("case,what", [("init-safetensors", "DST")] + [
    (c, w) for c in ("convert-hf", "lowrank-safetensors", "quantize-int8-safetensors", "export-onnx")
    for w in ("DST", "--report")])
def test_output_under_a_broken_symlink_is_refused_first(ws, monkeypatch, case, what):
    """A folder of DST (or --report) that is a symbolic link to nothing passed the checks; the
    run failed at the end (FileExistsError from makedirs, an internal error) and a --report
    there left DST behind."""
    (ws / "dl").symlink_to(ws / "nowhere")
    dst, extra = ws / CASES[case][2], []
    if what == "DST":
        dst = ws / "dl" / CASES[case][2]
    else:
        extra = ["--report", ws / "dl" / "r.json"]
    monkeypatch.setattr(TRANSFORM[CASES[case][0]], lambda *a, **k: pytest.fail("the transform ran"))
    before = snapshot(ws)
    res = invoke(args_for(case, ws, dst, *extra, *no_validate(case)))
    assert_user_error(res, "broken symbolic link")
    assert snapshot(ws) == before


@pytest.mark.parametrize("case", REPORTING)
def test_report_that_cannot_be_written_leaves_no_dst(ws, monkeypatch, case):
    """lowrank, recursive, quantize and heal published DST and then wrote --report: a report
    that failed (disk full) or an interruption in between left DST with exit 2. DST and its
    report are published together now; a full disk is a user error, not an internal one."""
    import errno
    dst, report = ws / CASES[case][2], ws / "r.json"
    placeholder(dst, case in FOLDER_OUT)
    before = snapshot(ws)

    def full(path, obj):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    monkeypatch.setattr("rwkvtools.io.atomic.write_json", full)
    res = invoke(args_for(case, ws, dst, "--report", report, "--force", *no_validate(case)))
    assert_user_error(res, "No space left on device", "an output not finished was removed")
    assert snapshot(ws) == before


@pytest.mark.parametrize("where", ["transform", "rename"])
@pytest.mark.parametrize("case", list(CASES))
def test_sigterm_leaves_nothing(ws, monkeypatch, case, where):
    """SIGTERM (the entry point raises Terminated where the program is, as Ctrl-C raises
    KeyboardInterrupt) removes the unfinished output and exits 128 + 15 with one line."""
    import signal

    from rwkvtools.errors import Terminated
    dst = ws / CASES[case][2]
    placeholder(dst, case in FOLDER_OUT)
    before = snapshot(ws)

    def stop(*a, **k):
        raise Terminated(signal.SIGTERM)
    if where == "transform":
        monkeypatch.setattr(TRANSFORM[CASES[case][0]], stop)
        res = invoke(args_for(case, ws, dst, "--force", *no_validate(case)))
    else:
        with failing_rename(monkeypatch, dst, Terminated(signal.SIGTERM)) as seen:
            res = invoke(args_for(case, ws, dst, "--force", *no_validate(case)))
        assert seen and seen[0][1]
    assert res.exit_code == 143, res.output
    assert res.output.strip().startswith("error: stopped by SIGTERM") and "Traceback" not in res.output, res.output
    assert snapshot(ws) == before


def test_recipe_run_stops_on_sigterm(ws, tmp_path, monkeypatch):
    """A stage's SIGTERM was turned into that stage's exit code (143) like a failed command: it
    must stop the whole recipe (no later stage, no report), exit 143."""
    import signal

    from rwkvtools.errors import Terminated
    steps = [{"convert": {"no-validate": True}}, {"quantize": {"scheme": "int8", "no-validate": True}},
             {"convert": {"no-validate": True}}]
    r = _recipe(tmp_path / "r.yaml", ws / "src.safetensors", steps)

    def stop(*a, **k):
        raise Terminated(signal.SIGTERM)
    monkeypatch.setattr("rwkvtools.transforms.quantize.apply", stop)
    out = tmp_path / "out"
    res = invoke(["recipe", "run", r, "--out", out])
    assert res.exit_code == 143 and "stopped by SIGTERM" in res.output, res.output
    assert sorted(os.listdir(out)) == ["01-convert.json", "01-convert.report.json", "01-convert.safetensors"]


@pytest.mark.parametrize("where", ["the report", "a stage file", "a new file in --out"])
def test_recipe_summary_inside_out_is_refused_first(ws, tmp_path, where):
    """--summary on a file the run writes in --out was appended to: report.json stopped being
    JSON, a stage model stopped being readable."""
    r = _recipe(tmp_path / "r.yaml", ws / "src.safetensors", [{"quantize": {"scheme": "int8", "no-validate": True}}])
    out = tmp_path / "out"
    res = invoke(["recipe", "run", r, "--out", out])
    assert res.exit_code == 0, res.output
    before = snapshot(out)
    name = {"the report": "report.json", "a stage file": "01-quantize.safetensors"}.get(where, "sum.md")
    res = invoke(["recipe", "run", r, "--out", out, "--summary", out / name])
    assert_user_error(res, "is inside --out")
    assert snapshot(out) == before


def test_recipe_summary_that_cannot_be_appended_to_is_refused_first(ws, tmp_path, monkeypatch):
    """An existing --summary the user may not write was found only after every stage had run
    (an internal PermissionError)."""
    import builtins
    summary = tmp_path / "sum.md"
    summary.write_text("# earlier runs\n")
    real_open = builtins.open

    def guarded(file, mode="r", *a, **k):
        if os.fspath(file) == str(summary) and any(c in mode for c in "wa+"):
            raise PermissionError(13, "Permission denied", str(summary))
        return real_open(file, mode, *a, **k)
    monkeypatch.setattr(builtins, "open", guarded)
    monkeypatch.setattr("rwkvtools.transforms.quantize.apply", lambda *a, **k: pytest.fail("a stage ran"))
    r = _recipe(tmp_path / "r.yaml", ws / "src.safetensors", [{"quantize": {"scheme": "int8", "no-validate": True}}])
    res = invoke(["recipe", "run", r, "--out", tmp_path / "out", "--summary", summary])
    assert_user_error(res, "cannot append to it", "Permission denied")
    assert not (tmp_path / "out").exists() and summary.read_text() == "# earlier runs\n"


DRIVER = '''
import importlib.abc, os, sys, time
marker, when = sys.argv[1], sys.argv[2]
sys.argv = ["rwkvtools"] + sys.argv[3:]

def hold():
    open(marker, "w").close()   # the test sends its signal now
    if when == "publish":
        time.sleep(120)          # the signal interrupts the sleep (an exception where the program is)
        return
    t0 = time.time()             # start-up: the entry point holds the signal until the imports end
    while not sys.modules["rwkvtools.entry"]._pending and time.time() - t0 < 120:
        time.sleep(0.01)

if when == "publish":   # the output complete in its temporary place, the rename held back
    import rwkvtools.io.atomic as atomic
    real = atomic.publish
    def slow(tmp, path):
        hold()
        real(tmp, path)
    atomic.publish = slow
else:                   # start-up: while the command modules are imported
    class Slow(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "rwkvtools.commands.convert_cli":
                sys.meta_path.remove(self)
                hold()
            return None
    sys.meta_path.insert(0, Slow())
from rwkvtools.entry import main
main()
'''


def _run_and_signal(tmp_path, when, sig, args, ignored=()):
    import signal
    import subprocess
    import sys
    import time
    driver, marker = tmp_path / "driver.py", tmp_path / "marker"
    driver.write_text(DRIVER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}

    def ignore():  # as `nohup` starts a command: the signal ignored before it runs
        for name in ignored:
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    p = subprocess.Popen([sys.executable, str(driver), str(marker), when, *map(str, args)], cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, preexec_fn=ignore)
    t0 = time.time()
    while not marker.exists() and p.poll() is None and time.time() - t0 < 300:
        time.sleep(0.01)
    assert marker.exists(), f"the driver never reached '{when}': {p.communicate()}"
    for name in (sig if isinstance(sig, tuple) else (sig,)):
        p.send_signal(getattr(signal, name))
        time.sleep(0.5)
    out, err = p.communicate(timeout=120)
    return p.returncode, out, err


@pytest.mark.parametrize("forced", [False, True], ids=["new", "forced"])
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP", "SIGINT"])
def test_signal_to_the_command_at_the_rename_leaves_nothing(tmp_path, sig, forced):
    """A real `rwkvtools` process (rwkvtools.entry) stopped while its output is complete but not
    yet renamed: SIGTERM/SIGHUP left the temporary file (no handler: the process died on the
    spot); now every signal removes it, keeps an existing DST, and says so in one line."""
    ws = tmp_path / "ws"
    ws.mkdir()
    if forced:
        (ws / "out.safetensors").write_bytes(b"keep me")
    rc, out, err = _run_and_signal(tmp_path, "publish", sig,
                                   ["init", ws / "out.safetensors", *INIT, *(["--force"] if forced else [])])
    assert "Traceback" not in err and "Exception ignored" not in err, err
    if sig == "SIGINT":
        assert rc == 130 and err.strip() == "Aborted!", (rc, err)
    else:
        import signal
        assert rc == 128 + getattr(signal, sig) and f"error: stopped by {sig}" in err, (rc, err)
    assert sorted(os.listdir(ws)) == (["out.safetensors"] if forced else [])
    if forced:
        assert (ws / "out.safetensors").read_bytes() == b"keep me"


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_signal_during_start_up_prints_no_traceback(tmp_path, sig):
    """Ctrl-C while the command modules were being imported (torch: a second or two) printed a
    KeyboardInterrupt traceback; a SIGTERM raised inside torch's C import code could be lost. The
    entry point holds the signal until the imports are done, then stops with one line."""
    import signal
    rc, out, err = _run_and_signal(tmp_path, "start-up", sig, ["--version"])
    assert "Traceback" not in err and err.strip() == ("Aborted!" if sig == "SIGINT" else f"error: stopped by {sig}"), err
    assert rc == 128 + getattr(signal, sig) and out == ""


@pytest.mark.parametrize("command", ["inspect", "convert"])
def test_stdout_reader_gone_is_a_quiet_stop(tmp_path, command):
    """`rwkvtools ... | head -1`: a closed stdout was an 'internal error (BrokenPipeError)'
    after the output had been written. Now: exit 141 (the shell's SIGPIPE code), nothing on
    stderr, the finished output in place."""
    import subprocess
    import sys
    src = tmp_path / "m.safetensors"
    write_checkpoint(random_checkpoint("7", n_layer=1, n_embd=32, vocab=256, head_size=16, seed=1), str(src))
    args = ["inspect", src, "--json"] if command == "inspect" else ["convert", src, tmp_path / "o.pth", "--json",
                                                                     "--no-validate"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.Popen([sys.executable, "-m", "rwkvtools", *map(str, args)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=env)
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait() == 141 and err == "", err
    if command == "convert":
        assert read_checkpoint(str(tmp_path / "o.pth")).num_params() == read_checkpoint(str(src)).num_params()


@pytest.mark.parametrize("args,words", [
    (["eval", "m.pth"], ["Missing option '--text'", "(see 'rwkvtools eval --help')"]),
    (["lowrank", "a", "b", "--rank", "nan"], ["'--rank'", "must be a finite number"]),
    (["eval", "m.pth", "--text", "t", "--encoding", "bogus"], ["'--encoding'"]),
    (["frob"], ["No such command 'frob'", "(see 'rwkvtools --help')"]),
    (["recipe", "run"], ["Missing argument 'RECIPE_FILE'", "(see 'rwkvtools recipe run --help')"]),
    (["--bogus"], ["No such option '--bogus'"]),
])
def test_usage_errors_are_one_error_line(args, words):
    """Click's usage errors (a missing option, a bad value, an unknown command) printed three
    lines (usage, hint, 'Error: ...'); every other user error is one 'error:' line."""
    res = invoke(args)
    assert res.exit_code == 2, res.output
    assert res.output.count("\n") == 1 and res.output.startswith("error: "), res.output
    for w in words:
        assert w in res.output, res.output


def test_a_signal_ignored_by_the_parent_stays_ignored(tmp_path):
    """`nohup rwkvtools ...` died on a hangup once the entry point handled SIGHUP: a signal the
    command was started with ignored stays ignored (here SIGHUP passes, SIGTERM then stops it)."""
    ws = tmp_path / "ws"
    ws.mkdir()
    rc, out, err = _run_and_signal(tmp_path, "publish", ("SIGHUP", "SIGTERM"), ["init", ws / "o.safetensors", *INIT],
                                   ignored=("SIGHUP",))
    assert rc == 143 and "stopped by SIGTERM" in err and "SIGHUP" not in err, (rc, err)
    assert os.listdir(ws) == []


@pytest.mark.parametrize("command", ["lowrank", "lowrank-merge", "heal"])
def test_existing_dst_keeps_its_format_when_replaced(ws, command):
    """DST's format was taken from the staged name (which does not exist yet) instead of DST: an
    existing extensionless file became a Hugging Face folder (refused), an existing HF folder
    with a dot in its name an unknown extension (naming the temporary path)."""
    from rwkvtools.io import read_checkpoint as rc
    if command == "lowrank-merge":
        dst = ws / "RWKV-x070-0.1B-v2.8"
        shutil.copytree(ws / "hf", dst)
        args = ["lowrank", ws / "src.safetensors", dst, *LR, "--merge"]
    else:
        dst = ws / "plain"
        shutil.copy(ws / "src.safetensors", dst)
        args = (["lowrank", ws / "src.safetensors", dst, *LR] if command == "lowrank" else
                ["heal", ws / "student.safetensors", dst, *HEAL, "--teacher", ws / "src.safetensors"])
    res = invoke([*args, "--force", "--no-validate"])
    assert res.exit_code == 0, res.output
    assert dst.is_dir() == (command == "lowrank-merge")
    assert rc(str(dst)).num_params() > 0


def test_gguf_writer_out_of_space_is_a_user_error(ws, monkeypatch):
    """gguf-py reports a short write as OSError('N requested and M written') without an errno:
    an internal error, where every other writer's full disk is a user error."""
    import gguf

    def short(self, *a, **k):
        raise OSError("16384 requested and 10688 written")
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", short)
    before = snapshot(ws)
    res = invoke(["convert", ws / "src.safetensors", ws / "o.gguf", "--no-validate"])
    assert_user_error(res, "cannot write", "an output not finished was removed")
    assert snapshot(ws) == before


def test_internal_error_traceback_only_with_debug(ws, monkeypatch, capsys):
    """RWKVTOOLS_DEBUG=1 prints the traceback of an internal error (exit 3 either way)."""
    def boom(*a, **k):
        raise ValueError("kaboom")
    monkeypatch.setattr("rwkvtools.random_init.random_checkpoint", boom)
    args = ["init", str(ws / "m.safetensors"), "--version", "7", "--layers", "1", "--dim", "32", "--vocab", "64"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 3 and "Traceback" not in res.output and "ValueError: kaboom" in res.output
    monkeypatch.setenv("RWKVTOOLS_DEBUG", "1")
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 3 and "Traceback (most recent call last)" in capsys.readouterr().err + res.output
    assert not (ws / "m.safetensors").exists()

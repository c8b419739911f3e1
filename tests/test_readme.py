"""README examples run as written: every shell command in a ```bash or plain ``` block of README.md
(lines starting with `rwkvtools ` or `cmp `) and every ```python block, in README order, in one
sandbox (`/tmp/` -> a pytest temporary folder, `../shared` -> the shared folder, cwd = the
repository root), so a renamed option, a wrong path or an example that now errors fails here.

README.md is parsed at collection time; nothing is copied into this file except the short lists of
commands that are not run here (each with its reason; the lists must still match the README).
Setup lines (`pip install ...`, `python -m pytest ...`) are left to CI; any other line of a ```bash
block that is not a command run here fails the test (plain ``` blocks also hold non-commands, e.g.
the Layout listing, so only their rwkvtools/cmp lines are taken). Per-example times:
`python -m pytest -q tests/test_readme.py --durations=0`."""
import os
import shlex
import subprocess
import sys
import time

import pytest
import torch

from conftest import FIXTURES, REPO, SHARED

README = REPO / "README.md"

if not FIXTURES.is_dir():
    pytest.skip(f"../shared not found at {SHARED} (set RWKVTOOLS_SHARED); the README examples need it",
                allow_module_level=True)

# Lines of ```bash blocks that are the README's setup / test instructions, exercised by CI itself.
# A quick-start chain `pip install ... && rwkvtools ...` keeps its rwkvtools part.
SETUP_PREFIXES = ("pip install ", "python -m pytest ")

# Commands (as collected: continuation lines joined, comment stripped) that are not run, and why.
EXCLUDED = {}

# Commands that need a CUDA GPU: run where there is one, skipped (with this reason) elsewhere.
NEEDS_GPU = {
    "rwkvtools -v eval ../shared/fixtures/tiny-rwkv-7v0-834K.pth --text ../shared/data/wikitext-2-test.txt "
    "--max-tokens 8192 --device cuda --json": "--device cuda needs a CUDA GPU",
}

COMMAND_PREFIXES = ("rwkvtools ", "cmp ")
TIMEOUT_S = 900
TAIL_LINES = 30
BIG_FILE = 64 << 20


def strip_comment(line: str) -> str:
    """Drop a trailing shell comment: a `#` at the start of a word, outside quotes."""
    quote = None
    i = 0
    while i < len(line):
        c = line[i]
        if quote:
            if c == "\\" and quote == '"':
                i += 1
            elif c == quote:
                quote = None
        elif c == "\\":
            i += 1
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
        i += 1
    return line.rstrip()


def logical_lines(body):
    """(line number, text) of a block's lines with backslash continuations joined."""
    out, buf, start = [], "", None
    for n, line in body:
        if start is None:
            start = n
        if line.rstrip().endswith("\\"):
            buf += line.strip()[:-1].rstrip() + " "
            continue
        out.append((start, buf + line.strip()))
        buf, start = "", None
    if buf:
        out.append((start, buf.strip()))
    return out


def parse_readme(text: str):
    """Examples in README order: dicts with kind ('sh' or 'py'), line (1-based), code."""
    examples, block, info, unknown = [], None, None, []
    for n, line in enumerate(text.splitlines(), 1):
        if block is None:
            if line.startswith("```"):
                block, info = [], line[3:].strip()
            continue
        if line.strip() != "```":
            block.append((n, line))
            continue
        if info == "python":
            code = "\n".join(l for _, l in block) + "\n"
            examples.append({"kind": "py", "line": block[0][0] if block else n, "code": code})
        elif info in ("bash", ""):
            for ln, cmd in logical_lines(block):
                cmd = strip_comment(cmd)
                if not cmd:
                    continue
                if cmd.startswith(SETUP_PREFIXES):
                    # `pip install ... && pip install ... && rwkvtools ...`: keep what follows the installs
                    parts = [p.strip() for p in cmd.split(" && ")]
                    rest = [p for p in parts if not p.startswith(SETUP_PREFIXES)]
                    if rest and all(p.startswith(COMMAND_PREFIXES) for p in rest):
                        examples.append({"kind": "sh", "line": ln, "code": " && ".join(rest)})
                    elif rest:
                        unknown.append((ln, cmd))
                elif cmd.startswith(COMMAND_PREFIXES):
                    examples.append({"kind": "sh", "line": ln, "code": cmd})
                elif info == "bash":
                    unknown.append((ln, cmd))
        block = None
    return examples, unknown


EXAMPLES, UNKNOWN = parse_readme(README.read_text(encoding="utf-8"))


def _id(ex):
    words = [w for w in ex["code"].split()[:4] if w[:1].isalpha()]
    what = "python" if ex["kind"] == "py" else "-".join(words[1:3] if words[0] == "rwkvtools" else words[:1])
    return f"L{ex['line']:03d}-{what}"


def test_readme_has_examples_and_no_unknown_lines():
    assert sum(e["kind"] == "sh" for e in EXAMPLES) >= 20, "README parsing found too few shell commands"
    assert sum(e["kind"] == "py" for e in EXAMPLES) >= 1, "README parsing found no python block"
    assert not UNKNOWN, ("lines in ```bash blocks of README.md that are neither rwkvtools/cmp commands nor setup "
                         f"lines; run them here or list them in EXCLUDED: {UNKNOWN}")


@pytest.mark.parametrize("listed", [*EXCLUDED, *NEEDS_GPU])
def test_excluded_examples_still_in_readme(listed):
    found = listed in {e["code"] for e in EXAMPLES}
    assert found, f"no longer in README.md as written here (update or remove the entry): {listed}"


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    d = tmp_path_factory.mktemp("readme")
    env = dict(os.environ)
    bindir = os.path.dirname(sys.executable)
    env.update(PATH=bindir + os.pathsep + env.get("PATH", ""), RWKVTOOLS_SHARED=str(SHARED),
               PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    # the venv's console script, or `python -m rwkvtools` where there is none
    prelude = "set -o pipefail\n"
    if not os.path.exists(os.path.join(bindir, "rwkvtools")):
        prelude += f'rwkvtools() {{ {shlex.quote(sys.executable)} -m rwkvtools "$@"; }}\n'
    yield {"dir": d, "env": env, "prelude": prelude}
    # pytest keeps the last 3 sessions' temporary folders: drop the big files (the 0.1B `init`
    # example writes ~760 MB), keep the small ones for a look after a failure
    for f in d.rglob("*"):
        if f.is_file() and f.stat().st_size > BIG_FILE:
            f.unlink()


def _tail(out: str) -> str:
    lines = [l for l in out.replace("\r", "\n").splitlines() if l.strip()]
    return "\n".join(lines[-TAIL_LINES:])


@pytest.mark.parametrize("ex", EXAMPLES, ids=_id)
def test_readme_example(ex, sandbox):
    code = ex["code"]
    if code in EXCLUDED:
        pytest.skip(f"excluded: {EXCLUDED[code]}")
    if code in NEEDS_GPU and not torch.cuda.is_available():
        pytest.skip(NEEDS_GPU[code])
    d = sandbox["dir"]
    if ex["kind"] == "sh":
        run = code.replace("/tmp/", shlex.quote(str(d)) + "/").replace("../shared", shlex.quote(str(SHARED)))
        argv = ["bash", "-c", sandbox["prelude"] + run]
    else:
        run = code.replace("/tmp/", f"{d}/").replace("../shared", str(SHARED))
        script = d / f"readme-L{ex['line']:03d}.py"
        script.write_text(run, encoding="utf-8")
        argv = [sys.executable, str(script)]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(argv, cwd=REPO, env=sandbox["env"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        pytest.fail(f"README.md line {ex['line']} timed out after {TIMEOUT_S} s:\n{code}\n--- output (tail) ---\n"
                    f"{_tail(out)}", pytrace=False)
    took = time.perf_counter() - t0
    where = f"README.md line {ex['line']} ({took:.1f} s)"
    if p.returncode != 0:
        pytest.fail(f"{where} exited {p.returncode}:\n{code}\n--- output (tail) ---\n{_tail(p.stdout)}", pytrace=False)
    if ex["kind"] == "sh" and " && echo " in code:
        expect = code.rsplit(" && echo ", 1)[1].strip().strip("'\"")
        assert expect in p.stdout.split(), (f"{where} did not print {expect!r}:\n{code}\n--- output (tail) ---\n"
                                            f"{_tail(p.stdout)}")

"""The WKV kernels (kernels/) against the naive reference (ops/naive.py, run in float64 on the
same inputs): forward outputs, final states and the v7 backward against autograd through the
naive recurrence, odd lengths, chunk boundaries of the v7 backward (16), batch > 1, carried
states, fp32/fp16/bf16 inputs.

Backends: "harness" = the kernels' per-thread functions run on the CPU over the same grid
(kernels/cpu_harness.cpp, built with the system C++ compiler; always run); "cuda" = the real
kernels (skipped without a CUDA device).

Tolerances, as max|x - ref| / max(1, max|ref|) (conftest.max_rel):
* fp32 inputs: 2e-5 for outputs, states and gradients (measured <= 1e-6 here; fp32 rounding of
  sequential sums over up to 257 steps).
* fp16 / bf16 inputs: the reference takes the same rounded inputs, so only the rounding of the
  stored outputs differs: 2^-11 (fp16) / 2^-8 (bf16) relative to max|y|, plus the fp32 margin;
  states are fp32 and keep the fp32 tolerance.
"""
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REPO, max_rel
from rwkvtools.ops import cpu_harness, cuda, naive

TOL32 = 2e-5
TOL_OUT = {torch.float32: TOL32, torch.float16: 2.0 ** -11 + TOL32, torch.bfloat16: 2.0 ** -8 + TOL32}
HAS_GPU = torch.cuda.is_available()


@pytest.fixture(scope="module")
def harness():
    return cpu_harness.load()


def _backends():
    return ["harness", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_GPU, reason="no CUDA device"))]


class Runner:
    """Calls one backend's operators through the same Python wrappers (ops/cuda.py run_*)."""

    def __init__(self, name):
        self.name = name
        if name == "cuda":
            assert cuda.available(), f"CUDA device present but kernels did not build: {cuda.build_error()}"
            self.lib, self.dev = cuda._load(), "cuda"
        else:
            self.lib, self.dev = cpu_harness.load(), "cpu"

    def to(self, xs):
        return [x.to(self.dev) if isinstance(x, torch.Tensor) else x for x in xs]

    def wkv4(self, w, u, k, v, state):
        w, u, k, v = self.to([w, u, k, v])
        y, st = cuda.run_wkv4(self.lib, w, u, k, v, tuple(self.to(state)))
        return y.cpu(), tuple(s.cpu() for s in st)

    def wkv_diag(self, *xs):
        y, S = cuda.run_wkv_diag(self.lib, *self.to(xs))
        return y.cpu(), S.cpu()

    def wkv7(self, *xs):
        return cuda.run_wkv7(self.lib, *self.to(xs))


@pytest.fixture(params=_backends())
def run(request, harness):
    return Runner(request.param)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _round(xs, dtype):
    """Inputs in the storage dtype, and the same values in float64 for the reference."""
    xs = [x.to(dtype) for x in xs]
    return xs, [x.double() for x in xs]


# ------------------------------------------------------------------------------------ v4
def _v4_inputs(B, T, C, seed=0, scale=3.0):
    g = _gen(seed)
    k = torch.randn(B, T, C, generator=g) * scale
    v = torch.randn(B, T, C, generator=g)
    w = torch.exp(torch.empty(C).uniform_(-6, 2, generator=g))
    u = torch.randn(C, generator=g)
    return w, u, k, v


@pytest.mark.parametrize("T", (1, 7, 33, 100))
def test_wkv4_matches_naive(run, T):
    B, C = 2, 24
    w, u, k, v = _v4_inputs(B, T, C, seed=T)
    empty = tuple(torch.zeros(B, C) for _ in range(3))
    y, st = run.wkv4(w, u, k, v, empty)
    y0, st0 = naive.wkv4_naive(w.double(), u.double(), k.double(), v.double(), tuple(s.double() for s in empty))
    assert max_rel(y.double(), y0) <= TOL32
    for a, b in zip(st, st0):
        assert max_rel(a.double(), b) <= TOL32
    # carry the state into a second segment (nonzero aa/bb/pp)
    w2, u2, k2, v2 = _v4_inputs(B, 5, C, seed=T + 100)
    y, _ = run.wkv4(w, u, k2, v2, st)
    y0, _ = naive.wkv4_naive(w.double(), u.double(), k2.double(), v2.double(), st0)
    assert max_rel(y.double(), y0) <= TOL32


def test_wkv4_large_exponents_stay_finite(run):
    # k up to ~+-100: e^k overflows fp32; the max-shift trick must keep everything finite
    B, T, C = 1, 40, 8
    w, u, k, v = _v4_inputs(B, T, C, seed=3, scale=40.0)
    empty = tuple(torch.zeros(B, C) for _ in range(3))
    y, st = run.wkv4(w, u, k, v, empty)
    y0, st0 = naive.wkv4_naive(w.double(), u.double(), k.double(), v.double(), tuple(s.double() for s in empty))
    assert torch.isfinite(y).all() and all(torch.isfinite(s).all() for s in st)
    assert max_rel(y.double(), y0) <= TOL32


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_wkv4_half_inputs(run, dtype):
    B, T, C = 2, 19, 16
    w, u, k, v = _v4_inputs(B, T, C, seed=5)
    (k, v), (k64, v64) = _round([k, v], dtype)
    empty = tuple(torch.zeros(B, C) for _ in range(3))
    y, st = run.wkv4(w, u, k, v, empty)
    assert y.dtype == dtype and st[0].dtype == torch.float32
    y0, st0 = naive.wkv4_naive(w.double(), u.double(), k64, v64, tuple(s.double() for s in empty))
    assert max_rel(y.double(), y0) <= TOL_OUT[dtype]
    for a, b in zip(st, st0):
        assert max_rel(a.double(), b) <= TOL32


# ------------------------------------------------------------------------------ v5 / v6
def _diag_inputs(B, T, H, N, seed=0, const=False, strong=False):
    g = _gen(seed)
    r, k, v = (torch.randn(B, T, H, N, generator=g) for _ in range(3))
    lo, hi = (-7.0, 4.5) if strong else (-6.0, 1.0)
    shape = (H, N) if const else (B, T, H, N)
    logw = (-torch.exp(torch.empty(shape).uniform_(lo, hi, generator=g))).clamp(min=-60)
    u = torch.randn(H, N, generator=g)
    S = torch.randn(B, H, N, N, generator=g)
    return r, k, v, logw, u, S


@pytest.mark.parametrize("T,N", [(1, 8), (7, 16), (17, 8), (100, 16), (33, 64)])
@pytest.mark.parametrize("const", (False, True), ids=("v6-per-token", "v5-constant"))
def test_wkv_diag_matches_naive(run, T, N, const):
    xs = _diag_inputs(2, T, 3, N, seed=T + N, const=const)
    y, S = run.wkv_diag(*xs)
    y0, S0 = naive.wkv_diag_naive(*[x.double() for x in xs])
    assert max_rel(y.double(), y0) <= TOL32
    assert max_rel(S.double(), S0) <= TOL32


def test_wkv_diag_strong_decays(run):
    # log-decays down to the model's clamp (-60): decays underflow to 0, nothing may turn NaN
    xs = _diag_inputs(2, 50, 2, 16, seed=11, strong=True)
    y, S = run.wkv_diag(*xs)
    y0, S0 = naive.wkv_diag_naive(*[x.double() for x in xs])
    assert torch.isfinite(y).all()
    assert max_rel(y.double(), y0) <= TOL32 and max_rel(S.double(), S0) <= TOL32


def test_wkv_diag_v50_per_head_decay(run):
    # 5.0/5.1: one decay per head, broadcast over the key channels
    r, k, v, _, u, S = _diag_inputs(1, 23, 4, 8, seed=2)
    g = -torch.exp(torch.randn(4, 1))
    y, S1 = run.wkv_diag(r, k, v, g, u, S)
    y0, S0 = naive.wkv_diag_naive(r.double(), k.double(), v.double(), g.double(), u.double(), S.double())
    assert max_rel(y.double(), y0) <= TOL32 and max_rel(S1.double(), S0) <= TOL32


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_wkv_diag_half_inputs(run, dtype):
    r, k, v, g, u, S = _diag_inputs(2, 21, 2, 16, seed=4)
    (r, k, v), (r64, k64, v64) = _round([r, k, v], dtype)
    y, S1 = run.wkv_diag(r, k, v, g, u, S)
    assert y.dtype == dtype and S1.dtype == torch.float32
    y0, S0 = naive.wkv_diag_naive(r64, k64, v64, g.double(), u.double(), S.double())
    assert max_rel(y.double(), y0) <= TOL_OUT[dtype]
    assert max_rel(S1.double(), S0) <= TOL32


# ------------------------------------------------------------------------------------ v7
def _v7_inputs(B, T, H, N, seed=0, strong=False):
    g = _gen(seed)
    r, k, v = (torch.randn(B, T, H, N, generator=g) for _ in range(3))
    kk = torch.nn.functional.normalize(torch.randn(B, T, H, N, generator=g), dim=-1)
    a = torch.sigmoid(torch.randn(B, T, H, N, generator=g))
    if strong:  # outside the v7 bound: the backward must not divide by the decay
        logw = -torch.empty(B, T, H, N).uniform_(0, 20, generator=g)
    else:
        logw = -0.6065306597 * torch.sigmoid(torch.randn(B, T, H, N, generator=g) * 3)
    S = torch.randn(B, H, N, N, generator=g)
    return [r, logw, k, v, -kk, kk * a, S]


@pytest.mark.parametrize("T,N", [(1, 8), (7, 16), (16, 8), (17, 16), (100, 8), (40, 64)])
def test_wkv7_forward_matches_naive(run, T, N):
    xs = _v7_inputs(2, T, 3, N, seed=T + N)
    with torch.no_grad():
        y, S = run.wkv7(*xs)
    y0, S0 = naive.wkv7_naive(*[x.double() for x in xs])
    assert max_rel(y.double().cpu(), y0) <= TOL32
    assert max_rel(S.double().cpu(), S0) <= TOL32


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_wkv7_half_inputs(run, dtype):
    r, g, k, v, a, b, S = _v7_inputs(2, 27, 2, 16, seed=9)
    acts, acts64 = _round([r, k, v, a, b], dtype)
    with torch.no_grad():
        y, S1 = run.wkv7(acts[0], g, *acts[1:], S)
    assert y.dtype == dtype and S1.dtype == torch.float32
    y0, S0 = naive.wkv7_naive(acts64[0], g.double(), *acts64[1:], S.double())
    assert max_rel(y.double().cpu(), y0) <= TOL_OUT[dtype]
    assert max_rel(S1.double().cpu(), S0) <= TOL32


def _v7_grads(run, xs, dy, dS, dtype=torch.float32):
    leaves = [x.detach().to(dtype if i not in (1, 6) else torch.float32).requires_grad_() for i, x in enumerate(xs)]
    y, S = run.wkv7(*leaves)
    loss = (y.float() * dy.to(y.device)).sum() + (S * dS.to(S.device)).sum()
    return [g.cpu() for g in torch.autograd.grad(loss, leaves)]


def _naive_grads(xs, dy, dS):
    leaves = [x.detach().double().requires_grad_() for x in xs]
    y, S = naive.wkv7_naive(*leaves)
    return torch.autograd.grad((y * dy.double()).sum() + (S * dS.double()).sum(), leaves)


NAMES = ("r", "g", "k", "v", "a", "b", "S0")


@pytest.mark.parametrize("T", (1, 15, 16, 17, 40))
@pytest.mark.parametrize("N", (8, 16))
def test_wkv7_backward_matches_autograd(run, T, N):
    # T around the 16-step checkpoint interval: one partial chunk, one full, full + 1, 2.5 chunks
    xs = _v7_inputs(2, T, 2, N, seed=3 * T + N)
    gen = _gen(T)
    dy = torch.randn(2, T, 2, N, generator=gen)
    dS = torch.randn(2, 2, N, N, generator=gen)
    got = _v7_grads(run, xs, dy, dS)
    ref = _naive_grads(xs, dy, dS)
    for name, a, b in zip(NAMES, got, ref):
        assert a.shape == b.shape and a.dtype == torch.float32, name
        assert max_rel(a.double(), b) <= TOL32, (name, max_rel(a.double(), b))


def test_wkv7_backward_strong_decays_and_head_64(run):
    # per-step log-decay down to -20 (w ~ 2e-9): a backward that divided by w would blow up
    xs = _v7_inputs(1, 35, 2, 64, seed=21, strong=True)
    gen = _gen(1)
    dy = torch.randn(1, 35, 2, 64, generator=gen)
    dS = torch.randn(1, 2, 64, 64, generator=gen)
    got = _v7_grads(run, xs, dy, dS)
    ref = _naive_grads(xs, dy, dS)
    for name, a, b in zip(NAMES, got, ref):
        assert torch.isfinite(a).all(), name
        assert max_rel(a.double(), b) <= TOL32, (name, max_rel(a.double(), b))


def test_wkv7_backward_only_y_used(run):
    # the final state's gradient is None in autograd when only y feeds the loss
    xs = _v7_inputs(1, 20, 2, 8, seed=5)
    leaves = [x.detach().requires_grad_() for x in xs]
    y, _ = run.wkv7(*leaves)
    got = torch.autograd.grad(y.sum(), leaves)
    ref = _naive_grads(xs, torch.ones(1, 20, 2, 8), torch.zeros(1, 2, 8, 8))
    for name, a, b in zip(NAMES, got, ref):
        assert max_rel(a.double().cpu(), b) <= TOL32, name


def test_wkv7_backward_bf16_inputs(run):
    T, N = 19, 16
    xs = _v7_inputs(1, T, 2, N, seed=8)
    for i in (0, 2, 3, 4, 5):
        xs[i] = xs[i].to(torch.bfloat16)
    gen = _gen(2)
    dy = torch.randn(1, T, 2, N, generator=gen).to(torch.bfloat16).float()
    dS = torch.randn(1, 2, N, N, generator=gen)
    got = _v7_grads(run, xs, dy, dS, dtype=torch.bfloat16)
    ref = _naive_grads(xs, dy, dS)
    for i, (name, a, b) in enumerate(zip(NAMES, got, ref)):
        tol = TOL_OUT[torch.bfloat16] if i in (0, 2, 3, 4, 5) else TOL32  # bf16-stored gradients
        assert max_rel(a.double(), b) <= tol, (name, max_rel(a.double(), b))


# ------------------------------------------------------------------------ harness contract
def test_harness_rejects_bad_arguments(harness):
    xs = _v7_inputs(1, 5, 2, 12)  # head size 12 has no kernel
    with pytest.raises(RuntimeError, match="unsupported head size"):
        cpu_harness.wkv7(*xs)
    r, k, v, g, u, S = _diag_inputs(1, 5, 2, 8)
    with pytest.raises(RuntimeError, match="u: expected shape"):
        harness.ops.wkv_diag(r, k, v, g, u[:1].contiguous(), S, 0)
    with pytest.raises(RuntimeError, match="contiguous"):
        harness.ops.wkv_diag(r.transpose(1, 2), k, v, g, u, S, 0)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        harness.ops.wkv_diag(r.double(), k.double(), v.double(), g, u, S, 0)


@pytest.mark.parametrize("version", ["4", "5.0", "5.2", "6", "7"])
def test_models_with_harness_kernels_match_reference(tiny_models, monkeypatch, version):
    """The whole model with its WKV calls routed through the kernels' code: same logits as the
    default (chunked) path, also after a carried state, so the layouts and broadcasts the model
    passes are the ones the kernels expect."""
    from rwkvtools import ops
    from rwkvtools.model import build_model
    model = build_model(tiny_models[version])
    toks = torch.randint(0, 97, (2, 21), generator=_gen(0))
    with torch.no_grad():
        ref1, st = model(toks[:, :12])
        ref2, st_ref = model(toks[:, 12:], st)
        monkeypatch.setattr(ops, "wkv4", cpu_harness.wkv4)
        monkeypatch.setattr(ops, "wkv_diag", cpu_harness.wkv_diag)
        monkeypatch.setattr(ops, "wkv7", cpu_harness.wkv7)
        got1, st = model(toks[:, :12])
        got2, st_got = model(toks[:, 12:], st)
    assert max_rel(got1, ref1) <= 1e-4 and max_rel(got2, ref2) <= 1e-4
    if version != "4":  # v4's (aa, bb, pp) is one representation among many of the same state
        for key in st_ref:
            assert max_rel(st_got[key], st_ref[key]) <= 1e-4, key


@pytest.mark.parametrize("name", ["tiny-rwkv-4v0-660K.pth", "tiny-rwkv-5v1-730K-FP32.bin", "tiny-rwkv-5v2-730K-FP32.bin",
                                  "tiny-rwkv-6v0-3m-Q5_1.bin", "tiny-rwkv-7v0-834K.pth"])
def test_fixtures_with_harness_kernels_match_reference(monkeypatch, name):
    """Real trained weights (../shared fixtures): logits with the kernels' code in place of the
    chunked WKV, on 64 bytes of wikitext."""
    from conftest import fixture_path, wikitext_bytes

    from rwkvtools import load, ops
    model = load(fixture_path(name))
    toks = torch.tensor(list(wikitext_bytes(64)), dtype=torch.long).remainder(model.spec.vocab).unsqueeze(0)
    with torch.no_grad():
        ref, _ = model(toks)
        monkeypatch.setattr(ops, "wkv4", cpu_harness.wkv4)
        monkeypatch.setattr(ops, "wkv_diag", cpu_harness.wkv_diag)
        monkeypatch.setattr(ops, "wkv7", cpu_harness.wkv7)
        got, _ = model(toks)
    assert max_rel(got, ref) <= 1e-4


# ------------------------------------------------------------------------- dispatch, build
def test_kernel_sources_are_found_and_packaged():
    kd = cuda.kernel_dir()
    for name in cuda.KERNEL_FILES:
        assert (kd / name).is_file(), name
    setup = (REPO / "setup.py").read_text()
    for ext in {os.path.splitext(n)[1] for n in cuda.KERNEL_FILES}:
        assert f'"*{ext}"' in setup, f"setup.py does not ship kernels/*{ext}"


def test_kernel_sources_are_found_in_an_installed_layout(tmp_path):
    # pip install puts the sources in rwkvtools/kernels/ (package data, no __init__.py): kernel_dir
    # must find them there, from a folder that is not the repository
    site = tmp_path / "site"
    shutil.copytree(REPO / "rwkvtools", site / "rwkvtools", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "kernels", site / "rwkvtools" / "kernels")
    p = subprocess.run([sys.executable, "-c", "from rwkvtools.ops import cuda; print(cuda.kernel_dir())"],
                       capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(site)})
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == str(site / "rwkvtools" / "kernels")


def test_repository_kernels_folder_does_not_shadow_a_kernels_package(tmp_path):
    # transformers imports Hugging Face's `kernels` package; run from the repository root (python -m
    # pytest, python -m rwkvtools), a kernels/__init__.py here would be imported in its place
    other = tmp_path / "kernels"
    other.mkdir()
    (other / "__init__.py").write_text("WHO = 'installed'\n")
    p = subprocess.run([sys.executable, "-c", "import kernels; print(kernels.WHO)"], capture_output=True,
                       text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert p.returncode == 0 and p.stdout.strip() == "installed", p.stdout + p.stderr


def test_package_import_does_not_build_or_import_cuda():
    code = ("import sys, rwkvtools, rwkvtools.ops, rwkvtools.model, rwkvtools.cli; "
            "bad = [m for m in ('rwkvtools.ops.cuda', 'rwkvtools.ops.cpu_harness', 'torch.utils.cpp_extension') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 0, p.stdout + p.stderr


def test_opt_out_and_cpu_tensors_fall_back(monkeypatch):
    monkeypatch.setenv("RWKVTOOLS_CUDA", "0")
    assert cuda.available() is False
    from rwkvtools import ops
    assert ops.backend_for(torch.zeros(1, 4, 1, 1, device="cuda" if HAS_GPU else "cpu"), 4) == "chunked"
    # the CUDA entry points called with CPU tensors use the chunked path (same contract)
    xs = _v7_inputs(1, 9, 2, 8)
    y, S = cuda.wkv7(*xs)
    y0, S0 = naive.wkv7_naive(*[x.double() for x in xs])
    assert max_rel(y.double(), y0) <= TOL32 and max_rel(S.double(), S0) <= TOL32


# ------------------------------------------------------------------------------ GPU only
@pytest.mark.skipif(not HAS_GPU, reason="no CUDA device")
def test_gpu_dispatch_uses_kernels_and_eval_reports_cuda(tmp_path, monkeypatch):
    monkeypatch.delenv("RWKVTOOLS_CUDA", raising=False)
    from click.testing import CliRunner

    from rwkvtools import ops
    from rwkvtools.cli import main
    from rwkvtools.io.writers import write_checkpoint
    from rwkvtools.random_init import random_checkpoint
    assert cuda.available(), cuda.build_error()
    assert ops.backend_for(torch.zeros(1, 8, device="cuda"), 8) == "cuda"
    path = tmp_path / "m.safetensors"
    write_checkpoint(random_checkpoint("7", n_layer=2, n_embd=128, head_size=64, vocab=256, seed=1), str(path))
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    res = {}
    for dev in ("cpu", "cuda"):
        out = CliRunner().invoke(main, ["eval", str(path), "--text", str(text), "--device", dev, "--json"])
        assert out.exit_code == 0, out.output
        import json
        res[dev] = json.loads(out.output)
    assert res["cuda"]["backend"] == "cuda"
    assert abs(res["cuda"]["ppl"] - res["cpu"]["ppl"]) <= 1e-4 * res["cpu"]["ppl"]

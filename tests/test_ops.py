"""Chunked WKV against the naive per-token recurrence: outputs, final state and gradients,
odd lengths, lengths not a multiple of the chunk, batch > 1, nonzero initial state."""
import pytest
import torch

from rwkvtools.ops import chunked, naive
from conftest import max_rel

LENGTHS = (1, 7, 16, 33, 100, 257)


def _diag_inputs(T, dtype, const=False, strong=False, B=2, H=3, N=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    r, k, v = (torch.randn(B, T, H, N, generator=g, dtype=dtype) for _ in range(3))
    lo, hi = (-7.0, 4.0) if strong else (-6.0, 1.0)
    shape = (H, N) if const else (B, T, H, N)
    logw = -torch.exp(torch.empty(shape, dtype=dtype).uniform_(lo, hi, generator=g)).clamp(min=-60)
    u = torch.randn(H, N, generator=g, dtype=dtype)
    S = torch.randn(B, H, N, N, generator=g, dtype=dtype)
    return r, k, v, logw, u, S


@pytest.mark.parametrize("T", LENGTHS)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 5e-6)])
@pytest.mark.parametrize("pairwise", [False, True])
def test_diag_chunked_matches_naive(T, dtype, tol, pairwise):
    r, k, v, w, u, S = _diag_inputs(T, dtype)
    y0, S0 = naive.wkv_diag_naive(r, k, v, w, u, S)
    y1, S1 = chunked.wkv_diag_chunked(r, k, v, w, u, S, chunk=16, pairwise=pairwise)
    assert max_rel(y1, y0) <= tol
    assert max_rel(S1, S0) <= tol


@pytest.mark.parametrize("T", (7, 100))
def test_diag_constant_decay_v5(T):
    r, k, v, w, u, S = _diag_inputs(T, torch.float64, const=True)
    y0, S0 = naive.wkv_diag_naive(r, k, v, w, u, S)
    y1, S1 = chunked.wkv_diag_chunked(r, k, v, w, u, S)
    assert max_rel(y1, y0) <= 1e-12 and max_rel(S1, S0) <= 1e-12


def test_diag_strong_decays_pick_pairwise_and_stay_finite():
    # log-decays down to -60: the factorised form would overflow; the dispatcher must notice
    r, k, v, w, u, S = _diag_inputs(130, torch.float32, strong=True)
    assert float(w.abs().max()) * 16 > chunked.SAFE_EXP
    y0, S0 = naive.wkv_diag_naive(r, k, v, w, u, S)
    y1, S1 = chunked.wkv_diag_chunked(r, k, v, w, u, S)
    assert torch.isfinite(y1).all()
    assert max_rel(y1, y0) <= 5e-6 and max_rel(S1, S0) <= 5e-6


@pytest.mark.parametrize("chunk", (None, 16))
def test_diag_medium_decays_stay_finite(chunk):
    """Log-decays between -e^1.5 and -e^2 (-4.5 .. -7.4): 16 steps of them sum past float32's
    exp range, so the factorised form would overflow at any chunk length; the chunk choice
    (automatic, or a given chunk with pairwise left to the dispatcher) must notice."""
    r, k, v, _, u, S = _diag_inputs(130, torch.float32)
    g = torch.Generator().manual_seed(1)
    w = -torch.exp(torch.empty(r.shape).uniform_(1.5, 2.0, generator=g))
    assert 16 * float(w.abs().max()) > chunked.SAFE_EXP
    y0, S0 = naive.wkv_diag_naive(r, k, v, w, u, S)
    y1, S1 = chunked.wkv_diag_chunked(r, k, v, w, u, S, chunk=chunk)
    assert torch.isfinite(y1).all() and torch.isfinite(S1).all()
    assert max_rel(y1, y0) <= 5e-6 and max_rel(S1, S0) <= 5e-6


def _v7_inputs(T, dtype, B=2, H=3, N=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    r, k, v = (torch.randn(B, T, H, N, generator=g, dtype=dtype) for _ in range(3))
    kk = torch.nn.functional.normalize(torch.randn(B, T, H, N, generator=g, dtype=dtype), dim=-1)
    a = torch.sigmoid(torch.randn(B, T, H, N, generator=g, dtype=dtype))
    logw = -0.6065306597 * torch.sigmoid(torch.randn(B, T, H, N, generator=g, dtype=dtype) * 3)
    S = torch.randn(B, H, N, N, generator=g, dtype=dtype)
    return r, logw, k, v, -kk, kk * a, S


@pytest.mark.parametrize("T", LENGTHS)
@pytest.mark.parametrize("chunk", (16, 32))
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 5e-6)])
def test_v7_chunked_matches_naive(T, chunk, dtype, tol):
    args = _v7_inputs(T, dtype)
    y0, S0 = naive.wkv7_naive(*args)
    y1, S1 = chunked.wkv7_chunked(*args, chunk=chunk)
    assert max_rel(y1, y0) <= tol
    assert max_rel(S1, S0) <= tol


@pytest.mark.parametrize("scale", (5.0, 150.0))
def test_v7_chunked_outside_the_decay_bound(scale):
    """Log-decays beyond the v7 bound (|g| <= 0.61; here up to 5 and 150): shorter chunks that are
    still safe, or the naive steps when even those would overflow; finite and equal to naive."""
    r, g, k, v, a, b, S = _v7_inputs(45, torch.float32)
    g = g * (scale / 0.6065306597)
    assert float(g.abs().max()) * 16 > chunked.SAFE_EXP
    y0, S0 = naive.wkv7_naive(r, g, k, v, a, b, S)
    y1, S1 = chunked.wkv7_chunked(r, g, k, v, a, b, S)
    assert torch.isfinite(y1).all() and torch.isfinite(S1).all()
    assert max_rel(y1, y0) <= 5e-6 and max_rel(S1, S0) <= 5e-6


def _v4_inputs(T, dtype, B=2, C=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.exp(torch.randn(C, generator=g, dtype=dtype))
    u = torch.randn(C, generator=g, dtype=dtype)
    k = torch.randn(B, T, C, generator=g, dtype=dtype) * 3
    v = torch.randn(B, T, C, generator=g, dtype=dtype)
    return w, u, k, v


def _v4_canon(state):
    aa, bb, pp = state
    return torch.cat([aa / bb, torch.log(bb) + pp], -1)  # scale-free: a/b and log b


@pytest.mark.parametrize("T", LENGTHS)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 5e-6)])
def test_v4_chunked_matches_naive_and_continues(T, dtype, tol):
    w, u, k, v = _v4_inputs(T, dtype)
    zero = tuple(torch.zeros(2, 24, dtype=dtype) for _ in range(3))
    y0, s0 = naive.wkv4_naive(w, u, k, v, zero)
    y1, s1 = chunked.wkv4_chunked(w, u, k, v, zero)
    assert max_rel(y1, y0) <= tol
    assert max_rel(_v4_canon(s1), _v4_canon(s0)) <= tol
    # the carried state continues the sequence identically
    y0b, _ = naive.wkv4_naive(w, u, k, v, s0)
    y1b, _ = chunked.wkv4_chunked(w, u, k, v, s1)
    assert max_rel(y1b, y0b) <= tol


def test_v4_zero_state_is_empty():
    """bb == 0 marks the empty state whatever pp holds (ONNX feeds zeros)."""
    w, u, k, v = _v4_inputs(5, torch.float64)
    k = k - 1000.0  # very negative keys: exp(k - max(0, ...)) underflows (float64 too) with pp = 0
    zero = tuple(torch.zeros(2, 24, dtype=torch.float64) for _ in range(3))
    for f in (naive.wkv4_naive, chunked.wkv4_chunked):
        y, _ = f(w, u, k, v, zero)
        assert torch.isfinite(y).all(), f.__name__
        assert torch.allclose(y[:, 0], v[:, 0]), f.__name__  # first output is v_0 exactly


@pytest.mark.parametrize("which", ["diag", "v7", "v4"])
def test_gradients_match_naive(which):
    torch.manual_seed(0)
    if which == "diag":
        args = list(_diag_inputs(37, torch.float64))
        f0, f1 = naive.wkv_diag_naive, lambda *a: chunked.wkv_diag_chunked(*a, chunk=16)
    elif which == "v7":
        args = list(_v7_inputs(37, torch.float64))
        f0, f1 = naive.wkv7_naive, lambda *a: chunked.wkv7_chunked(*a, chunk=16)
    else:
        w, u, k, v = _v4_inputs(37, torch.float64)
        args = [w, u, k, v]
        zero = tuple(torch.zeros(2, 24, dtype=torch.float64) for _ in range(3))
        f0 = lambda *a: naive.wkv4_naive(*a, zero)  # noqa: E731
        f1 = lambda *a: chunked.wkv4_chunked(*a, zero)  # noqa: E731
    grads = []
    for f in (f0, f1):
        xs = [a.clone().requires_grad_(True) for a in args]
        y, s = f(*xs)
        s = s[0] if isinstance(s, tuple) else s
        loss = (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum() + (s ** 2).sum() * 1e-3
        loss.backward()
        grads.append([x.grad for x in xs])
    for g0, g1 in zip(*grads):
        assert max_rel(g1, g0) <= 1e-9


@pytest.mark.parametrize("T", (1, 7, 16, 33))
@pytest.mark.parametrize("big", (1e30, 3.3e38, float("inf")))
def test_v4_decays_past_exp_range_stay_finite(T, big):
    """w = exp(time_decay) = inf (time_decay >= 88.73) or near float32's largest: a channel that
    forgets at once. The recurrence handles it (e^-inf = 0); the chunked form multiplied w by
    zero distances (0 * inf = NaN) and by negative ones past the padding."""
    w, u, k, v = _v4_inputs(T, torch.float32)
    w[3] = big
    w[5] = big
    zero = tuple(torch.zeros(2, 24) for _ in range(3))
    y0, s0 = naive.wkv4_naive(w, u, k, v, zero)
    y1, s1 = chunked.wkv4_chunked(w, u, k, v, zero)
    assert torch.isfinite(y0).all() and torch.isfinite(y1).all()
    assert max_rel(y1, y0) <= 5e-6
    y0b, _ = naive.wkv4_naive(w, u, k, v, s0)
    y1b, _ = chunked.wkv4_chunked(w, u, k, v, s1)
    assert torch.isfinite(y1b).all() and max_rel(y1b, y0b) <= 5e-6


@pytest.mark.parametrize("T", (1, 7, 33))
@pytest.mark.parametrize("const", (False, True))
@pytest.mark.parametrize("big", (1e30, float("inf")))
def test_diag_log_decays_past_exp_range_stay_finite(T, const, big):
    """A v5 log-decay -exp(time_decay) of -inf (time_decay >= 88.73; v5 has no floor, unlike v6's
    -60): e^-inf = 0 in the recurrence; the chunked sums multiplied it by the 0/1 selection (NaN)."""
    r, k, v, w, u, S = _diag_inputs(T, torch.float32, const=const)
    w = w.clone()
    w[..., 1, 3] = -big
    y0, S0 = naive.wkv_diag_naive(r, k, v, w, u, S)
    for pairwise in (None, True):
        y1, S1 = chunked.wkv_diag_chunked(r, k, v, w, u, S, pairwise=pairwise)
        assert torch.isfinite(y0).all() and torch.isfinite(y1).all() and torch.isfinite(S1).all()
        assert max_rel(y1, y0) <= 5e-6 and max_rel(S1, S0) <= 5e-6


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_half_precision_decays_run_and_stay_finite(dtype):
    """The decay cap fits the dtype: fp16 cannot hold 1e30 (clamping with it raised), so fp16 is
    capped at 511 (64 steps of it stay finite); e^-511 is 0 in fp16 as e^-inf is."""
    r, k, v, w, u, S = _diag_inputs(33, torch.float32)
    w = w.clone()
    w[..., 1, 3] = float("-inf")
    y0, _ = naive.wkv_diag_naive(r, k, v, w, u, S)
    y1, _ = chunked.wkv_diag_chunked(r, k, v, w.to(dtype).float(), u, S)   # the model's path: fp32 decays
    y2, _ = chunked.wkv_diag_chunked(*(x.to(dtype) for x in (r, k, v, w, u, S)))
    assert torch.isfinite(y1).all() and torch.isfinite(y2).all()
    assert max_rel(y2.float(), y0) <= (0.05 if dtype == torch.bfloat16 else 0.01)
    wv, uv, kv, vv = _v4_inputs(33, torch.float32)
    wv[3] = float("inf")
    zero = tuple(torch.zeros(2, 24, dtype=dtype) for _ in range(3))
    y3, _ = chunked.wkv4_chunked(wv.to(dtype), uv.to(dtype), kv.to(dtype), vv.to(dtype), zero)
    assert torch.isfinite(y3).all()

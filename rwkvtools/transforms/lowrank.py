"""Low-rank factorisation of linear layers: ``P.weight`` (m, n) -> ``P.weight_u`` (m, r) and
``P.weight_v`` (r, n), which the reference model runs as two thin matmuls.

Methods
* ``svd``: plain truncated SVD of W (keeps the most Frobenius energy of the weight).
* ``whiten`` (default, activation-aware as in SVD-LLM): with G = E[x x^T] the covariance of the
  linear's inputs on calibration text (float64, from :mod:`rwkvtools.calibrate`, block by block)
  and L its Cholesky factor (G = L L^T, regularised when G is not positive definite), truncate
  the SVD of W L and map back with L^-1. The discarded squared singular values of W L are then
  exactly the squared output error E||W x - W' x||^2 on the calibration inputs.

Ranks: R < 1 is the share of each matrix's parameters kept, r = round(R m n / (m + n)); R >= 1 is
an absolute rank (capped at min(m, n)). ``alloc="energy"`` spends the same total parameter budget
where the (whitened) spectra say it matters: for each role (ffn.key, ffn.value, ...) the budget the
uniform ranks would use is spread across the layers, greedily to the singular directions with the
largest share of their matrix's energy. Shares are compared only between matrices of the same role:
across roles the spectrum cannot tell how much an output error costs downstream (comparing them
all in one pool lost perplexity against uniform on the v5.2 fixture; see docs/bench/05-lowrank.md).

API (the design's plan/apply split)::

    cfg = LowRankConfig(rank=0.32)
    p = plan(ckpt, cfg, calib_tokens)          # JSON-able: per-matrix ranks, kept energy, params
    out = apply(ckpt, p, calib_tokens)         # deterministic given the plan (and the same text)
    out = lowrank(ckpt, cfg, calib_tokens)     # both, calibrating once when the factors fit in memory

The result records one history entry (options + plan) and a ``lowrank`` summary in the manifest,
which ``rwkvtools inspect`` shows.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Iterator

import torch

from ..checkpoint import Checkpoint, LazyTensors, tensor_dtype, tensor_shape
from ..errors import RwkvToolsError
from ..spec import ModelSpec, detect, linear_shape

METHODS = ("whiten", "svd")
TARGET_SETS = ("ffn", "ffn+att")
ALLOCS = ("uniform", "energy")
FFN_LINEARS = ("ffn.key", "ffn.value", "ffn.receptance")
ATT_LINEARS = ("att.receptance", "att.key", "att.value", "att.gate", "att.output")
PLAN_FORMAT = 1
# factors kept between plan and apply (so calibration runs once) up to this many bytes
CACHE_LIMIT_BYTES = 1 << 30


from ..calibrate import calibration_tokens  # noqa: E402,F401  (one implementation, re-exported)
from ..progress import progress_bar


class LowRankError(RwkvToolsError):
    """Bad lowrank options or a checkpoint/plan the transform cannot use."""


@dataclass(frozen=True)
class LowRankConfig:
    rank: float                      # < 1: share of parameters kept; >= 1: absolute rank
    method: str = "whiten"           # whiten | svd
    targets: str = "ffn"             # ffn | ffn+att
    alloc: str = "uniform"           # uniform | energy
    calib_tokens: int = 8192         # calibration tokens (whiten)
    chunk_len: int = 512             # tokens per forward call during calibration
    damp: float = 0.1                # whitening regulariser, relative to mean(diag(G))
    merge: bool = False              # store dense P.weight = U V instead of the factors

    def __post_init__(self):
        r = self.rank
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or r <= 0:
            raise LowRankError(f"rank must be a positive number (share < 1 or absolute rank >= 1), got {r!r}")
        if r >= 1 and r != int(r):
            raise LowRankError(f"rank {r} >= 1 is an absolute rank and must be a whole number "
                               "(use a value below 1 for a share of the parameters)")
        if self.method not in METHODS:
            raise LowRankError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.targets not in TARGET_SETS:
            raise LowRankError(f"targets must be one of {', '.join(TARGET_SETS)}, got {self.targets!r}")
        if self.alloc not in ALLOCS:
            raise LowRankError(f"alloc must be one of {', '.join(ALLOCS)}, got {self.alloc!r}")
        from ..calibrate import check_calibration_options
        check_calibration_options(LowRankError, self.calib_tokens, self.chunk_len, self.damp)

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["rank"] >= 1:
            d["rank"] = int(d["rank"])
        if self.method == "svd":  # calibration options do not apply
            for k in ("calib_tokens", "chunk_len", "damp"):
                d.pop(k)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LowRankConfig":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


# ------------------------------------------------------------------------------------ targets
def target_prefixes(tensors: Mapping, spec: ModelSpec, targets: str) -> list[str]:
    """Checkpoint prefixes of the linears to factor, in layer order (only those the version has:
    channel-mix receptance exists in v4-v6, the time-mix gate in v5.1/v5.2/v6)."""
    names = FFN_LINEARS + (ATT_LINEARS if targets == "ffn+att" else ())
    out = []
    for i in range(spec.n_layer):
        for n in names:
            p = f"blocks.{i}.{n}"
            if linear_shape(tensors, p) is None:
                continue
            if f"{p}.weight" in tensors or (f"{p}.weight_u" in tensors and f"{p}.weight_v" in tensors):
                out.append(p)
            else:
                raise LowRankError(f"linear '{p}' is stored in a form lowrank cannot read (quantized or shared); "
                                   "apply lowrank before quantize/recursive, or start from a dense checkpoint")
    if not out:
        raise LowRankError(f"no {targets} linears found to factor")
    return out


def _stored_names(tensors: Mapping, p: str) -> list[str]:
    if f"{p}.weight" in tensors:
        return [f"{p}.weight"]
    return [f"{p}.weight_u", f"{p}.weight_v"]


def _stored_params(tensors: Mapping, p: str) -> int:
    return sum(math.prod(tensor_shape(tensors, n)) for n in _stored_names(tensors, p))


def _stored_dtype(tensors: Mapping, p: str) -> torch.dtype:
    return tensor_dtype(tensors, _stored_names(tensors, p)[0])


def merge_hint(tensors: Mapping) -> str:
    """The command that turns the low-rank factors in ``tensors`` back into dense matrices and
    keeps their product (a rank above the stored one; time-mix factors need --targets ffn+att)."""
    att = any(".att." in k for k in tensors if k.endswith(".weight_u"))
    return ("rwkvtools lowrank SRC DENSE --merge --method svd --rank 100000" + (" --targets ffn+att" if att else "")
            + ": a rank above the stored one keeps their product")


def _stored_rank(tensors: Mapping, p: str) -> int:
    """The rank a target can have at most: its stored factors' rank when already factored (a
    product of rank r has no more directions), else min(m, n)."""
    if f"{p}.weight" not in tensors:
        return int(tensor_shape(tensors, f"{p}.weight_u")[1])
    return min(linear_shape(tensors, p))


def _dense64(tensors: Mapping, p: str) -> torch.Tensor:
    if f"{p}.weight" in tensors:
        return tensors[f"{p}.weight"].to(torch.float64)
    return tensors[f"{p}.weight_u"].to(torch.float64) @ tensors[f"{p}.weight_v"].to(torch.float64)


def uniform_rank(rank: float, m: int, n: int) -> int:
    """The rank of an m x n matrix for R: round(R m n / (m + n)) for R < 1, else R; in [1, min(m, n)]."""
    k = min(m, n)
    r = int(round(rank * m * n / (m + n))) if rank < 1 else int(rank)
    return max(1, min(k, r))


# ------------------------------------------------------------------------------ factorisation
@dataclass
class Factors:
    """W ~= left[:, :r] @ right[:r] (float64), components ordered by the (whitened) singular
    values ``s`` (the full spectrum); ``left``/``right`` may be truncated to the largest rank that
    can still be asked for."""
    left: torch.Tensor
    s: torch.Tensor
    right: torch.Tensor
    damp: float = 0.0          # regulariser actually used (relative), whiten only
    whitened: bool = False

    def truncate(self, k: int) -> "Factors":
        return Factors(self.left[:, :k].clone(), self.s, self.right[:k].clone(), self.damp, self.whitened)

    def kept_energy(self, r: int) -> float:
        e = self.s.square()
        tot = float(e.sum())
        return float(e[:r].sum()) / tot if tot > 0 else 1.0

    def pair(self, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(U (m, r), V (r, n)) with each rank-one term balanced (|U[:, j]| = |V[j]|; for plain SVD
        U = u sqrt(s), V = sqrt(s) v^T)."""
        if r > self.left.shape[1]:
            raise LowRankError(f"rank {r} exceeds the {self.left.shape[1]} factors kept")
        a, b = self.left[:, :r], self.right[:r]
        na, nb = a.norm(dim=0), b.norm(dim=1)
        c = torch.where((na > 0) & (nb > 0), (nb / na.clamp_min(1e-300)).sqrt(), torch.ones_like(na))
        return a * c, b / c[:, None]


def _top_directions(w: torch.Tensor, gmat: torch.Tensor | None, lmat: torch.Tensor | None):
    """Singular directions of A = W L (L L^T = G; plain SVD when G is None), largest first, as
    (left, s, right) with W ~= left[:, :r] @ right[:r]. Through the eigen-decomposition of the
    smaller Gram matrix of A (float64), which is faster than an SVD of A and exact enough:
    * m <= n: A A^T = W G W^T = U S^2 U^T, and the truncation U_r U_r^T A mapped back by L^-1 is
      U_r (U_r^T W): no inverse is needed;
    * m > n: A^T A = V S^2 V^T, truncation A V_r V_r^T mapped back: (W L V_r) (V_r^T L^-1)."""
    m, n = w.shape
    if m <= n:
        e = w @ w.t() if gmat is None else w @ gmat @ w.t()
        ev, vec = torch.linalg.eigh(0.5 * (e + e.t()))
        ev, vec = ev.flip(0), vec.flip(1)
        left, right = vec, vec.t() @ w
    else:
        a = w if lmat is None else w @ lmat
        ev, vec = torch.linalg.eigh(a.t() @ a)
        ev, vec = ev.flip(0), vec.flip(1)
        left = a @ vec
        right = vec.t() if lmat is None else torch.linalg.solve_triangular(lmat, vec.t(), upper=False, left=False)
    return left, ev.clamp_min(0).sqrt(), right


def svd_factors(w: torch.Tensor) -> Factors:
    """Plain truncated SVD of W (Eckart-Young: the best rank-r approximation in Frobenius norm)."""
    left, s, right = _top_directions(w.to(torch.float64), None, None)
    return Factors(left, s, right)


def whitened_factors(w: torch.Tensor, gram: torch.Tensor, n_rows: int, damp: float) -> Factors:
    """SVD-LLM: G = X^T X / rows + lambda I with L = chol(G); truncate the SVD of W L and map the
    right factor back by L^-1. The discarded squared singular values of W L are the output error
    E||W x - W' x||^2 on the calibration inputs. ``damp`` is lambda relative to mean(diag(G)); it
    grows tenfold while G is not positive definite. With no input energy at all (a dead linear)
    this is plain SVD."""
    w = w.to(torch.float64)
    g = gram.to(torch.float64) / max(n_rows, 1)
    g = 0.5 * (g + g.t())
    m, n = w.shape
    scale = float(g.diagonal().mean()) if n else 0.0
    if not math.isfinite(scale) or not bool(torch.isfinite(g).all()):
        raise LowRankError("calibration statistics are not finite (the model overflows on the calibration text)")
    if scale <= 0:
        return svd_factors(w)
    eye = torch.eye(n, dtype=torch.float64)
    d = damp
    for _ in range(16):
        greg = g + (d * scale) * eye
        if m <= n:  # only W G W^T is needed; G + lambda I is PSD for any lambda >= 0
            left, s, right = _top_directions(w, greg, None)
            return Factors(left, s, right, damp=d, whitened=True)
        lmat, info = torch.linalg.cholesky_ex(greg)
        if int(info) == 0:
            left, s, right = _top_directions(w, None, lmat)
            return Factors(left, s, right, damp=d, whitened=True)
        d = max(d * 10, 1e-12)
    raise LowRankError("the calibration covariance could not be regularised to positive definite")


def _tokens_digest(tokens) -> str:
    t = torch.as_tensor(tokens, dtype=torch.int64).flatten().contiguous()
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()


def _progress(total: int, desc: str, enabled: bool):
    return progress_bar(total, desc, enabled, unit="layer")


def iter_factors(ckpt: Checkpoint, cfg: LowRankConfig, prefixes: list[str], calib_tokens=None,
                 progress: bool = False) -> Iterator[tuple[str, Factors]]:
    """(prefix, Factors) for every prefix, streamed layer by layer (whiten: one calibration pass
    through the reference model, Grams of one block at a time)."""
    tensors = ckpt.tensors
    if cfg.method == "svd":
        bar = _progress(len(prefixes), "lowrank svd", progress)
        for p in prefixes:
            yield p, svd_factors(_dense64(tensors, p))
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        return
    if calib_tokens is None:
        raise LowRankError("method 'whiten' needs calibration tokens")
    from ..calibrate import calibrate_blocks
    from ..model import build_model
    want = set(prefixes)
    model = build_model(ckpt, dtype=torch.float32)
    bar = _progress(model.spec.n_layer, "lowrank calibrate+whiten", progress)
    seen = set()
    for _, grams in calibrate_blocks(model, calib_tokens, lambda p: p in want, chunk_len=cfg.chunk_len):
        for p in sorted(grams, key=prefixes.index):
            gm = grams[p]
            yield p, whitened_factors(_dense64(tensors, p), gm.xtx.cpu(), gm.n, cfg.damp)
            seen.add(p)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    missing = [p for p in prefixes if p not in seen]
    if missing:  # every target is a linear the model runs; this would be a bug
        raise LowRankError(f"calibration saw no inputs for {', '.join(missing[:4])}")


# ---------------------------------------------------------------------------------- allocation
def matrix_kind(prefix: str) -> str:
    """The role of a linear without its layer: 'blocks.3.ffn.key' -> 'ffn.key'."""
    parts = prefix.split(".")
    return ".".join(parts[2:]) if len(parts) > 2 and parts[0] == "blocks" else prefix


def energy_ranks(spectra: list[torch.Tensor], shapes: list[tuple[int, int]], budget: int,
                 floor: list[int] | None = None) -> list[int]:
    """Ranks that spend at most ``budget`` parameters (sum r_i (m_i + n_i)) to keep the largest
    total share of energy: every matrix gets rank >= 1, then singular directions are added in
    order of (sigma^2 / sum sigma^2) / (m + n), largest first, while they fit. A matrix is not
    raised past the rank where its factors would cost as much as the dense matrix (unless its
    ``floor`` is higher). Deterministic (ties by matrix order, then index)."""
    caps, ranks, gains = [], [], []
    for i, (s, (m, n)) in enumerate(zip(spectra, shapes)):
        k = min(m, n, s.numel())
        cap = min(k, (m * n) // (m + n))
        if floor is not None:
            cap = max(cap, min(floor[i], k))
        caps.append(max(cap, 1))
        ranks.append(1)
        e = s.to(torch.float64).square()
        tot = float(e.sum())
        share = (e / tot) if tot > 0 else torch.zeros_like(e)
        gains.append(share / (m + n))
    left = budget - sum(m + n for m, n in shapes)
    if left <= 0:
        return ranks
    # candidates: (gain per parameter, matrix, index), best first; within a matrix the gains
    # do not increase, so taking them in this order keeps every matrix's set a prefix
    cand_gain = torch.cat([g[1:caps[i]] for i, g in enumerate(gains)])
    cand_mat = torch.cat([torch.full((max(caps[i] - 1, 0),), i, dtype=torch.long) for i in range(len(gains))])
    cand_idx = torch.cat([torch.arange(1, caps[i], dtype=torch.long) for i in range(len(gains))])
    if cand_gain.numel() == 0:
        return ranks
    # stable sort on -gain; candidates are already ordered by (matrix, index) for ties
    order = torch.sort(-cand_gain, stable=True).indices
    cost = [m + n for m, n in shapes]
    mats, idxs = cand_mat.tolist(), cand_idx.tolist()
    for j in order.tolist():
        i = mats[j]
        if idxs[j] != ranks[i]:  # an earlier direction of this matrix did not fit
            continue
        if cost[i] <= left:
            ranks[i] += 1
            left -= cost[i]
        if left < min(cost):
            break
    return ranks


# ---------------------------------------------------------------------------------------- plan
def _model_view(ckpt: Checkpoint) -> Checkpoint:
    from . import prepare_for_model
    return prepare_for_model(ckpt)


def _plan_from_spectra(cfg: LowRankConfig, spec: ModelSpec, tensors: Mapping, prefixes: list[str],
                       spectra: dict[str, torch.Tensor], calib: dict | None) -> dict:
    shapes = [linear_shape(tensors, p) for p in prefixes]
    uni = [uniform_rank(cfg.rank, m, n) for m, n in shapes]
    if cfg.alloc == "uniform":
        ranks = uni
    else:  # per role (ffn.key, ffn.value, ...): that role's uniform budget, spread across layers
        ranks = list(uni)
        for kind in dict.fromkeys(matrix_kind(p) for p in prefixes):
            idx = [i for i, p in enumerate(prefixes) if matrix_kind(p) == kind]
            budget = sum(uni[i] * sum(shapes[i]) for i in idx)
            got = energy_ranks([spectra[prefixes[i]] for i in idx], [shapes[i] for i in idx], budget,
                               floor=[uni[i] for i in idx] if cfg.rank >= 1 else None)
            for i, r in zip(idx, got):
                ranks[i] = r
    # an already factored target is re-factored at its stored rank at most (rank only goes down)
    ranks = [min(r, _stored_rank(tensors, p)) for p, r in zip(prefixes, ranks)]
    layers = []
    for p, (m, n), r in zip(prefixes, shapes, ranks):
        e = spectra[p].to(torch.float64).square()
        tot = float(e.sum())
        kept = float(e[:r].sum()) / tot if tot > 0 else 1.0
        layers.append({"prefix": p, "shape": [m, n], "full_rank": min(m, n), "rank": int(r),
                       "params_before": _stored_params(tensors, p),
                       "params_after": m * n if cfg.merge else r * (m + n),
                       "kept_energy": kept})
    pb = sum(x["params_before"] for x in layers)
    pa = sum(x["params_after"] for x in layers)
    factored = sum(x["rank"] * (x["shape"][0] + x["shape"][1]) for x in layers)
    dense = sum(x["shape"][0] * x["shape"][1] for x in layers)
    return {"transform": "lowrank", "plan_format": PLAN_FORMAT, "version": spec.version,
            "config": cfg.to_dict(), "calibration": calib, "layers": layers,
            "params_before": pb, "params_after": pa, "factored_share": factored / dense if dense else 1.0,
            "kept_energy_mean": sum(x["kept_energy"] for x in layers) / len(layers),
            "kept_energy_min": min(x["kept_energy"] for x in layers)}


def _calib_info(cfg: LowRankConfig, calib_tokens) -> dict | None:
    if cfg.method != "whiten":
        return None
    if calib_tokens is None:
        raise LowRankError("method 'whiten' needs calibration tokens (calib_tokens)")
    n = int(torch.as_tensor(calib_tokens).numel())
    if n < 2:
        raise LowRankError(f"calibration needs at least 2 tokens, got {n}")
    return {"tokens": n, "sha256": _tokens_digest(calib_tokens)}


def _plan_and_cache(ckpt: Checkpoint, cfg: LowRankConfig, calib_tokens, progress: bool,
                    cache_limit: int) -> tuple[dict, dict | None]:
    view = _model_view(ckpt)
    spec = detect(view.tensors, view.manifest)
    prefixes = target_prefixes(view.tensors, spec, cfg.targets)
    calib = _calib_info(cfg, calib_tokens)
    shapes = {p: linear_shape(view.tensors, p) for p in prefixes}
    # the most any rank can become: uniform rank, or (energy) the break-even rank
    def cap(p):
        m, n = shapes[p]
        r = uniform_rank(cfg.rank, m, n)
        return r if cfg.alloc == "uniform" else max(r, min(m, n, (m * n) // (m + n)))
    need = sum(8 * cap(p) * sum(shapes[p]) for p in prefixes)
    keep = need <= cache_limit
    spectra, cache = {}, ({} if keep else None)
    for p, f in iter_factors(view, cfg, prefixes, calib_tokens, progress):
        spectra[p] = f.s
        if keep:
            cache[p] = f.truncate(cap(p))
    return _plan_from_spectra(cfg, spec, view.tensors, prefixes, spectra, calib), cache


def plan(ckpt: Checkpoint, config: LowRankConfig, calib_tokens=None, progress: bool = False) -> dict:
    """Decide per-matrix ranks from the shapes and (whitened) spectra; JSON-able."""
    return _plan_and_cache(ckpt, config, calib_tokens, progress, cache_limit=0)[0]


# --------------------------------------------------------------------------------------- apply
def apply(ckpt: Checkpoint, plan: dict, calib_tokens=None, progress: bool = False,
          _cache: dict | None = None) -> Checkpoint:
    """Factor every matrix of ``plan`` to its planned rank (deterministic given the plan and the
    calibration tokens the plan was made with). Returns a new checkpoint; the input is untouched."""
    from . import check_plan
    check_plan(plan, "lowrank", "layers", PLAN_FORMAT, LowRankError)
    cfg = LowRankConfig.from_dict(plan["config"])
    view = _model_view(ckpt)
    tensors = view.tensors
    ranks = {}
    for x in plan["layers"]:
        p = x["prefix"]
        shp = linear_shape(tensors, p)
        if shp is None or list(shp) != list(x["shape"]):
            raise LowRankError(f"plan does not fit this checkpoint: '{p}' is {shp}, the plan says {tuple(x['shape'])}")
        if not 1 <= int(x["rank"]) <= min(shp):
            raise LowRankError(f"plan rank {x['rank']} for '{p}' is outside [1, {min(shp)}]")
        ranks[p] = int(x["rank"])
    prefixes = list(ranks)
    if _cache is None and cfg.method == "whiten":
        calib = _calib_info(cfg, calib_tokens)
        want = plan.get("calibration") or {}
        if want.get("sha256") and want["sha256"] != calib["sha256"]:
            raise LowRankError("the calibration tokens differ from those the plan was made with "
                               f"({calib['tokens']} tokens given, the plan used {want.get('tokens')}); "
                               "pass the same calibration text and --calib-tokens")
        factors = iter_factors(view, cfg, prefixes, calib_tokens, progress)
    elif _cache is None:
        factors = iter_factors(view, cfg, prefixes, None, progress)
    else:
        factors = ((p, _cache[p]) for p in prefixes)

    new: dict[str, torch.Tensor] = {}
    for p, f in factors:
        r = ranks[p]
        dt = _stored_dtype(tensors, p)
        u, v = f.pair(r)
        if cfg.merge:
            new[f"{p}.weight"] = (u @ v).to(dt).contiguous()
        else:
            new[f"{p}.weight_u"] = u.to(dt).contiguous()
            new[f"{p}.weight_v"] = v.to(dt).contiguous()
    return _assemble(view, plan, cfg, prefixes, new)


def _assemble(view: Checkpoint, plan: dict, cfg: LowRankConfig, prefixes: list[str],
              new: dict[str, torch.Tensor]) -> Checkpoint:
    src = view.tensors
    replaced = {n: p for p in prefixes for n in _stored_names(src, p)}
    names: list[str] = []
    done = set()
    for k in src:
        if k in replaced:
            p = replaced[k]
            if p in done:
                continue
            done.add(p)
            names.extend(n for n in (f"{p}.weight", f"{p}.weight_u", f"{p}.weight_v") if n in new)
        else:
            names.append(k)
    shapes = {k: (tuple(new[k].shape) if k in new else tensor_shape(src, k)) for k in names}
    dtypes = {k: (new[k].dtype if k in new else tensor_dtype(src, k)) for k in names}

    def load(name: str) -> torch.Tensor:
        return new[name] if name in new else src[name]

    tensors = LazyTensors(names, load, shapes, dtypes)
    ranks = {x["prefix"]: x["rank"] for x in plan["layers"]}
    rs = sorted(ranks.values())
    pb, pa = plan["params_before"], plan["params_after"]
    pct = 100.0 * pa / pb if pb else 100.0
    what = f"{len(ranks)} {cfg.targets} matrices"
    summary_txt = (f"{what} {'merged to dense' if cfg.merge else 'factored'} at R={cfg.to_dict()['rank']} "
                   f"({cfg.method}, {cfg.alloc}): ranks {rs[0]}-{rs[-1]}, params {pb:,} -> {pa:,} ({pct:.1f}%), "
                   f"kept energy mean {plan['kept_energy_mean']:.4f}")
    summary = {"method": cfg.method, "alloc": cfg.alloc, "targets": cfg.targets, "rank": cfg.to_dict()["rank"],
               "merged": cfg.merge, "ranks": ranks, "params_before": pb, "params_after": pa,
               "kept_energy_mean": plan["kept_energy_mean"], "summary": summary_txt}
    entry = {"transform": "lowrank", "options": cfg.to_dict(), "plan": plan}
    return view.with_tensors(tensors, entry=entry, lowrank=summary)


def lowrank(ckpt: Checkpoint, config: LowRankConfig, calib_tokens=None, progress: bool = False,
            cache_limit: int = CACHE_LIMIT_BYTES) -> Checkpoint:
    """plan + apply; calibrates once when the factors of all targets fit in ``cache_limit`` bytes
    (float64), else streams the calibration twice (plan, then apply)."""
    p, cache = _plan_and_cache(ckpt, config, calib_tokens, progress, cache_limit)
    return apply(ckpt, p, calib_tokens, progress, _cache=cache)

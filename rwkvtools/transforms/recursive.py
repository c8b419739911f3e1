"""Recursive RWKV (Relaxed Recursive Transformers, Bae et al., ICLR 2025): the L layers become K
shared blocks looped L/K times, each layer position relaxed by a small LoRA that gives back what
sharing lost.

* Looping (``order``): ``cycle`` runs blocks 0..K-1, then 0..K-1 again (layer l uses block
  l mod K); ``sequence`` runs each block L/K times back to back. ``keep_first``/``keep_last``
  leave the outer layers unshared; the K blocks loop over the layers in between.
* A shared block is initialised from the layers that map to it: ``stepwise`` (the K blocks take
  layers picked evenly across the shared depth, first and last included), ``average`` (the mean of
  its layers), ``lower`` (block b = the b-th shared layer).
* What is shared (``share``): ``att`` (time-mix receptance, key, value, gate, output) and ``ffn``
  (channel-mix key, value, receptance) by default. Every vector (token-shift mixes, decays, bonus,
  norms, ln_x) and the small v6/v7 low-rank matrices stay per layer unless ``share`` ties their
  groups too: ``lora`` (v6 time_maa_w1/w2, time_decay_w1/w2; v7 w1 w2 a1 a2 v1 v2 g1 g2), ``mix``
  (token-shift vectors), ``decay`` (decay, bonus, v7 w0 a0 v0 k_k k_a r_k), ``norm`` (ln1, ln2,
  ln_x); ``vectors`` = mix + decay + norm. Tied tensors are shared exactly (no relaxation).
* Relaxation: for every shared layer and shared matrix, a LoRA pair from the truncated SVD of
  D = W_layer - W_block, sqrt(S) on both sides (``svd``), or truncated in the activation-whitened
  space of the layer's own inputs (``whiten``: Grams from rwkvtools.calibrate, whitening as in the
  lowrank transform). Rank 0 is the pure recursive model; full rank reproduces the original. A
  direction with no energy (e.g. the layer a ``stepwise`` block was copied from) gets a random
  unit row in A and a zero column in B: it changes nothing until healing trains it.

Storage (read by model/shared.py): ``shared.map`` (L,) int64, ``shared.B.<name>`` for every
shared tensor, ``blocks.i.<linear>.lora_a`` (r, in) / ``lora_b`` (out, r). ``merge`` expands a
recursive checkpoint into a plain one.

API (plan/apply)::

    cfg = RecursiveConfig(blocks=6, lora_rank=16)
    p = plan(ckpt, cfg)                        # JSON-able: mapping, init sources, ranks, params
    out = apply(ckpt, p, calib_tokens)         # deterministic given the plan (and calibration)
    out = recursive(ckpt, cfg, calib_tokens)   # both
    plain = merge(out)
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch

from ..checkpoint import Checkpoint, param_count, tensor_dtype, tensor_shape
from ..errors import RwkvToolsError
from ..spec import SHARED_MAP, detect, shared_map
from ..progress import progress_bar

ORDERS = ("cycle", "sequence")
INITS = ("stepwise", "average", "lower")
METHODS = ("svd", "whiten")
GROUPS = ("att", "ffn", "lora", "mix", "decay", "norm")
GROUP_SETS = {"vectors": ("mix", "decay", "norm"), "matrices": ("att", "ffn"), "all": GROUPS}
ATT_LINEARS = ("receptance", "key", "value", "gate", "output")
FFN_LINEARS = ("key", "value", "receptance")
LORA_NAMES = ("time_maa_w1", "time_maa_w2", "time_decay_w1", "time_decay_w2",
              "w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2")
DECAY_NAMES = ("time_decay", "time_first", "time_faaaa", "w0", "a0", "v0", "k_k", "k_a", "r_k")
PLAN_FORMAT = 1


class RecursiveError(RwkvToolsError):
    """Bad recursive options, or a checkpoint the transform cannot use."""


def parse_share(share) -> tuple[str, ...]:
    """'att,ffn,lora' or a sequence -> the ordered tuple of groups (aliases expanded)."""
    items = share.split(",") if isinstance(share, str) else list(share)
    out: list[str] = []
    for it in (s.strip() for s in items):
        if not it:
            continue
        for g in GROUP_SETS.get(it, (it,)):
            if g not in GROUPS:
                raise RecursiveError(f"unknown --share group '{it}'; known: {', '.join(GROUPS + tuple(GROUP_SETS))}")
            if g not in out:
                out.append(g)
    if not out:
        raise RecursiveError("--share needs at least one group (e.g. att,ffn)")
    return tuple(g for g in GROUPS if g in out)


@dataclass(frozen=True)
class RecursiveConfig:
    blocks: int                          # K shared blocks
    order: str = "cycle"                 # cycle | sequence
    init: str = "stepwise"               # stepwise | average | lower
    lora_rank: int | str = 0             # per-layer LoRA rank (capped at min(out, in)), or "full"
    lora_method: str = "svd"             # svd | whiten
    share: tuple = ("att", "ffn")        # groups shared by the blocks
    keep_first: int = 0                  # outer layers left unshared
    keep_last: int = 0
    calib_tokens: int = 8192             # whiten: calibration tokens
    chunk_len: int = 512                 # whiten: tokens per forward during calibration
    damp: float = 1e-3                   # whiten: regulariser relative to mean(diag(G))
    seed: int = 0                        # random rows for directions with no energy

    def __post_init__(self):
        object.__setattr__(self, "share", parse_share(self.share))
        if isinstance(self.blocks, bool) or not isinstance(self.blocks, int) or self.blocks < 1:
            raise RecursiveError(f"blocks must be a positive integer, got {self.blocks!r}")
        if self.order not in ORDERS:
            raise RecursiveError(f"order must be one of {', '.join(ORDERS)}, got {self.order!r}")
        if self.init not in INITS:
            raise RecursiveError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.lora_method not in METHODS:
            raise RecursiveError(f"lora_method must be one of {', '.join(METHODS)}, got {self.lora_method!r}")
        r = self.lora_rank
        if isinstance(r, str):
            if r.strip().lower() == "full":
                object.__setattr__(self, "lora_rank", "full")
            elif r.strip().isdigit():
                object.__setattr__(self, "lora_rank", int(r))
            else:
                raise RecursiveError(f"lora_rank must be an integer >= 0 or 'full', got {r!r}")
        elif isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise RecursiveError(f"lora_rank must be an integer >= 0 or 'full', got {r!r}")
        for name in ("keep_first", "keep_last"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise RecursiveError(f"{name} must be an integer >= 0, got {v!r}")
        from ..calibrate import check_calibration_options
        check_calibration_options(RecursiveError, self.calib_tokens, self.chunk_len, self.damp)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["share"] = ",".join(self.share)
        if self.lora_method == "svd" or self.lora_rank == 0:
            for k in ("calib_tokens", "chunk_len", "damp"):
                d.pop(k)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RecursiveConfig":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


# ------------------------------------------------------------------------------------- mapping
def _fitting_keeps(n_layer: int, blocks: int, limit: int = 3) -> list[tuple[int, int]]:
    out = []
    for tot in range(0, n_layer):
        for f in range(0, tot + 1):
            m = n_layer - tot
            if m >= blocks and m % blocks == 0:
                out.append((f, tot - f))
        if len(out) >= limit:
            break
    return out[:limit]


def layer_mapping(n_layer: int, blocks: int, order: str = "cycle", keep_first: int = 0,
                  keep_last: int = 0) -> list[int]:
    """Shared block of every layer (-1: unshared). The layers between keep_first and keep_last
    must be a multiple of ``blocks``; otherwise the error says which settings would fit."""
    if order not in ORDERS:
        raise RecursiveError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
    m = n_layer - keep_first - keep_last
    if m < 1:
        raise RecursiveError(f"--keep-first {keep_first} + --keep-last {keep_last} leave no layer of the "
                             f"{n_layer} to share")
    if blocks > m or m % blocks:
        divs = [d for d in range(1, m + 1) if m % d == 0]
        keeps = _fitting_keeps(n_layer, blocks)
        alt = "; or keep " + ", ".join(f"--keep-first {f} --keep-last {l}" for f, l in keeps) + \
            f" for {blocks} blocks" if keeps else ""
        raise RecursiveError(
            f"{n_layer} layers with --keep-first {keep_first} --keep-last {keep_last} leave {m} layers to share, "
            f"which {blocks} blocks do not divide (each block must be looped the same number of times): use "
            f"--blocks {' or '.join(str(d) for d in divs)}{alt}")
    loops = m // blocks
    out = [-1] * n_layer
    for j in range(m):
        out[keep_first + j] = (j % blocks) if order == "cycle" else (j // loops)
    return out


def init_sources(mapping: list[int], blocks: int, init: str) -> dict[int, list[int]]:
    """block -> the layers whose tensors initialise it (one layer, or all of its layers for
    ``average``)."""
    mid = [i for i, b in enumerate(mapping) if b >= 0]
    m = len(mid)
    out: dict[int, list[int]] = {}
    for b in range(blocks):
        own = [i for i in mid if mapping[i] == b]
        if init == "average":
            out[b] = own
        elif init == "lower":
            out[b] = [mid[b]]
        elif init == "stepwise":
            out[b] = [mid[round(b * (m - 1) / (blocks - 1))] if blocks > 1 else mid[0]]
        else:
            raise RecursiveError(f"init must be one of {', '.join(INITS)}, got {init!r}")
    return out


def group_of(rest: str) -> str | None:
    """The --share group of a per-layer tensor ('att.key.weight' -> 'att'); None: always per layer."""
    parts = rest.split(".")
    if len(parts) == 3 and parts[2] == "weight":
        if parts[0] == "att" and parts[1] in ATT_LINEARS:
            return "att"
        if parts[0] == "ffn" and parts[1] in FFN_LINEARS:
            return "ffn"
    if parts[0] in ("ln1", "ln2") or rest.startswith("att.ln_x."):
        return "norm"
    if len(parts) == 2 and parts[0] in ("att", "ffn"):
        n = parts[1]
        if parts[0] == "att" and n in LORA_NAMES:
            return "lora"
        if parts[0] == "att" and n in DECAY_NAMES:
            return "decay"
        if n.startswith(("time_mix_", "time_maa_", "x_")):
            return "mix"
    return None


# stored forms of a linear that are not its dense matrix (lowrank factors, int8/int4 storage)
_NOT_DENSE = ("weight_u", "weight_v", "weight_int8", "weight_int4", "weight_scale", "weight_zero")


def _layer_names(tensors: Mapping, n_layer: int) -> list[list[str]]:
    out: list[list[str]] = [[] for _ in range(n_layer)]
    for k in tensors:
        if k.startswith("blocks."):
            i, rest = k.split(".", 2)[1:]
            out[int(i)].append(rest)
    return out


# ---------------------------------------------------------------------------------------- plan
def plan(ckpt: Checkpoint, config: RecursiveConfig) -> dict:
    """Decide everything: the mapping, each block's source layers, the shared and tied names, the
    LoRA rank of every shared matrix, the parameter counts. JSON-able; ``apply`` follows it."""
    from . import prepare_for_model
    ckpt = prepare_for_model(ckpt)
    t = ckpt.tensors
    if SHARED_MAP in t:
        raise RecursiveError("this checkpoint is already recursive; run 'rwkvtools recursive --merge' on it "
                             "first (or start from the original)")
    spec = detect(t, ckpt.manifest)
    L = spec.n_layer
    mapping = layer_mapping(L, config.blocks, config.order, config.keep_first, config.keep_last)
    sources = init_sources(mapping, config.blocks, config.init)
    names = _layer_names(t, L)
    shared_layers = [i for i in range(L) if mapping[i] >= 0]
    # names shared, per block: every name of the chosen groups that some layer of the block has
    shared: dict[str, str] = {}  # rest -> group
    for i in shared_layers:
        for rest in names[i]:
            head, _, suffix = rest.rpartition(".")
            if suffix in _NOT_DENSE and group_of(f"{head}.weight") in config.share:
                raise RecursiveError(
                    f"linear 'blocks.{i}.{head}' is not a dense matrix ({suffix}: "
                    f"{'low-rank factors' if suffix in ('weight_u', 'weight_v') else 'quantized'}); recursive ties "
                    "and relaxes dense matrices: apply it before lowrank/quantize"
                    + (" (or merge the factors first: rwkvtools lowrank SRC DENSE --merge --method svd --rank 100000)"
                       if suffix in ("weight_u", "weight_v") else ", on the dense checkpoint"))
            g = group_of(rest)
            if g in config.share:
                shared[rest] = g
    notes = []
    for g in config.share:
        if not any(x == g for x in shared.values()):
            notes.append(f"share group '{g}': RWKV v{spec.version} has no such tensors; nothing tied for it")
    linears = [r for r, g in shared.items() if g in ("att", "ffn")]
    for i in shared_layers:
        for rest in linears:
            if rest not in names[i]:
                p = f"blocks.{i}.{rest[:-len('.weight')]}"
                if f"{p}.weight_u" in t or f"{p}.shape" in t or f"{p}.qweight" in t:
                    raise RecursiveError(f"linear '{p}' is not a dense matrix (low-rank or quantized); recursive "
                                         "needs the dense checkpoint: apply it before lowrank/quantize")
                raise RecursiveError(f"layer {i} has no '{rest}' although other layers do: not a regular checkpoint")
    for rest in shared:
        shp = {tuple(tensor_shape(t, f"blocks.{i}.{rest}")) for i in shared_layers if rest in names[i]}
        if len(shp) > 1:
            raise RecursiveError(f"'{rest}' has different shapes in different layers ({sorted(shp)}): layers that "
                                 "differ in shape cannot share a block")
    ranks: dict[str, int] = {}
    shapes: dict[str, list[int]] = {}
    for rest in linears:
        s = tensor_shape(t, f"blocks.{shared_layers[0]}.{rest}")
        shapes[rest] = [int(s[0]), int(s[1])]
        full = min(s)
        ranks[rest[:-len(".weight")]] = full if config.lora_rank == "full" else min(int(config.lora_rank), full)
    # parameter counts
    total = ckpt.num_params()
    removed = 0
    for i in shared_layers:
        for rest in names[i]:
            if rest in shared:
                removed += math.prod(tensor_shape(t, f"blocks.{i}.{rest}"))
    block_params = 0
    for b in range(config.blocks):
        for rest in shared:
            have = [i for i in shared_layers if mapping[i] == b and rest in names[i]]
            if have:
                block_params += math.prod(tensor_shape(t, f"blocks.{have[0]}.{rest}"))
    lora_params = sum(ranks[r[:-len(".weight")]] * (shapes[r][0] + shapes[r][1]) for r in linears) * len(shared_layers)
    unique = total - removed + block_params + lora_params
    return {"transform": "recursive", "plan_format": PLAN_FORMAT, "config": config.to_dict(),
            "version": spec.version, "n_layer": L, "mapping": mapping,
            "block_sources": {str(b): v for b, v in sources.items()},
            "shared": sorted(shared, key=lambda r: (GROUPS.index(shared[r]), r)),
            "linears": {r[:-len(".weight")]: {"shape": shapes[r], "rank": ranks[r[:-len(".weight")]]} for r in linears},
            "params_original": total, "params_block": block_params, "params_lora": lora_params,
            "unique_params": unique, "notes": notes}


# --------------------------------------------------------------------------------------- apply
def _progress(total: int, desc: str, enabled: bool):
    return progress_bar(total, desc, enabled, unit="layer")


def _block_tensor(t: Mapping, rest: str, layers: list[int], own: list[int], init: str) -> torch.Tensor:
    """The shared value of ``rest`` for a block: the source layer's tensor, or the mean."""
    have = [i for i in layers if f"blocks.{i}.{rest}" in t]
    if not have:  # the source layer lacks it (v7 layer 0 has no v0/v1/v2): nearest of the block
        have = [min((i for i in own if f"blocks.{i}.{rest}" in t), key=lambda i: abs(i - layers[0]))]
    dt = tensor_dtype(t, f"blocks.{have[0]}.{rest}")
    if len(have) == 1:
        return t[f"blocks.{have[0]}.{rest}"]
    acc = None
    for i in have:
        x = t[f"blocks.{i}.{rest}"].to(torch.float64)
        acc = x if acc is None else acc + x
    return (acc / len(have)).to(dt).contiguous()


def _lora(d: torch.Tensor, r: int, gram, cfg: RecursiveConfig, gen: torch.Generator):
    """(A (r, in), B (out, r)) float64 with B A the best rank-r approximation of d (plain or
    whitened); directions with no energy get a random unit row in A and a zero column in B."""
    from .lowrank import svd_factors, whitened_factors
    if gram is not None:
        f = whitened_factors(d, gram.xtx.cpu(), gram.n, cfg.damp)
    else:
        f = svd_factors(d)
    u, v = f.pair(r)  # (out, r), (r, in)
    # balance each component's two factors (same norm; the product is unchanged): whitening puts
    # L^-1 into A only, and Adam's per-element steps suit factors of equal scale
    nu, nv = u.norm(dim=0), v.norm(dim=1)
    ok = (nu > 0) & (nv > 0)
    c = torch.where(ok, (nv / nu.clamp_min(1e-300)).sqrt(), torch.ones_like(nu))
    u, v = u * c, v / c[:, None]
    s = f.s[:r]
    dead = s <= (float(f.s[0]) * 1e-9 if f.s.numel() and float(f.s[0]) > 0 else math.inf)
    if bool(dead.any()):
        k = int(dead.sum())
        rnd = torch.randn(k, d.shape[1], generator=gen, dtype=torch.float64)
        rnd = rnd / rnd.norm(dim=1, keepdim=True).clamp_min(1e-12)
        v = v.clone()
        u = u.clone()
        v[dead] = rnd
        u[:, dead] = 0.0
    return v, u


def apply(ckpt: Checkpoint, plan: dict, calib_tokens=None, progress: bool = False) -> Checkpoint:
    """Build the recursive checkpoint of ``plan``: shared blocks, tied tensors, per-layer LoRA
    factors, ``shared.map``. The input is untouched; deterministic given the plan (and calibration)."""
    from . import check_plan, prepare_for_model
    check_plan(plan, "recursive", "mapping", PLAN_FORMAT, RecursiveError)
    cfg = RecursiveConfig.from_dict(plan["config"])
    ckpt = prepare_for_model(ckpt)
    t = ckpt.tensors
    if SHARED_MAP in t:
        raise RecursiveError("this checkpoint is already recursive; merge it first")
    spec = detect(t, ckpt.manifest)
    mapping = [int(b) for b in plan["mapping"]]
    if spec.n_layer != len(mapping):
        raise RecursiveError(f"plan is for {len(mapping)} layers, the checkpoint has {spec.n_layer}")
    sources = {int(b): v for b, v in plan["block_sources"].items()}
    shared = list(plan["shared"])
    shared_set = set(shared)
    linears = plan["linears"]
    L = spec.n_layer
    shared_layers = [i for i in range(L) if mapping[i] >= 0]

    # 1. shared blocks
    block: dict[str, torch.Tensor] = {}
    for b in range(cfg.blocks):
        own = [i for i in shared_layers if mapping[i] == b]
        for rest in shared:
            if any(f"blocks.{i}.{rest}" in t for i in own):
                block[f"shared.{b}.{rest}"] = _block_tensor(t, rest, sources[b], own, cfg.init)

    # 2. LoRA factors per shared layer
    lora: dict[str, torch.Tensor] = {}
    want = {f"blocks.{i}.{p}" for i in shared_layers for p, x in linears.items() if x["rank"] > 0}
    gen = torch.Generator().manual_seed(cfg.seed)

    def relax(prefix: str, gram=None):
        i, p = int(prefix.split(".")[1]), prefix.split(".", 2)[2]
        r = linears[p]["rank"]
        w_name = f"{prefix}.weight"
        dt = tensor_dtype(t, w_name)
        d = t[w_name].to(torch.float64) - block[f"shared.{mapping[i]}.{p}.weight"].to(torch.float64)
        a, bm = _lora(d, r, gram, cfg, gen)
        lora[f"{prefix}.lora_a"] = a.to(dt).contiguous()
        lora[f"{prefix}.lora_b"] = bm.to(dt).contiguous()

    if want and cfg.lora_method == "whiten":
        if calib_tokens is None:
            raise RecursiveError("lora_method 'whiten' needs calibration tokens")
        from ..calibrate import calibrate_blocks
        from ..model import build_model
        model = build_model(ckpt, dtype=torch.float32)
        bar = _progress(L, "recursive calibrate+whiten", progress)
        seen = set()
        for _, grams in calibrate_blocks(model, calib_tokens, lambda p: p in want, chunk_len=cfg.chunk_len):
            for prefix in sorted(grams):
                relax(prefix, grams[prefix])
                seen.add(prefix)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        if want - seen:  # every relaxed linear runs in the model; this would be a bug
            raise RecursiveError(f"calibration saw no inputs for {', '.join(sorted(want - seen)[:4])}")
    elif want:
        bar = _progress(len(shared_layers), "recursive svd", progress)
        for i in shared_layers:
            for p in linears:
                if f"blocks.{i}.{p}" in want:
                    relax(f"blocks.{i}.{p}")
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()

    # 3. assemble: original order, shared names dropped from shared layers, LoRA after its layer
    out: dict[str, torch.Tensor] = {}
    for k in t:
        if k.startswith("blocks."):
            i, rest = k.split(".", 2)[1:]
            if mapping[int(i)] >= 0 and rest in shared_set:
                p = rest[:-len(".weight")] if rest.endswith(".weight") else None
                if p in linears and f"{k[:-len('.weight')]}.lora_a" in lora:
                    out[f"{k[:-len('.weight')]}.lora_a"] = lora[f"{k[:-len('.weight')]}.lora_a"]
                    out[f"{k[:-len('.weight')]}.lora_b"] = lora[f"{k[:-len('.weight')]}.lora_b"]
                continue
        out[k] = t[k]
    out.update(block)
    out[SHARED_MAP] = torch.tensor(mapping, dtype=torch.int64)

    unique = sum(param_count(out, k) for k in out if k != SHARED_MAP)
    if unique != plan["unique_params"]:  # the plan's count is a formula; this checks it
        raise RecursiveError(f"internal: {unique} parameters stored, the plan counted {plan['unique_params']}")
    nbytes = sum(v.numel() * v.element_size() for v in out.values())
    ranks = {p: x["rank"] for p, x in linears.items()}
    summary = {"blocks": cfg.blocks, "order": cfg.order, "init": cfg.init, "mapping": mapping,
               "keep_first": cfg.keep_first, "keep_last": cfg.keep_last, "share": list(cfg.share),
               "lora_method": cfg.lora_method, "ranks": ranks, "unique_params": unique,
               "params_original": plan["params_original"], "bytes": nbytes,
               "summary": describe_mapping(mapping, cfg.blocks, cfg.order, ranks, unique, plan["params_original"],
                                           nbytes),
               **({"notes": plan["notes"]} if plan.get("notes") else {})}
    entry = {"transform": "recursive", "options": cfg.to_dict(),
             "plan": {k: plan[k] for k in ("mapping", "block_sources", "shared", "linears", "params_original",
                                           "params_block", "params_lora", "unique_params")}}
    return ckpt.with_tensors(out, entry=entry, recursive=summary)


def recursive(ckpt: Checkpoint, config: RecursiveConfig, calib_tokens=None, progress: bool = False) -> Checkpoint:
    """plan + apply."""
    return apply(ckpt, plan(ckpt, config), calib_tokens, progress)


def describe_mapping(mapping: list[int], blocks: int, order: str, ranks: dict, unique: int, original: int,
                     nbytes: int | None = None) -> str:
    lay = " ".join("-" if b < 0 else str(b) for b in mapping)
    rs = sorted(set(ranks.values())) or [0]
    rtxt = str(rs[0]) if len(rs) == 1 else f"{rs[0]}-{rs[-1]}"
    pct = 100.0 * unique / original if original else 100.0
    return (f"{blocks} shared blocks ({order}), layers -> blocks [{lay}], LoRA rank {rtxt}, "
            f"unique parameters {unique:,} of {original:,} ({pct:.1f}%)"
            + (f", {nbytes:,} bytes" if nbytes is not None else ""))


# --------------------------------------------------------------------------------------- merge
def merge(ckpt: Checkpoint) -> Checkpoint:
    """Expand a recursive checkpoint into a plain one: W_i = W_block + lora_b @ lora_a for every
    shared matrix, tied tensors copied to every layer; ``shared.*`` and the LoRA factors dropped."""
    from ..model.shared import is_shared_matrix, layer_lacks
    t = ckpt.tensors
    mp = shared_map(t)
    if mp is None:
        raise RecursiveError("not a recursive checkpoint (no 'shared.map'): nothing to merge")
    groups: dict[int, list[str]] = {}
    for k in t:
        if k.startswith("shared.") and k != SHARED_MAP:
            parts = k.split(".", 2)
            if len(parts) < 3 or not parts[1].isdigit():
                raise RecursiveError(f"tensor '{k}': shared tensors are named 'shared.<block>.<name>'")
            groups.setdefault(int(parts[1]), []).append(parts[2])
    for b in set(mp):
        if b >= 0 and b not in groups:
            raise RecursiveError(f"'{SHARED_MAP}' maps a layer to block {b}, which stores no tensors")
    new: dict[str, torch.Tensor] = {}
    for i, b in enumerate(mp):
        if b < 0:
            continue
        for rest in groups[b]:
            name = f"blocks.{i}.{rest}"
            if name in t or layer_lacks(i, rest):
                continue
            src = t[f"shared.{b}.{rest}"]
            if is_shared_matrix(rest, tuple(src.shape)):
                p = name[:-len(".weight")]
                if f"{p}.lora_a" in t and f"{p}.lora_b" in t:
                    w = src.to(torch.float64) + t[f"{p}.lora_b"].to(torch.float64) @ t[f"{p}.lora_a"].to(torch.float64)
                    new[name] = w.to(src.dtype).contiguous()
                    continue
            new[name] = src
    keep = {k: t[k] for k in t if not (k.startswith("shared.") or k.endswith((".lora_a", ".lora_b")))}
    keep.update(new)
    names = sorted(keep, key=_plain_order)
    manifest_rec = ckpt.manifest.get("recursive")
    out = ckpt.with_tensors({k: keep[k] for k in names},
                            entry={"transform": "recursive-merge", "options": {},
                                   "results": {"from": (manifest_rec or {}).get("summary", "recursive checkpoint")}})
    out.manifest.pop("recursive", None)
    return out


def _plain_order(name: str):
    if name.startswith("emb."):
        return (0, 0, name)
    if name.startswith("blocks."):
        parts = name.split(".", 2)
        return (1, int(parts[1]), name)
    return (2, 0, name)

"""Weight quantization: int8, int4 (rwkvtools' packed format) and ggml's block formats (rwkv.cpp
``.bin``), by round-to-nearest or GPTQ.

Schemes
* ``int8``: symmetric, one float32 scale per output channel (8 + 32/in bits per weight).
* ``int4``: asymmetric per group of ``group_size`` (32/64/128) input columns, fp16 scale and
  fp16 integer zero point per group, two values per byte (4 + 32/G bits per weight).
* ``Q4_0 Q4_1 Q5_0 Q5_1 Q8_0``: ggml's blocks of 32, exactly as ggml's reference quantizer
  (``rtn``: byte for byte what rwkv.cpp's quantizer writes), written as an rwkv.cpp ``.bin``.

What is quantized
* int8/int4: the attention and channel-mix matrices (every ``blocks.i.{att,ffn}.*.weight``
  linear); kept in high precision: embedding, head, every 1-D and 3-D tensor, decays, bonuses,
  token-shift mixes, norms and the small LoRA matrices of v6/v7 (the rule the RWKV runtimes
  share). ``include`` adds linears (e.g. ``head.weight``); ``skip`` removes tensors (skip wins).
* ggml: rwkv.cpp's own rule (``io.rwkvcpp.needs_quant``: 2-D in the file except emb/head and the
  v7 LoRA/r_k), so that the files match rwkv.cpp's; ``skip`` may keep some of them.

Methods: ``rtn`` rounds every group on the original weights; ``gptq`` quantizes each linear's
columns in order and compensates the rounding error on the remaining columns with the inverse
Hessian of its inputs (``rwkvtools.gptq``), with the inputs collected block by block through the
model on calibration text (``rwkvtools.calibrate``, sequentially: block i+1 is calibrated on the
outputs of the already quantized block i). Matrices the model does not run as linears (the v6
LoRA matrices rwkv.cpp quantizes) and the head use rtn.

API::

    cfg = QuantizeConfig(scheme="int4", method="gptq", group_size=64)
    p = plan(ckpt, cfg)                          # JSON-able: per tensor what will be done
    out = apply(ckpt, p, calib_tokens)           # deterministic given the plan and the tokens
    out = quantize(ckpt, cfg, calib_tokens)      # both
    write_quantized(out, "model-int4.safetensors")   # or "model-Q5_1.bin" for ggml schemes

The result carries one history entry and a ``quantized`` summary (per tensor: scheme, method,
bits per weight, relative error) in the manifest, which ``rwkvtools inspect`` shows.
"""
from __future__ import annotations

import fnmatch
import hashlib
import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from ..checkpoint import Checkpoint, LazyTensors, tensor_dtype, tensor_shape
from ..gptq import Grid, QuantizeError, gptq, make_grid, output_rel_error, rtn
from ..io import ggml_quants
from ..model.quantized import pack_int4, stored_kind

INT_SCHEMES = ("int8", "int4")
GGML_SCHEMES = tuple(ggml_quants.BLOCK_TYPES)          # 32-value blocks: rwkv.cpp .bin or GGUF
KQUANT_SCHEMES = ("Q4_K", "Q5_K", "Q6_K")              # 256-value super-blocks: GGUF only
BLOCK_SCHEMES = GGML_SCHEMES + KQUANT_SCHEMES
SCHEMES = INT_SCHEMES + BLOCK_SCHEMES
TARGETS = ("rwkvcpp", "gguf")
METHODS = ("rtn", "gptq")
GROUP_SIZES = (32, 64, 128)
PLAN_FORMAT = 1
# rwkv.cpp's converter stores these (2-D, quantized by its rule) transposed (io/rwkvcpp.py)
V6_TRANSPOSED = ("time_maa_w1", "time_decay_w1", "time_decay_w2")


from ..calibrate import calibration_tokens  # noqa: E402,F401  (one implementation, re-exported)
from ..progress import progress_bar


@dataclass(frozen=True)
class QuantizeConfig:
    scheme: str                      # int8 | int4 | Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q4_K | Q5_K | Q6_K
    method: str = "rtn"              # rtn | gptq
    group_size: int = 64             # int4 only: 32 | 64 | 128 input columns per scale/zero
    skip: tuple = ()                 # globs of tensor names (or linear prefixes) to keep
    include: tuple = ()              # globs of extra linears to quantize (int8/int4)
    calib_tokens: int = 8192         # gptq: calibration tokens
    chunk_len: int = 512             # gptq: tokens per forward call during calibration
    damp: float = 0.01               # gptq: Hessian dampening, relative to mean(diag H)
    block: int = 128                 # gptq: columns updated lazily together (speed only)
    act_order: bool = False          # gptq: columns by decreasing input energy (static groups)
    clip: bool = False               # search a shrunk range per group (gptq; rtn for int8/int4)
    target: str = "rwkvcpp"          # block schemes: rwkv.cpp .bin (its tensor rule) or "gguf" (llama.cpp's)
    tune_steps: int = 0              # > 0: train the scales end to end afterwards (rwkvtools.tune)
    tune_lr: float = 3e-3            # tuning: Adam learning rate of the log-scales
    tune_tokens: int = 262144        # tuning: calibration tokens drawn from (the last eighth held out)
    tune_batch: int = 16             # tuning: sequences per step
    tune_seq: int = 512              # tuning: tokens per sequence

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise QuantizeError(f"unknown scheme {self.scheme!r}; known: {', '.join(SCHEMES)}")
        if self.method not in METHODS:
            raise QuantizeError(f"unknown method {self.method!r}; known: {', '.join(METHODS)}")
        if self.scheme == "int4" and self.group_size not in GROUP_SIZES:
            raise QuantizeError(f"int4 group size must be one of {', '.join(map(str, GROUP_SIZES))}, got {self.group_size!r}")
        for k in ("skip", "include"):
            v = getattr(self, k)
            if isinstance(v, str) or not all(isinstance(g, str) and g for g in v):
                raise QuantizeError(f"{k} must be a list of non-empty glob strings, got {v!r}")
            object.__setattr__(self, k, tuple(v))
        if self.target not in TARGETS:
            raise QuantizeError(f"unknown target {self.target!r}; known: {', '.join(TARGETS)}")
        if self.scheme in KQUANT_SCHEMES and self.target != "gguf":
            raise QuantizeError(f"{self.scheme} is a K-quant (256-value super-blocks), which rwkv.cpp does not read: "
                                "write a .gguf file (llama.cpp), or use Q4_0..Q8_0 for rwkv.cpp")
        if self.include and self.scheme in BLOCK_SCHEMES:
            raise QuantizeError("--include is not available for ggml formats: the runtime's own quantizer rule decides "
                                "which tensors are quantized (rwkv.cpp's, or llama.cpp's for GGUF); "
                                "use --skip to keep some of them")
        from ..calibrate import check_calibration_options
        check_calibration_options(QuantizeError, self.calib_tokens, self.chunk_len, self.damp, damp_positive=True)
        if not isinstance(self.block, int) or self.block < 1:
            raise QuantizeError(f"block must be a positive integer, got {self.block!r}")
        self._check_tuning()
        if self.clip and self.method == "rtn" and self.scheme in BLOCK_SCHEMES:
            raise QuantizeError("clip with rtn is not available for ggml formats: rtn writes exactly the bytes of "
                                "ggml's reference quantizer; use --method gptq for searched block scales")
        if self.clip and self.scheme in KQUANT_SCHEMES:  # refused here, before any file is read (was mid-run)
            raise QuantizeError(f"{self.scheme}: --clip is not available for K-quants (ggml's scale search is used)")

    def _check_tuning(self):
        for k in ("tune_steps", "tune_tokens", "tune_batch", "tune_seq"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if k == "tune_steps" else 1):
                raise QuantizeError(f"{k} must be {'a non-negative' if k == 'tune_steps' else 'a positive'} "
                                    f"integer, got {v!r}")
        if self.tune_seq < 2 or self.tune_tokens < 4:
            raise QuantizeError("tuning needs sequences of at least 2 tokens and at least 4 calibration tokens")
        if not (isinstance(self.tune_lr, (int, float)) and math.isfinite(self.tune_lr) and self.tune_lr > 0):
            raise QuantizeError(f"tune_lr must be a positive number, got {self.tune_lr!r}")
        if self.tune_steps and self.scheme in KQUANT_SCHEMES:
            raise QuantizeError(f"scale tuning is not available for the K-quants ({self.scheme}): their scales are "
                                "6-bit codes under a super-block scale; use Q4_0..Q8_0, int8 or int4")

    @property
    def tuning(self) -> bool:
        return self.tune_steps > 0

    @property
    def is_ggml(self) -> bool:
        return self.scheme in BLOCK_SCHEMES

    def grid(self, qtype: str | None = None) -> Grid:
        """The grid of the scheme, or of a tensor's own block type (GGUF fallbacks)."""
        return make_grid(qtype or self.scheme, self.group_size)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["skip"], d["include"] = list(self.skip), list(self.include)
        if self.scheme != "int4":
            d.pop("group_size")
        if self.scheme not in BLOCK_SCHEMES:
            d.pop("target")
        if self.method == "rtn":
            for k in ("calib_tokens", "damp", "block", "act_order") + (() if self.tuning else ("chunk_len",)):
                d.pop(k)
        if not self.tuning:
            for k in ("tune_steps", "tune_lr", "tune_tokens", "tune_batch", "tune_seq"):
                d.pop(k)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "QuantizeConfig":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        for k in ("skip", "include"):
            if k in known:
                known[k] = tuple(known[k])
        return cls(**known)


# ------------------------------------------------------------------------------- what stays
def keep_reason(name: str, shape: tuple) -> str:
    """Why a tensor stays in high precision under the default int8/int4 rule."""
    last = name.rsplit(".", 1)[-1]
    if last in ("weight_u", "weight_v"):
        return "low-rank factor (factored linears are not quantized)"
    if name == "emb.weight":
        return "embedding"
    if name == "head.weight":
        return "head"
    if ".ln" in name or name.startswith("ln_"):
        return "norm"
    if any(s in name for s in (".time_mix", ".time_maa_")) and not last.endswith(("w1", "w2")) \
            or last in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "x_rwkvag"):
        return "token-shift mix"
    if last in ("time_decay", "time_first", "time_faaaa", "w0", "a0", "v0", "k_k", "k_a", "r_k"):
        return "decay / bonus / per-channel vector"
    if last.endswith(("w1", "w2")) or last in ("a1", "a2", "v1", "v2", "g1", "g2"):
        return "small LoRA matrix"
    if len(shape) != 2:
        return f"{len(shape)}-D tensor"
    return "not a linear layer"


def _match(globs, name: str, prefix: str | None = None) -> str | None:
    for g in globs:
        if fnmatch.fnmatchcase(name, g) or (prefix is not None and fnmatch.fnmatchcase(prefix, g)):
            return g
    return None


def _prefix_of(name: str) -> str | None:
    return name[:-len(".weight")] if name.endswith(".weight") else None


# ----------------------------------------------------------------------------------------- plan
def _model_view(ckpt: Checkpoint) -> Checkpoint:
    from . import prepare_for_model
    return prepare_for_model(ckpt)


def _refuse_quantized(tensors) -> None:
    from ..spec import SHARED_MAP
    if SHARED_MAP in tensors:
        raise QuantizeError("this is a recursive checkpoint (its layers share blocks, 'shared.*' tensors), whose "
                            "shared matrices quantize does not store; expand it first with `rwkvtools recursive "
                            "SRC PLAIN --merge` and quantize PLAIN")
    for k in tensors:
        if k.endswith((".weight_int8", ".weight_int4")):
            raise QuantizeError(f"this checkpoint is already quantized ('{k}'); quantize the original "
                                "(dense) checkpoint instead")


def _file_shapes(view: Checkpoint, spec) -> dict[str, tuple]:
    """Shapes in rwkv.cpp's file layout of every tensor that is 2-D in the training form (the only
    ones that can be 2-D in the file; v5 decays become 3-D, v6 LoRA matrices are transposed)."""
    from ..io import rwkvcpp
    rwkvcpp.check_writable(view)  # refuse layouts rwkv.cpp cannot load before any work is done
    out = {}
    t = view.tensors
    for name, make in rwkvcpp.file_records(view):
        if name in t and len(tensor_shape(t, name)) == 2:
            out[name] = tuple(make().shape)  # one tensor at a time
    return out


def _base_type(view: Checkpoint) -> str:
    """rwkv.cpp base type of the non-quantized tensors: FP16 when the matrices are stored in 16
    bits (the FP16 file rwkv.cpp's quantizer would have read), else FP32."""
    sf = view.manifest.get("source_format") or {}
    if sf.get("format") == "rwkvcpp":
        return "FP16" if sf.get("data_type") == "FP16" else "FP32"
    t = view.tensors
    if "blocks.0.ffn.key.weight" in t and tensor_dtype(t, "blocks.0.ffn.key.weight") in (torch.float16, torch.bfloat16):
        return "FP16"
    return "FP32"


def plan(ckpt: Checkpoint, config: QuantizeConfig) -> dict:
    """Decide per tensor what is quantized (and how) and what stays, with the reason; JSON-able."""
    from ..spec import detect, linear_prefixes
    if not isinstance(config, QuantizeConfig):
        raise QuantizeError("config must be a QuantizeConfig")
    view = _model_view(ckpt)
    t = view.tensors
    _refuse_quantized(t)
    spec = detect(t, view.manifest)
    grid = config.grid()
    linears = {f"{p}.weight": p for p in linear_prefixes(spec) if f"{p}.weight" in t}
    tensors: dict[str, dict] = {}
    kept: dict[str, str] = {}
    used_skip, used_include = set(), set()
    factored = sorted({n.rsplit(".", 1)[0] for n in t if n.endswith(".weight_u")})
    if config.is_ggml and factored:  # the file holds dense matrices: the writer would multiply the factors
        from .lowrank import merge_hint  # out and round them itself (RTN, outside this plan and its report)
        raise QuantizeError(f"{config.scheme}: {'GGUF' if config.target == 'gguf' else 'rwkv.cpp'} files hold dense "
                            f"matrices, and {len(factored)} linears here are low-rank factors "
                            f"({', '.join(factored[:2])}{', ...' if len(factored) > 2 else ''}); merge them first "
                            f"({merge_hint(t)}) and quantize the dense model, or use int8/int4 (.safetensors)")
    if config.is_ggml and config.target == "gguf":
        tensors, kept, used_skip = _plan_gguf(view, config)
    elif config.is_ggml:
        fshape = _file_shapes(view, spec)
        from ..io.rwkvcpp import needs_quant
        for name in t:
            shape = tuple(tensor_shape(t, name))
            fs = fshape.get(name)
            if fs is None or not needs_quant(name, len(fs)):
                kept[name] = keep_reason(name, shape) if name not in fshape else "kept by rwkv.cpp's quantizer rule"
                continue
            g = _match(config.skip, name, _prefix_of(name))
            if g:
                used_skip.add(g)
                kept[name] = f"--skip {g}"
                continue
            if fs[1] % 32:
                raise QuantizeError(grid._bad_row(name, fs, 32))
            lin = linears.get(name)
            tensors[name] = {"prefix": lin, "shape": list(fs), "layout": "transposed" if (spec.major == 6 and name.rsplit(".", 1)[-1] in V6_TRANSPOSED) else "same",
                             "method": config.method if lin and lin != "head" else "rtn", "qtype": config.scheme}
    else:
        for name in t:
            shape = tuple(tensor_shape(t, name))
            p = linears.get(name)
            default = p is not None and p != "head" and len(shape) == 2
            inc = _match(config.include, name, _prefix_of(name))
            if inc:
                used_include.add(inc)
                if p is None or len(shape) != 2:
                    raise QuantizeError(f"--include {inc} matches '{name}', which is not a linear layer: int8/int4 "
                                        "can only store linears (attention/FFN matrices and head.weight); "
                                        f"it stays in high precision ({keep_reason(name, shape)})")
            if not (default or inc):
                kept[name] = keep_reason(name, shape)
                continue
            g = _match(config.skip, name, p)
            if g:
                used_skip.add(g)
                kept[name] = f"--skip {g}"
                continue
            grid.check(name, shape)
            tensors[name] = {"prefix": p, "shape": list(shape),
                             "method": config.method if p != "head" else "rtn"}
    warnings = [f"--skip {g} matches no tensor that would be quantized" for g in config.skip if g not in used_skip]
    warnings += [f"--include {g} matches no tensor" for g in config.include if g not in used_include]
    if not tensors:
        if factored and not config.skip:
            from .lowrank import merge_hint
            raise QuantizeError(f"nothing to quantize: the linears are low-rank factors ({', '.join(factored[:3])}"
                                f"{', ...' if len(factored) > 3 else ''}), which int8/int4 do not store; quantize "
                                f"before lowrank, or merge them first ({merge_hint(t)})")
        raise QuantizeError("nothing to quantize: every tensor is kept (check --skip)")
    n_q = sum(math.prod(e["shape"]) for e in tensors.values())
    bits_q = sum(_grid(config, e).bits_per_weight(e["shape"][1]) * math.prod(e["shape"]) for e in tensors.values())
    out = {"transform": "quantize", "plan_format": PLAN_FORMAT, "version": spec.version,
           "config": config.to_dict(), "tensors": tensors, "kept": kept,
           "quantized_params": n_q, "bits_per_weight": bits_q / n_q, "warnings": warnings}
    if config.is_ggml:
        out["base_type"] = _base_type(view)
        fb = {n: e["qtype"] for n, e in tensors.items() if e["qtype"] != config.scheme}
        if fb:
            out["fallbacks"] = fb
    return out


def _grid(cfg: QuantizeConfig, entry: dict) -> Grid:
    return cfg.grid(entry.get("qtype"))


def _plan_gguf(view: Checkpoint, config: QuantizeConfig):
    """llama.cpp's rule: the large matrices of a v6/v7 model (time-mix receptance/key/value/gate/
    output, channel-mix key/value/receptance) are quantized; a matrix whose rows do not fit the
    block size gets llama.cpp's fallback type (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0) or stays
    in float when even that does not fit."""
    from ..io.gguf_io import _FALLBACK, gguf_plan
    _, outs, _ = gguf_plan(view)
    block = {t: (256 if t in KQUANT_SCHEMES else 32) for t in BLOCK_SCHEMES}
    tensors, kept, used_skip = {}, {}, set()
    matrices = {}
    for o in outs:
        if o.role == "matrix" and o.linear:
            matrices[f"{o.linear}.weight"] = o
    for name in view.tensors:
        o = matrices.get(name)
        if o is None:
            kept[name] = "kept by llama.cpp's quantizer rule (GGUF)"
            continue
        g = _match(config.skip, name, o.linear)
        if g:
            used_skip.add(g)
            kept[name] = f"--skip {g}"
            continue
        shape = tuple(tensor_shape(view.tensors, name))
        qtype = config.scheme
        if shape[1] % block[qtype]:
            qtype = _FALLBACK.get(qtype, qtype)
            if shape[1] % block[qtype]:
                kept[name] = f"rows of {shape[1]} fit no block of {config.scheme} or its fallback (F16 in llama.cpp)"
                continue
        tensors[name] = {"prefix": o.linear, "shape": list(shape), "layout": "same",
                         "method": config.method, "qtype": qtype}
    return tensors, kept, used_skip


# ---------------------------------------------------------------------------------------- apply
def _tokens_digest(tokens) -> str:
    tt = torch.as_tensor(tokens, dtype=torch.int64).flatten().contiguous()
    return hashlib.sha256(tt.numpy().tobytes()).hexdigest()


def _bar(total: int, desc: str, enabled: bool, unit: str):
    return progress_bar(total, desc, enabled, unit=unit)


@dataclass
class _Result:
    method: str
    q: torch.Tensor | None = None          # integers (out, in) (int8/int4/ggml-gptq)
    params: list = field(default_factory=list)
    deq: torch.Tensor | None = None        # dequantized, training layout, float32
    blocks: np.ndarray | None = None       # ggml bytes (file layout)
    rel_error: float = 0.0
    output_rel_error: float | None = None
    tuned: bool = False                    # scales trained end to end (rwkvtools.tune)


def _weight(view: Checkpoint, name: str, base: str | None) -> torch.Tensor:
    from ..io.rwkvcpp import fp16_eligible
    w = view.tensors[name]
    if base == "FP16" and fp16_eligible(name, w.dim()):  # what the FP16 base file stores in 16 bits
        w = w.half()
    return w.float()


def _file_layout(name: str, w: torch.Tensor, entry: dict) -> torch.Tensor:
    return w.t().contiguous() if entry.get("layout") == "transposed" else w


def _rel(w: torch.Tensor, d: torch.Tensor) -> float:
    n = float(w.double().norm())
    return float((w.double() - d.double()).norm()) / n if n > 0 else float((d.double()).norm())


def _rtn_one(view, name, entry, cfg: QuantizeConfig, grid: Grid, base) -> _Result:
    w = _weight(view, name, base)
    if cfg.is_ggml:
        wf = _file_layout(name, w, entry)
        qt = entry.get("qtype", cfg.scheme)
        if qt in KQUANT_SCHEMES:
            from ..io import kquants
            blocks = kquants.quantize(qt, wf.numpy())
            dq = torch.from_numpy(kquants.dequantize(qt, blocks)).reshape(wf.shape)
        else:
            blocks = ggml_quants.quantize(qt, wf.numpy())
            dq = torch.from_numpy(ggml_quants.dequantize(qt, blocks, wf.numel())).reshape(wf.shape)
        dq = _file_layout(name, dq, entry)  # transposing twice restores the training layout
        return _Result("rtn", blocks=blocks, deq=dq, rel_error=_rel(w, dq))
    q, ps, dq = rtn(w, grid, clip=cfg.clip)
    return _compact(_Result("rtn", q=q, params=ps, deq=dq, rel_error=_rel(w, dq)), cfg)


def _compact(r: _Result, cfg: QuantizeConfig) -> _Result:
    """An int8/int4 result as it is kept until the checkpoint is assembled: the levels as 8-bit
    integers (the quantizer gives them as float32) and no dequantized copy unless scale tuning
    needs it (the two float32 copies of every matrix took 9 bytes per weight: 4.6x the fp16 file
    at 0.4B for int8)."""
    if r.q is not None:
        r.q = r.q.to(torch.int8 if cfg.scheme == "int8" else torch.uint8)
    if not cfg.tuning:
        r.deq = None
    return r


def apply(ckpt: Checkpoint, plan: dict, calib_tokens=None, progress: bool = False, device="cpu") -> Checkpoint:
    """Quantize every tensor of ``plan`` (deterministic given the plan and the calibration tokens).
    Returns a new checkpoint; the input is untouched. ``device``: where scale tuning runs."""
    from . import check_plan
    check_plan(plan, "quantize", "tensors", PLAN_FORMAT, QuantizeError)
    cfg = QuantizeConfig.from_dict(plan["config"])
    grid = cfg.grid()
    view = _model_view(ckpt)
    t = view.tensors
    _refuse_quantized(t)
    base = plan.get("base_type") if cfg.is_ggml else None
    entries = plan["tensors"]
    for name, e in entries.items():
        if name not in t:
            raise QuantizeError(f"plan does not fit this checkpoint: it has no tensor '{name}'")
        shp = tuple(tensor_shape(t, name))
        want = tuple(e["shape"]) if e.get("layout") != "transposed" else tuple(reversed(e["shape"]))
        if shp != want:
            raise QuantizeError(f"plan does not fit this checkpoint: '{name}' is {shp}, the plan says {want}")
    results: dict[str, _Result] = {}
    gptq_prefixes = {e["prefix"]: n for n, e in entries.items() if e["method"] == "gptq"}
    calib = None
    if gptq_prefixes or cfg.tuning:
        if calib_tokens is None:
            raise QuantizeError(f"{'method gptq' if gptq_prefixes else 'scale tuning'} needs calibration tokens")
        ntok = int(torch.as_tensor(calib_tokens).numel())
        if ntok < 2:
            raise QuantizeError(f"calibration needs at least 2 tokens, got {ntok}")
        calib = {"tokens": ntok, "sha256": _tokens_digest(calib_tokens)}
    if gptq_prefixes:
        gtoks = torch.as_tensor(calib_tokens, dtype=torch.long).flatten()[:cfg.calib_tokens]
        results.update(_run_gptq(view, entries, gptq_prefixes, gtoks, cfg, grid, base, progress))
    rest = [n for n in entries if n not in results]
    bar = _bar(len(rest), f"quantize {cfg.scheme} rtn", progress and len(rest) > 8, "tensor")
    for name in rest:
        results[name] = _rtn_one(view, name, entries[name], cfg, _grid(cfg, entries[name]), base)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    tuning = _tune(view, entries, cfg, results, calib_tokens, base, progress, device) if cfg.tuning else None
    return _assemble(view, plan, cfg, grid, results, calib, tuning)


def _tune(view, entries, cfg: QuantizeConfig, results: dict, calib_tokens, base, progress, device="cpu") -> dict:
    """End-to-end scale tuning (rwkvtools.tune) of every quantized linear the model runs (not the
    K-quant tensors of a GGUF plan); updates ``results`` in place when the held-out KL improves."""
    from ..model import build_model
    from ..tune import ggml_scales, int_scales, tune_scales
    scales, names = {}, {}
    for name, e in entries.items():
        p, qt = e.get("prefix"), e.get("qtype", cfg.scheme)
        if not p or name != f"{p}.weight" or qt in KQUANT_SCHEMES:
            continue
        r = results[name]
        if cfg.is_ggml:
            ts = ggml_scales(qt, r.blocks, _file_layout(name, r.deq, e))
            ts.transposed = e.get("layout") == "transposed"
        else:
            ts = int_scales(cfg.scheme, r.q, r.params)
        scales[p], names[p] = ts, name
    if not scales:
        raise QuantizeError("scale tuning: no quantized linear the model runs (nothing to tune)")
    teacher = build_model(view, device=device, dtype=torch.float32)
    student_tensors = {k: (results[k].deq if k in results else view.tensors[k]) for k in view.tensors}
    student = build_model(Checkpoint(student_tensors, view.manifest, view.source), device=device, dtype=torch.float32)
    toks = torch.as_tensor(calib_tokens, dtype=torch.long).flatten()[:cfg.tune_tokens]
    scales = {p: ts.to(device) for p, ts in scales.items()}
    rep = tune_scales(teacher, student, scales, toks, cfg.tune_steps, lr=cfg.tune_lr, batch=cfg.tune_batch,
                      seq=cfg.tune_seq, progress=progress)
    new = rep.pop("scales")
    rep["tensors"] = len(scales)
    if not rep["kept"]:
        return rep
    for p, sm in new.items():
        s, m = (None if v is None else v.cpu() for v in sm)
        name, ts, r, e = names[p], scales[p].to("cpu"), results[names[p]], entries[names[p]]
        if cfg.is_ggml:
            qt = e.get("qtype", cfg.scheme)
            raw = np.array(r.blocks, dtype=np.uint8).reshape(-1, ggml_quants.block_bytes(qt))
            raw[:, 0:2] = s.reshape(-1).numpy().astype(np.float16).view(np.uint8).reshape(-1, 2)
            if m is not None:
                raw[:, 2:4] = m.reshape(-1).numpy().astype(np.float16).view(np.uint8).reshape(-1, 2)
            r.blocks = raw.reshape(-1)
            shape = tuple(e["shape"])
            dq = torch.from_numpy(ggml_quants.dequantize(qt, r.blocks, math.prod(shape))).reshape(shape)
            r.deq = _file_layout(name, dq, e)
        else:
            if cfg.scheme == "int8":
                r.params = [(s.reshape(-1),)]
            else:
                r.params = [(s[:, k], pz[1]) for k, pz in enumerate(r.params)]
            r.deq = ts.weight(s, None)
        r.rel_error = _rel(_weight(view, name, base), r.deq)
        r.output_rel_error = None
        r.tuned = True
    return rep


def _run_gptq(view, entries, gptq_prefixes, calib_tokens, cfg, grid, base, progress) -> dict[str, _Result]:
    from ..calibrate import calibrate_blocks, linears_of
    from ..model import build_model
    model = build_model(view, dtype=torch.float32)
    lins = linears_of(model)
    out: dict[str, _Result] = {}
    bar = _bar(model.spec.n_layer, f"quantize {cfg.scheme} gptq", progress, "layer")
    for _, grams in calibrate_blocks(model, calib_tokens, lambda p: p in gptq_prefixes,
                                     chunk_len=cfg.chunk_len, sequential=True):
        for p in sorted(grams):
            name = gptq_prefixes[p]
            grid = _grid(cfg, entries[name])
            lin = lins[p]
            w = _weight(view, name, base)
            xtx = grams[p].xtx.cpu()
            q, ps, dq = gptq(w, xtx, grid, damp=cfg.damp, block=cfg.block, act_order=cfg.act_order, clip=cfg.clip)
            res = _Result("gptq", q=q, params=ps, deq=dq, rel_error=_rel(w, dq),
                          output_rel_error=output_rel_error(w, dq, xtx))
            if cfg.is_ggml:
                res.blocks = grid.pack(q, ps)
                res.q, res.params = None, []
            else:
                res = _compact(res, cfg)
            # the rest of the sequence runs through the quantized block (rebinding, not writing
            # into, the parameter: it may share memory with the input checkpoint)
            lin.weight.data = dq.to(lin.weight.dtype)
            out[name] = res
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    missing = [n for n in gptq_prefixes.values() if n not in out]
    if missing:  # every target is a linear the model runs; this would be a bug
        raise QuantizeError(f"calibration saw no inputs for {', '.join(missing[:4])}")
    return out


# -------------------------------------------------------------------------------------- storage
def _stored(cfg: QuantizeConfig, prefix: str, r: _Result) -> dict[str, torch.Tensor]:
    if cfg.scheme == "int8":
        return {f"{prefix}.weight_int8": r.q.to(torch.int8).contiguous(),
                f"{prefix}.weight_scale": r.params[0][0].to(torch.float32).contiguous()}
    # int4
    s = torch.stack([p[0] for p in r.params], dim=1).to(torch.float16)
    z = torch.stack([p[1] for p in r.params], dim=1).to(torch.float16)
    return {f"{prefix}.weight_int4": pack_int4(r.q).contiguous(),
            f"{prefix}.weight_scale": s.contiguous(), f"{prefix}.weight_zero": z.contiguous()}


class GGMLTensors(LazyTensors):
    """The tensors of a ggml-quantized checkpoint: quantized tensors read back dequantized (as
    ``read_checkpoint`` of the written ``.bin`` gives them), with the block bytes in
    ``ggml_blocks`` ({name: (type, uint8 array)}, rwkv.cpp's file layout) for the writer."""

    def __init__(self, names, loader, shapes, dtypes, blocks: dict, qtype: str, base_type: str):
        super().__init__(names, loader, shapes, dtypes)
        self.ggml_blocks = blocks
        self.ggml_type = qtype
        self.base_type = base_type


def _assemble(view: Checkpoint, plan: dict, cfg: QuantizeConfig, grid: Grid, results: dict[str, _Result],
              calib: dict | None, tuning: dict | None = None) -> Checkpoint:
    src = view.tensors
    per_tensor = {}
    bytes_before = bytes_after = 0
    for name, e in plan["tensors"].items():
        r = results[name]
        n = math.prod(e["shape"])
        bpw = _grid(cfg, e).bits_per_weight(e["shape"][1])
        per_tensor[name] = {"scheme": e.get("qtype", cfg.scheme), "method": r.method, "shape": e["shape"],
                            "bits_per_weight": bpw, "rel_error": r.rel_error}
        if r.output_rel_error is not None:
            per_tensor[name]["output_rel_error"] = r.output_rel_error
        if r.tuned:
            per_tensor[name]["tuned"] = True
        bytes_before += n * torch.tensor([], dtype=tensor_dtype(src, name)).element_size()
        bytes_after += int(round(n * bpw / 8))
    if cfg.is_ggml:
        blocks = {n: (plan["tensors"][n].get("qtype", cfg.scheme), r.blocks) for n, r in results.items()}
        deq = {n: r.deq for n, r in results.items()}
        names = list(src)
        shapes = {k: tuple(tensor_shape(src, k)) for k in names}
        dtypes = {k: (torch.float32 if k in deq else tensor_dtype(src, k)) for k in names}
        tensors = GGMLTensors(names, lambda k: deq[k] if k in deq else src[k], shapes, dtypes,
                              blocks, cfg.scheme, plan.get("base_type", "FP32"))
    else:
        new: dict[str, torch.Tensor] = {}
        replaced = {}
        for name, e in plan["tensors"].items():
            stored = _stored(cfg, e["prefix"], results[name])
            new.update(stored)
            replaced[name] = list(stored)
        names = []
        for k in src:
            names.extend(replaced.get(k, [k]))
        shapes = {k: (tuple(new[k].shape) if k in new else tuple(tensor_shape(src, k))) for k in names}
        dtypes = {k: (new[k].dtype if k in new else tensor_dtype(src, k)) for k in names}
        tensors = LazyTensors(names, lambda k: new[k] if k in new else src[k], shapes, dtypes)
    n_q = plan["quantized_params"]
    errs = [v["rel_error"] for v in per_tensor.values()]
    summary_txt = (f"{len(per_tensor)} matrices ({n_q:,} weights) to {cfg.scheme}"
                   f"{f' g{cfg.group_size}' if cfg.scheme == 'int4' else ''} by {cfg.method}, "
                   f"{plan['bits_per_weight']:.3f} bits/weight, {len(plan['kept'])} tensors kept; "
                   f"relative weight error mean {sum(errs) / len(errs):.4g}, max {max(errs):.4g}")
    if tuning is not None:
        summary_txt += (f"; scales tuned ({tuning['steps']} steps): held-out KL {tuning['heldout_kl_before']:.4g} -> "
                        f"{tuning['heldout_kl_after']:.4g}" + ("" if tuning["kept"] else ", not better: rounded scales kept"))
    summary = {"scheme": cfg.scheme, "method": cfg.method,
               **({"group_size": cfg.group_size} if cfg.scheme == "int4" else {}),
               "bits_per_weight": plan["bits_per_weight"], "quantized_params": n_q,
               "quantized_bytes_before": bytes_before, "quantized_bytes_after": bytes_after,
               "tensors": per_tensor, "kept": plan["kept"], "summary": summary_txt}
    if tuning is not None:
        summary["tuning"] = tuning
    if cfg.is_ggml:
        summary["format"] = "gguf" if cfg.target == "gguf" else "rwkv.cpp"
        summary["base_type"] = plan.get("base_type", "FP32")
        if plan.get("fallbacks"):
            summary["fallbacks"] = plan["fallbacks"]
    entry = {"transform": "quantize", "options": cfg.to_dict(), "calibration": calib,
             "plan": {k: v for k, v in plan.items() if k not in ("tensors", "kept")},
             "results": {"rel_error_mean": sum(errs) / len(errs), "rel_error_max": max(errs),
                         **({"tuning": tuning} if tuning is not None else {})}}
    return view.with_tensors(tensors, entry=entry, quantized=summary)


def quantize(ckpt: Checkpoint, config: QuantizeConfig, calib_tokens=None, progress: bool = False,
             device="cpu") -> Checkpoint:
    """plan + apply."""
    return apply(ckpt, plan(ckpt, config), calib_tokens, progress, device)


# ---------------------------------------------------------------------------------------- misc
def dequantize(ckpt: Checkpoint) -> Checkpoint:
    """The dense checkpoint the quantized one stands for: every int8/int4 linear replaced by its
    float32 weight (``P.weight``); ggml-quantized tensors are dense already. For comparisons."""
    from ..model.quantized import dequantize_linear
    src = ckpt.tensors
    names, dense = [], {}
    done = set()
    for k in src:
        p = k.rsplit(".", 1)[0]
        if stored_kind(src, p):
            if p not in done:
                done.add(p)
                names.append(f"{p}.weight")
                dense[f"{p}.weight"] = dequantize_linear(src, p)
            continue
        names.append(k)
    manifest = {k: v for k, v in ckpt.manifest.items() if k != "quantized"}
    return Checkpoint({k: dense[k] if k in dense else src[k] for k in names}, manifest, ckpt.source)


def is_ggml(ckpt: Checkpoint) -> bool:
    return isinstance(ckpt.tensors, GGMLTensors)


def write_quantized(ckpt: Checkpoint, path: str, progress: bool | None = None) -> str:
    """Write a quantized checkpoint: ggml schemes as an rwkv.cpp ``.bin`` (the block bytes as
    quantized), int8/int4 as ``.safetensors`` (manifest kept) or ``.pth``. Returns the format."""
    import os
    ext = os.path.splitext(path)[1].lower()
    if is_ggml(ckpt):
        t = ckpt.tensors
        q = ckpt.manifest.get("quantized") or {}
        kept_quantizable = [n for n, why in q.get("kept", {}).items() if why.startswith("--skip")]
        target = "gguf" if q.get("format") == "gguf" else "rwkvcpp"
        if ext == ".gguf":
            if target != "gguf":
                raise QuantizeError(f"{path}: this checkpoint was quantized by rwkv.cpp's tensor rule; quantize "
                                    "with the GGUF target (a .gguf output) to follow llama.cpp's rule")
            from ..io.gguf_io import write_gguf
            # the file type names the block type unless some matrices were skipped (which would
            # then be rounded by the writer); per-tensor blocks (incl. fallbacks) are written as given
            write_gguf(ckpt, path, quant=None if kept_quantizable else t.ggml_type, blocks=dict(t.ggml_blocks),
                       progress=progress)
            return "gguf"
        if ext != ".bin" or target != "rwkvcpp":
            raise QuantizeError(f"{path}: this checkpoint was quantized for "
                                f"{'GGUF: write a .gguf file' if target == 'gguf' else 'rwkv.cpp: write a .bin file'}")
        from ..io.rwkvcpp import write_rwkvcpp
        # the header names the block type unless tensors rwkv.cpp would quantize were skipped (the
        # writer would quantize them under a block data type)
        dt = t.ggml_type if not kept_quantizable else t.base_type
        write_rwkvcpp(ckpt, path, data_type=dt, blocks=t.ggml_blocks, base_type=t.base_type, progress=progress)
        return "rwkvcpp"
    if ext == ".bin":
        raise QuantizeError(f"{path}: int8/int4 are rwkvtools formats; write .safetensors (or .pth), or use a "
                            "ggml scheme (Q4_0 .. Q8_0) for an rwkv.cpp .bin")
    from ..io.writers import write_checkpoint
    if ext not in (".safetensors", ".pth", ".pt"):
        raise QuantizeError(f"{path}: write quantized checkpoints as .safetensors or .pth")
    return write_checkpoint(ckpt, path)

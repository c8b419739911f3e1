"""Parallel (training) form <-> RNN (inference) form, for every version. See docs/FORMS.md.

The RNN form stores each parameter as the per-token recurrence consumes it (what ChatRWKV and
rwkv.cpp do at load or convert time), under the same BlinkDL names:

* every nn.Linear-style matrix (att/ffn key, value, receptance, gate, output; head) transposed
  to (in, out), so a step is ``x @ W`` (low-rank factors likewise: ``x @ V^T @ U^T``);
* token-shift and other per-channel vectors squeezed to (C,); v7 ``r_k`` flattened to (C,);
* v4 ``time_decay`` -> ``-exp(time_decay)`` (the per-step log-decay), (A,);
* v5 ``time_decay`` -> ``exp(-exp(time_decay))`` (the decay), ``time_first`` -> ``exp``, and
  the decay/bonus tensors shaped (H, N, 1) (5.2) or (H, 1, 1) (5.0/5.1) to broadcast against
  the key-major state (H, N_k, N_v); v6 ``time_faaaa`` (H, N, 1), v6 ``time_decay`` (A,);
* optional fp16 rescale (``rescale_every`` = R): ``att.output`` and ``ffn.value`` of layer i
  divided by 2^(i // R) (a runtime then halves the residual after every R-th layer).

Not applied: folding ln0 into the embedding (not invertible: LayerNorm drops each row's mean
and scale).

Invertibility. Reshapes, transposes and power-of-two rescales are exact. The decay transforms
are computed in float32 exactly as the runtimes do, and float32 ``exp`` is not injective (two
neighbouring inputs can give the same output), so they cannot always be inverted bit for bit.
``to_parallel`` inverts them by searching, around the float64 inverse, for the float32 value that
the float32 forward maps to the stored one; where that value is not the original (measured on
random v5 decays: most elements near decay 1), ``to_rnn`` keeps the original tensor under the
reserved name ``_parallel.<name>`` (A floats per layer) and records it in the manifest, so that
parallel -> rnn -> parallel returns every tensor bit for bit.
"""
from __future__ import annotations

import copy
import math
import re

import torch

from ..checkpoint import RNN_RESERVED, Checkpoint, LazyTensors, tensor_dtype, tensor_shape
from ..errors import SpecError

RESERVED = RNN_RESERVED
FORM_KEY = "rnn"  # manifest section describing the inverse

# --------------------------------------------------------------------------- value transforms
# name -> (float32 forward exactly as ChatRWKV/rwkv.cpp compute it, float64 inverse, domain clamp)
_TINY = 5e-324


def _fwd_neg_exp(t):
    return -torch.exp(t)


def _fwd_exp_neg_exp(t):
    return torch.exp(-torch.exp(t))


def _fwd_exp(t):
    return torch.exp(t)


def _inv_neg_exp(y):
    return torch.log((-y).clamp(min=_TINY))


def _inv_exp_neg_exp(y):
    return torch.log(-torch.log(y.clamp(min=_TINY, max=1.0 - 2.0 ** -53)))


def _inv_exp(y):
    return torch.log(y.clamp(min=_TINY))


VALUE_OPS = {"neg_exp": (_fwd_neg_exp, _inv_neg_exp),
             "exp_neg_exp": (_fwd_exp_neg_exp, _inv_exp_neg_exp),
             "exp": (_fwd_exp, _inv_exp)}


def forward_value(op: str, t: torch.Tensor) -> torch.Tensor:
    """The runtime value (float32) of a training-form tensor."""
    return VALUE_OPS[op][0](t.float())


def _same(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise bit equality of two float32 tensors (NaN == NaN with equal bits)."""
    return a.view(torch.int32) == b.view(torch.int32)


def invert_value(op: str, y: torch.Tensor, max_steps: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """A float32 ``x`` with ``forward_value(op, x) == y`` bit for bit wherever one exists within
    ``max_steps`` float32 steps of the float64 inverse (the nearest such x is taken); returns
    (x, mask of elements where the forward reproduces y)."""
    f, g = VALUE_OPS[op]
    y = y.float().contiguous()
    x = g(y.double()).float()
    ok = _same(f(x), y)
    if bool(ok.all()):
        return x, ok
    idx = (~ok).nonzero(as_tuple=True)
    base, target = x[idx], y[idx]
    found = torch.zeros_like(target, dtype=torch.bool)
    best = base.clone()
    up, down = base.clone(), base.clone()
    inf = torch.full_like(base, math.inf)
    for _ in range(max_steps):
        up = torch.nextafter(up, inf)
        down = torch.nextafter(down, -inf)
        for cand in (up, down):
            hit = (~found) & _same(f(cand), target)
            best = torch.where(hit, cand, best)
            found |= hit
        if bool(found.all()):
            break
    x[idx] = best
    ok[idx] = found
    return x, ok


# ------------------------------------------------------------------------------- the rules
def _vector_len(shape: tuple) -> int:
    return math.prod(shape) if shape else 1


def _rules(spec, names, shapes) -> dict[str, dict]:
    """name -> {"value": op|None, "shape": rnn shape, "T": transpose} for tensors that change."""
    from ..spec import linear_prefixes
    lin = set(linear_prefixes(spec))
    H, N = spec.n_head, spec.head_size
    out: dict[str, dict] = {}
    for name in names:
        shape = tuple(shapes[name])
        prefix, _, last = name.rpartition(".")
        rule = None
        if prefix in lin and last in ("weight", "weight_u", "weight_v"):
            if len(shape) != 2:
                raise SpecError(f"'{name}' has shape {shape}, expected a 2-D matrix")
            rule = {"value": None, "shape": (shape[1], shape[0]), "T": True}
        elif any(name.startswith(p + ".") for p in lin):
            raise SpecError(f"'{name}': this linear representation cannot be put in RNN form "
                            "(only dense and low-rank linears can); convert a dense checkpoint instead")
        elif ".att." in name or ".ffn." in name:
            rule = _vector_rule(spec, last, shape, H, N)
        if rule is not None and (rule["value"] or rule["T"] or tuple(rule["shape"]) != shape):
            out[name] = rule
    return out


def _vector_rule(spec, last: str, shape: tuple, H: int, N: int) -> dict | None:
    n = _vector_len(shape)
    squeeze = {"value": None, "shape": (n,), "T": False}
    v = spec.major
    if v == 7:
        if last in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "v0", "k_k", "k_a", "r_k"):
            return squeeze
        return None
    if last.startswith("time_mix_") or (last.startswith("time_maa_") and last not in ("time_maa_w1", "time_maa_w2")):
        return squeeze
    if v == 4:
        if last == "time_decay":
            return {"value": "neg_exp", "shape": (n,), "T": False}
        if last == "time_first":
            return squeeze
        return None
    if v == 5:
        per_channel = spec.version == "5.2"
        hs = (H, N, 1) if per_channel else (H, 1, 1)
        if last == "time_decay":
            return {"value": "exp_neg_exp", "shape": hs, "T": False}
        if last == "time_first":
            return {"value": "exp", "shape": (H, n // H, 1), "T": False}
        if last == "time_faaaa":
            return {"value": None, "shape": (H, n // H, 1), "T": False}
        return None
    if v == 6:
        if last == "time_decay":
            return squeeze
        if last == "time_faaaa":
            return {"value": None, "shape": (H, N, 1), "T": False}
    return None


LOST_INDEX, LOST_VALUE = ".lost_index", ".lost_value"


def rescale_losses(t: torch.Tensor, factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The elements of ``t`` that ``t / factor * factor`` does not give back bit for bit (in t's
    own dtype: values that the division pushes below the dtype's normal range lose low bits, in
    fp16 anything under 2^-14 x factor): their flat indices (int64) and original values."""
    back = (t / factor) * factor
    bits = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    diff = (back.contiguous().view(bits) != t.contiguous().view(bits)).flatten()
    idx = torch.nonzero(diff).flatten()
    return idx, t.flatten()[idx].clone()


def _rescale_factor(name: str, every: int) -> float:
    if not every:
        return 1.0
    m = re.match(r"^blocks\.(\d+)\.(att\.output|ffn\.value)\.(weight|weight_u)$", name)
    if not m:
        return 1.0
    return float(2 ** (int(m.group(1)) // every))


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def _dtype_of(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise SpecError(f"RNN-form manifest names an unknown dtype '{name}'")
    return dt


# ------------------------------------------------------------------------------- transforms
def to_rnn(ckpt: Checkpoint, rescale_every: int = 0) -> Checkpoint:
    """Training form -> RNN form (lazy: matrices are produced when read). Idempotent on an
    RNN-form checkpoint with the same options."""
    if ckpt.form == "rnn":
        have = ckpt.manifest.get(FORM_KEY, {}).get("rescale_every", 0)
        if have != rescale_every:
            return to_rnn(to_parallel(ckpt), rescale_every)
        return ckpt
    if rescale_every < 0:
        raise SpecError("rescale_every must be >= 0 (0 = no fp16 rescale)")
    from ..spec import detect
    src = ckpt.tensors
    spec = detect(src)
    names = list(src)
    shapes = {k: tensor_shape(src, k) for k in names}
    rules = _rules(spec, names, shapes)
    kept: dict[str, torch.Tensor] = {}
    values: dict[str, torch.Tensor] = {}
    record: dict[str, dict] = {}
    for name, r in rules.items():
        rec = {"shape": list(shapes[name])}
        if r["T"]:
            rec["T"] = True
        if r["value"]:
            orig = src[name]
            rec["value"] = r["value"]
            rec["dtype"] = _dtype_name(orig.dtype)
            y = forward_value(r["value"], orig).reshape(r["shape"])
            back, _ = invert_value(r["value"], y)
            if not torch.equal(back.reshape(orig.shape).to(orig.dtype), orig):
                kept[name] = orig.clone()
                rec["kept"] = RESERVED + name
            values[name] = y
        rec["rnn_shape"] = list(r["shape"])
        record[name] = rec
    lost: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name in names:
        f = _rescale_factor(name, rescale_every)
        if f != 1.0:
            rec = record.setdefault(name, {"shape": list(shapes[name]), "rnn_shape": list(shapes[name])})
            rec["rescale"] = f
            if tensor_dtype(src, name).is_floating_point:
                idx, val = rescale_losses(src[name], f)
                if idx.numel():
                    lost[name] = (idx, val)
                    rec["lost"] = [RESERVED + name + LOST_INDEX, RESERVED + name + LOST_VALUE]

    order: list[str] = []
    extra: dict[str, torch.Tensor] = {}   # reserved name -> kept original or lost elements
    for name in names:
        order.append(name)
        mine = ([(RESERVED + name, kept[name])] if name in kept else []) + (
            list(zip(record[name]["lost"], lost[name])) if name in lost else [])
        for k, t in mine:   # each right after the tensor it belongs to
            extra[k] = t
            order.append(k)

    def load(name: str) -> torch.Tensor:
        if name.startswith(RESERVED):
            return extra[name]
        if name in values:
            return values[name]
        t = src[name]
        rec = record.get(name)
        if rec is None:
            return t
        if "rescale" in rec:
            t = t / rec["rescale"] if t.is_floating_point() else t
        if rec.get("T"):
            return t.t().contiguous()
        return t.reshape(rec["rnn_shape"])

    out_shapes = {}
    for name in order:
        if name.startswith(RESERVED):
            out_shapes[name] = tuple(extra[name].shape)
        elif name in record:
            out_shapes[name] = tuple(record[name]["rnn_shape"])
        else:
            out_shapes[name] = shapes[name]
    dtypes = {k: (torch.float32 if k in values else (extra[k].dtype if k.startswith(RESERVED)
                                                       else tensor_dtype(src, k))) for k in order}
    section = {"version": spec.version, "rescale_every": rescale_every, "tensors": record}
    entry = {"transform": "rnn_form", "options": {"to": "rnn", "rescale_every": rescale_every},
             "result": {"tensors_changed": len(record), "originals_kept": sorted(kept),
                        "rescale_lost_elements_kept": {k: int(v[0].numel()) for k, v in sorted(lost.items())}}}
    out = ckpt.with_tensors(LazyTensors(order, load, out_shapes, dtypes), entry, form="rnn")
    out.manifest[FORM_KEY] = section
    return out


def _check_record(name: str, rec) -> None:
    """An RNN-form manifest record (read from a file) must hold the fields to_rnn writes, with their
    types, and shapes with the same number of values; a transposed tensor is a matrix."""
    def dims(v) -> bool:
        return isinstance(v, list) and all(type(d) is int and d >= 0 for d in v)

    ok = isinstance(rec, dict) and dims(rec.get("shape")) and dims(rec.get("rnn_shape", rec.get("shape")))
    if ok:
        rnn_shape = rec.get("rnn_shape", rec["shape"])
        value, scale = rec.get("value", "exp"), rec.get("rescale", 1.0)
        ok = (math.prod(rnn_shape) == math.prod(rec["shape"])
              and isinstance(value, str) and value in VALUE_OPS
              and isinstance(rec.get("dtype", ""), str) and isinstance(rec.get("kept", ""), str)
              and rec.get("T", False) in (True, False) and (not rec.get("T") or len(rnn_shape) == 2)
              and isinstance(scale, (int, float)) and not isinstance(scale, bool)
              and (rec.get("lost") is None or (isinstance(rec["lost"], list) and len(rec["lost"]) == 2
                                               and all(isinstance(x, str) for x in rec["lost"]))))
    if not ok:
        raise SpecError(f"the RNN-form manifest's record of '{name}' is damaged: {str(rec)[:200]}")


def _check_lost(name: str, rec: dict, src) -> None:
    """The kept elements of a rescaled tensor: 1-d int64 indices inside the tensor, values of its
    dtype, as many of each (read from a file: checked before they are used)."""
    ik, vk = rec["lost"]
    for k in (ik, vk):
        if k not in src:
            raise SpecError(f"RNN-form manifest says elements of '{name}' are kept in '{k}', which the file "
                            "does not contain")
    n_i, n_v = tensor_shape(src, ik), tensor_shape(src, vk)
    if (len(n_i) != 1 or tuple(n_i) != tuple(n_v) or tensor_dtype(src, ik) != torch.int64
            or tensor_dtype(src, vk) != tensor_dtype(src, name)):
        raise SpecError(f"'{ik}' / '{vk}' ({tuple(n_i)} {tensor_dtype(src, ik)}, {tuple(n_v)} "
                        f"{tensor_dtype(src, vk)}): expected as many int64 indices as values of "
                        f"{tensor_dtype(src, name)}")
    idx = src[ik]
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= math.prod(rec["shape"])):
        raise SpecError(f"'{ik}' holds indices outside '{name}' ({math.prod(rec['shape'])} elements)")


def to_parallel(ckpt: Checkpoint) -> Checkpoint:
    """RNN form -> training form (lazy), undoing exactly what the manifest records."""
    if ckpt.form != "rnn":
        return ckpt
    section = ckpt.manifest.get(FORM_KEY)
    if not isinstance(section, dict) or not isinstance(section.get("tensors"), dict):
        raise SpecError("this checkpoint says it is in RNN form but its manifest has no 'rnn' section "
                        "describing how to undo it; it was not written by rwkvtools or is damaged")
    record: dict = section["tensors"]
    src = ckpt.tensors
    names = [k for k in src if not k.startswith(RESERVED)]
    for name, rec in record.items():
        _check_record(name, rec)
        if name not in src:
            raise SpecError(f"RNN-form manifest lists '{name}', which the file does not contain")
        if tuple(tensor_shape(src, name)) != tuple(rec.get("rnn_shape", rec["shape"])):
            raise SpecError(f"'{name}' has shape {tuple(tensor_shape(src, name))}, the RNN-form manifest "
                            f"says {tuple(rec.get('rnn_shape', rec['shape']))}")
        if "kept" in rec and rec["kept"] not in src:
            raise SpecError(f"RNN-form manifest says the original of '{name}' is kept as '{rec['kept']}', "
                            "which the file does not contain")
        if "kept" in rec and tuple(tensor_shape(src, rec["kept"])) != tuple(rec["shape"]):
            raise SpecError(f"'{rec['kept']}' has shape {tuple(tensor_shape(src, rec['kept']))}, the "
                            f"RNN-form manifest says {tuple(rec['shape'])}")
        if rec.get("lost"):
            _check_lost(name, rec, src)

    def load(name: str) -> torch.Tensor:
        rec = record.get(name)
        if rec is None:
            return src[name]
        if "kept" in rec:
            return src[rec["kept"]]
        t = src[name]
        if rec.get("T"):
            t = t.t().contiguous()
        if "value" in rec:
            x, _ = invert_value(rec["value"], t)
            t = x.to(_dtype_of(rec.get("dtype", "float32")))
        t = t.reshape(rec["shape"])
        if "rescale" in rec and t.is_floating_point():
            t = t * rec["rescale"]
            if rec.get("lost"):   # the elements the division lost bits of, kept as they were
                idx, val = (src[k] for k in rec["lost"])
                t = t.flatten().clone()
                t[idx] = val
                t = t.reshape(rec["shape"])
        return t

    shapes = {k: tuple(record[k]["shape"]) if k in record else tuple(tensor_shape(src, k)) for k in names}
    dtypes = {}
    for k in names:
        if k in record and "value" in record[k]:
            dtypes[k] = _dtype_of(record[k].get("dtype", "float32"))
        else:
            dtypes[k] = tensor_dtype(src, k)
    manifest = copy.deepcopy(ckpt.manifest)
    manifest.pop(FORM_KEY, None)
    manifest["form"] = "parallel"
    manifest.setdefault("history", []).append({"transform": "rnn_form", "options": {"to": "parallel"}})
    return Checkpoint(LazyTensors(names, load, shapes, dtypes), manifest, source=ckpt.source)

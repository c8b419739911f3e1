"""The single place that knows how tensor names and shapes map to an RWKV version and its
hyper-parameters (training form, BlinkDL names). Nothing else guesses.

Detection order is newest version first, by signature keys, with every dimension read from
shapes (never from defaults): v7 (``att.r_k``/``att.k_k``), v6 (``att.time_maa_x``), v5
(``att.ln_x``; minor layout from gate and decay shape), v4 (``att.time_first`` + ``time_mix``).
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Callable

from .checkpoint import param_count, tensor_shape
from .errors import SpecError

VERSIONS = ("4", "5.0", "5.1", "5.2", "6", "7")
MAX_LAYERS = 100_000  # a layer index beyond this is no model (real RWKV models have up to ~100 layers)


@dataclass(frozen=True)
class ModelSpec:
    version: str          # "4", "5.0", "5.1", "5.2", "6", "7"
    n_layer: int
    n_embd: int           # C
    dim_att: int          # A (= C in released models)
    n_head: int           # H (v4: 1 per channel group; reported as A)
    head_size: int        # N
    ffn_dim: int          # F
    vocab: int            # V
    lora: dict = field(default_factory=dict)  # v6: mix/decay; v7: w/a/v/g ranks
    bonus: str = ""       # v5: "time_first" (log-space, exp'd) or "time_faaaa" (linear)

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])

    @property
    def has_gate(self) -> bool:
        return self.version in ("5.1", "5.2", "6")

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# linear layers may be stored dense or transformed; the spec needs only their (out, in) shape
def linear_shape(tensors: Mapping, prefix: str) -> tuple[int, int] | None:
    """(out_features, in_features) of the linear stored under ``prefix`` in any representation
    rwkvtools writes (dense, low-rank factors, quantized, shared+LoRA), or None if absent."""
    if f"{prefix}.weight" in tensors:
        s = tensor_shape(tensors, f"{prefix}.weight")
        if len(s) == 2:
            return (s[0], s[1])
    if f"{prefix}.weight_u" in tensors and f"{prefix}.weight_v" in tensors:  # low-rank U(out,r) V(r,in)
        return (_matrix(tensors, f"{prefix}.weight_u")[0], _matrix(tensors, f"{prefix}.weight_v")[1])
    if f"{prefix}.weight_int8" in tensors:  # quantized int8 (out, in)
        return _matrix(tensors, f"{prefix}.weight_int8")
    if f"{prefix}.weight_int4" in tensors:  # quantized int4, two values per byte (out, in/2)
        s = _matrix(tensors, f"{prefix}.weight_int4")
        return (s[0], 2 * s[1])
    if f"{prefix}.shape" in tensors:  # quantized / shared linears store their logical shape
        t = tensors[f"{prefix}.shape"]
        if t.dim() != 1 or t.numel() != 2 or t.is_floating_point() or t.is_complex():
            raise SpecError(f"'{prefix}.shape' must hold the two integers (out, in), found {t.dtype} "
                            f"of shape {tuple(t.shape)}")
        s = t.tolist()
        return (int(s[0]), int(s[1]))
    src = shared_source(tensors, f"{prefix}.weight")  # recursive: shared block matrix (+ LoRA)
    if src is not None:
        s = tensor_shape(tensors, src)
        if len(s) == 2:
            return (s[0], s[1])
    return None


# recursive checkpoints (transforms/recursive.py): layer i runs shared block SHARED_MAP[i] (-1:
# its own tensors); a per-layer tensor 'blocks.i.REST' that is absent is stored once as
# 'shared.B.REST' (matrices then relaxed per layer by 'blocks.i.REST-without-.weight.lora_a/_b')
SHARED_MAP = "shared.map"
_LAYER_NAME = re.compile(r"^blocks\.(\d+)\.(.+)$")


def shared_map(tensors: Mapping) -> list[int] | None:
    """The layer -> shared block list of a recursive checkpoint (-1 = unshared), or None."""
    if SHARED_MAP not in tensors:
        return None
    t = tensors[SHARED_MAP]
    if t.dim() != 1 or t.is_floating_point() or t.is_complex() or t.numel() > 1_000_000:
        raise SpecError(f"'{SHARED_MAP}' must be a 1-D integer tensor (one shared block per layer, -1 for "
                        f"none), found {t.dtype} of shape {tuple(t.shape)}")
    m = [int(v) for v in t.tolist()]
    if any(v < -1 for v in m):
        raise SpecError(f"'{SHARED_MAP}' holds a negative block index other than -1: {m}")
    return m


def shared_source(tensors: Mapping, name: str) -> str | None:
    """Where a recursive checkpoint stores the shared copy of the per-layer tensor ``name``
    ('blocks.i.REST' -> 'shared.B.REST'), or None when ``name`` is not shared."""
    if SHARED_MAP not in tensors or name in tensors:
        return None
    m = _LAYER_NAME.match(name)
    if not m:
        return None
    mp = shared_map(tensors)
    i = int(m.group(1))
    if i >= len(mp) or mp[i] < 0:
        return None
    src = f"shared.{mp[i]}.{m.group(2)}"
    return src if src in tensors else None


def _layers(tensors: Mapping) -> int:
    idx = set()
    pat = re.compile(r"^blocks\.(\d+)\.")
    for k in tensors:
        m = pat.match(k)
        if m:
            d = m.group(1)
            if len(d) > len(str(MAX_LAYERS)) or (len(d) > 1 and d[0] == "0") or int(d) >= MAX_LAYERS:
                # read as a number only when it can be a layer (a hostile 10^9 or 5000-digit index was a
                # range of that size, or an int() error); '01' would be a second spelling of layer 1
                raise SpecError(f"tensor '{k[:80]}{'...' if len(k) > 80 else ''}': layer index "
                                f"{d[:20]}{'...' if len(d) > 20 else ''} is not a layer number rwkvtools reads "
                                f"(0 to {MAX_LAYERS - 1}, no leading zeros)")
            idx.add(int(d))
    if not idx:
        return 0
    n = max(idx) + 1
    if n > len(idx):
        missing = [i for i in range(n) if i not in idx]
        shown = ", ".join(map(str, missing[:10])) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise SpecError(f"layer indices are not contiguous: blocks {shown} are missing (found {n} layers)")
    return n


def _matrix(tensors: Mapping, name: str) -> tuple[int, int]:
    s = tensor_shape(tensors, name)
    if len(s) != 2:
        raise SpecError(f"'{name}' must be a matrix, found shape {tuple(s)}")
    return (s[0], s[1])


def _need(tensors: Mapping, name: str, what: str, ndim: int | tuple[int, ...] = ()) -> tuple:
    """The shape of ``name``; ``ndim``: the dimension count(s) it must have."""
    if name not in tensors:
        raise SpecError(f"{what}: expected tensor '{name}', which is missing")
    s = tuple(tensor_shape(tensors, name))
    ok = (ndim,) if isinstance(ndim, int) else ndim
    if ok and len(s) not in ok:
        want = " or ".join(map(str, ok))
        raise SpecError(f"{what}: tensor '{name}' has shape {s}, expected {want} dimensions")
    return s


def _common(tensors: Mapping) -> tuple[int, int, int, int]:
    v, c = _need(tensors, "emb.weight", "embedding", 2)
    n_layer = _layers(tensors)
    if n_layer == 0:
        raise SpecError("no 'blocks.<i>.*' tensors found: this is not an RWKV checkpoint")
    f = linear_shape(tensors, "blocks.0.ffn.key")
    if f is None:
        raise SpecError("channel-mix: expected 'blocks.0.ffn.key.weight' (or its factors), which is missing")
    return v, c, n_layer, f[0]


def _detect_v7(t: Mapping) -> ModelSpec:
    v, c, n_layer, ffn = _common(t)
    h, n = _need(t, "blocks.0.att.r_k", "v7 bonus", 2)
    lora = {"w": _need(t, "blocks.0.att.w1", "v7 decay LoRA", 2)[1],
            "a": _need(t, "blocks.0.att.a1", "v7 ICLR LoRA", 2)[1],
            "g": _need(t, "blocks.0.att.g1", "v7 gate LoRA", 2)[1]}
    if n_layer > 1:
        lora["v"] = _need(t, "blocks.1.att.v1", "v7 value-residual LoRA", 2)[1]
    else:
        lora["v"] = 0
    for bad in ("blocks.0.ffn.s_emb.weight", "blocks.0.ffn.s0"):
        if bad in t:
            raise SpecError(f"'{bad}' belongs to the RWKV-7 DeepEmbed variant, which is not plain x070 and is not supported")
    return ModelSpec("7", n_layer, c, h * n, h, n, ffn, v, lora)


def _detect_v6(t: Mapping) -> ModelSpec:
    v, c, n_layer, ffn = _common(t)
    h, n = _need(t, "blocks.0.att.time_faaaa", "v6 bonus", 2)
    for bad, why in (("blocks.0.att.gate_w1", "x060a"), ("blocks.0.att.time_maa_rkvw_w1", "x060b/c")):
        if bad in t:
            raise SpecError(f"'{bad}' belongs to the experimental RWKV-6 trainer variant {why}, which is not supported")
    lora = {"mix": _need(t, "blocks.0.att.time_maa_w2", "v6 mix LoRA", 3)[1],
            "decay": _need(t, "blocks.0.att.time_decay_w1", "v6 decay LoRA", 2)[1]}
    return ModelSpec("6", n_layer, c, h * n, h, n, ffn, v, lora, bonus="time_faaaa")


def _detect_v5(t: Mapping) -> ModelSpec:
    v, c, n_layer, ffn = _common(t)
    td = _need(t, "blocks.0.att.time_decay", "v5 decay", (1, 2))
    a = _need(t, "blocks.0.att.ln_x.weight", "v5 group norm", 1)[0]
    h = td[0]
    if h == 0 or a % h:
        raise SpecError(f"v5: attention dim {a} is not a multiple of the head count {h} (from time_decay {td})")
    n = a // h
    bonus = "time_faaaa" if "blocks.0.att.time_faaaa" in t else "time_first"
    if bonus == "time_first" and "blocks.0.att.time_first" not in t:
        raise SpecError("v5: expected 'blocks.0.att.time_faaaa' or 'blocks.0.att.time_first', neither is present")
    gate = linear_shape(t, "blocks.0.att.gate") is not None
    if len(td) == 2 and td[1] > 1:
        if not gate:
            raise SpecError("v5.2 layout (per-channel time_decay (H, N)) without 'att.gate.weight': unknown layout")
        version = "5.2"
    else:
        version = "5.1" if gate else "5.0"
    return ModelSpec(version, n_layer, c, a, h, n, ffn, v, {}, bonus=bonus)


def _detect_v4(t: Mapping) -> ModelSpec:
    v, c, n_layer, ffn = _common(t)
    a = _need(t, "blocks.0.att.time_first", "v4 bonus", 1)[0]
    _need(t, "blocks.0.att.time_mix_k", "v4 token shift")
    for bad in ("blocks.0.pos_emb_x", "head_q.weight", "blocks.0.ffnPre.key.weight"):
        if bad in t:
            raise SpecError(f"'{bad}' is a legacy RWKV-4neo extra (position embedding / tiny attention / ffnPre), which is not supported")
    return ModelSpec("4", n_layer, c, a, 1, a, ffn, v, {})


# registry with loud misses: (name, signature keys (any), detector)
_REGISTRY: list[tuple[str, tuple[str, ...], Callable[[Mapping], ModelSpec]]] = []


def register_spec(name: str, signatures: tuple[str, ...], detector: Callable[[Mapping], ModelSpec]):
    _REGISTRY.append((name, signatures, detector))


register_spec("7", ("blocks.0.att.r_k", "blocks.0.att.k_k"), _detect_v7)
register_spec("6", ("blocks.0.att.time_maa_x",), _detect_v6)
register_spec("5", ("blocks.0.att.ln_x.weight",), _detect_v5)
register_spec("4", ("blocks.0.att.time_first",), _detect_v4)


def detect(tensors: Mapping, manifest: dict | None = None) -> ModelSpec:
    """Detect the version and hyper-parameters from tensor names and shapes alone."""
    if "_strategy" in tensors or "_version" in tensors:
        raise SpecError("this file was converted by ChatRWKV for one inference strategy (it has '_strategy'); "
                        "use the original training checkpoint (.pth) instead")
    for name, sigs, det in _REGISTRY:
        if any(s in tensors for s in sigs):
            spec = det(tensors)
            _check_heads(spec)
            return spec
    expected = "; ".join(f"v{n}: one of {', '.join(s)}" for n, s, _ in _REGISTRY)
    found = sorted(tensors)[:12]
    raise SpecError(f"unknown layout: no RWKV signature tensor found (expected {expected}); "
                    f"found {len(tensors)} tensors, e.g. {', '.join(found) if found else 'none'}")


def _check_heads(spec: ModelSpec) -> None:
    empty = [f"{k} {v}" for k, v in (("layers", spec.n_layer), ("n_embd", spec.n_embd), ("vocab", spec.vocab),
                                     ("ffn", spec.ffn_dim), ("head size", spec.head_size)) if not v]
    if empty:  # a model without one of its dimensions computes nothing
        raise SpecError(f"v{spec.version}: {', '.join(empty)}: an empty model, not a checkpoint rwkvtools reads")
    if spec.major >= 5 and spec.n_head * spec.head_size != spec.dim_att:
        raise SpecError(f"v{spec.version}: {spec.n_head} heads x head size {spec.head_size} != attention dim {spec.dim_att}")


def param_groups(tensors: Mapping) -> dict[str, int]:
    """Parameter count by group: embedding, time-mix, channel-mix, head, norms/other."""
    out = {"embedding": 0, "time_mix": 0, "channel_mix": 0, "head": 0, "other": 0}
    for k in tensors:
        n = param_count(tensors, k)
        if k.startswith("emb."):
            out["embedding"] += n
        elif k.startswith("head."):
            out["head"] += n
        elif ".att." in k:
            out["time_mix"] += n
        elif ".ffn." in k:
            out["channel_mix"] += n
        else:
            out["other"] += n
    return out


# ---------------------------------------------------------------------------------------------
# the full training-form key set of a version (used by converters to refuse unknown keys and
# mismatched shapes; linear prefixes may hold any representation linear_shape knows)
def layout(spec: ModelSpec) -> dict[str, tuple[tuple, bool]]:
    """name -> (expected shape, required) for every BlinkDL training-form tensor of ``spec``.
    Vectors are listed in their usual stored shape ((1, 1, C) token-shift vectors); a tensor
    with the same number of elements and at most one dimension > 1 is the same vector."""
    C, A, H, N, F_, V = spec.n_embd, spec.dim_att, spec.n_head, spec.head_size, spec.ffn_dim, spec.vocab
    out: dict[str, tuple[tuple, bool]] = {"emb.weight": ((V, C), True), "blocks.0.ln0.weight": ((C,), True),
                                          "blocks.0.ln0.bias": ((C,), True), "ln_out.weight": ((C,), True),
                                          "ln_out.bias": ((C,), True), "head.weight": ((V, C), True)}
    vec = (1, 1, C)
    for i in range(spec.n_layer):
        p, a, f = f"blocks.{i}.", f"blocks.{i}.att.", f"blocks.{i}.ffn."
        for ln in ("ln1", "ln2"):
            out[p + ln + ".weight"] = ((C,), True)
            out[p + ln + ".bias"] = ((C,), True)
        if spec.major == 7:
            for m in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "k_k", "k_a"):
                out[a + m] = (vec, True)
            lo = spec.lora
            out[a + "w1"], out[a + "w2"] = ((C, lo["w"]), True), ((lo["w"], C), True)
            out[a + "a1"], out[a + "a2"] = ((C, lo["a"]), True), ((lo["a"], C), True)
            out[a + "g1"], out[a + "g2"] = ((C, lo["g"]), True), ((lo["g"], C), True)
            if i > 0:
                out[a + "v0"], out[a + "v1"], out[a + "v2"] = (vec, True), ((C, lo["v"]), True), ((lo["v"], C), True)
            else:  # layer 0 may carry unused copies (never read)
                out[a + "v0"], out[a + "v1"], out[a + "v2"] = (vec, False), ((), False), ((), False)
            out[a + "r_k"] = ((H, N), True)
            for m in ("receptance", "key", "value", "output"):
                out[a + m + ".weight"] = ((C, C), True)
            out[a + "ln_x.weight"], out[a + "ln_x.bias"] = ((C,), True), ((C,), True)
            out[f + "x_k"] = (vec, True)
            out[f + "key.weight"], out[f + "value.weight"] = ((F_, C), True), ((C, F_), True)
            continue
        if spec.major == 6:
            for m in ("x", "w", "k", "v", "r", "g"):
                out[a + "time_maa_" + m] = (vec, True)
            dm, dd = spec.lora["mix"], spec.lora["decay"]
            out[a + "time_maa_w1"], out[a + "time_maa_w2"] = ((C, 5 * dm), True), ((5, dm, C), True)
            out[a + "time_decay"] = ((1, 1, A), True)
            out[a + "time_decay_w1"], out[a + "time_decay_w2"] = ((C, dd), True), ((dd, A), True)
            out[a + "time_faaaa"] = ((H, N), True)
            for m in ("time_maa_k", "time_maa_r"):
                out[f + m] = (vec, True)
        else:
            for m in ("k", "v", "r"):
                out[a + "time_mix_" + m] = (vec, True)
            for m in ("k", "r"):
                out[f + "time_mix_" + m] = (vec, True)
            if spec.major == 4:
                out[a + "time_decay"], out[a + "time_first"] = ((A,), True), ((A,), True)
            else:
                dshape = (H, N) if spec.version == "5.2" else (H,)
                out[a + "time_decay"] = (dshape, True)
                out[a + spec.bonus] = (dshape, True)
                if spec.has_gate:
                    out[a + "time_mix_g"] = (vec, True)
        for m in ("receptance", "key", "value"):
            out[a + m + ".weight"] = ((A, C), True)
        out[a + "output.weight"] = ((C, A), True)
        if spec.has_gate:
            out[a + "gate.weight"] = ((A, C), True)
        if spec.major >= 5:
            out[a + "ln_x.weight"], out[a + "ln_x.bias"] = ((A,), True), ((A,), True)
        out[f + "key.weight"], out[f + "value.weight"] = ((F_, C), True), ((C, F_), True)
        out[f + "receptance.weight"] = ((C, C), True)
    return out


def linear_prefixes(spec: ModelSpec) -> list[str]:
    """Prefixes of every nn.Linear-style matrix (stored (out, in) as '<prefix>.weight')."""
    att = ["receptance", "key", "value", "output"] + (["gate"] if spec.has_gate else [])
    ffn = ["key", "value"] + (["receptance"] if spec.major < 7 else [])
    out = []
    for i in range(spec.n_layer):
        out += [f"blocks.{i}.att.{m}" for m in att] + [f"blocks.{i}.ffn.{m}" for m in ffn]
    return out + ["head"]

"""What ``rwkvtools inspect`` shows: version, hyper-parameters, parameter counts by group, dtypes,
form, and the manifest history."""
from __future__ import annotations

from collections import Counter

from .checkpoint import Checkpoint
from .spec import detect, param_groups


def describe(ckpt: Checkpoint) -> dict:
    from .transforms import prepare_for_model
    model_view = prepare_for_model(ckpt)
    spec = detect(model_view.tensors, model_view.manifest)
    dtypes = Counter(str(ckpt.dtype(k)).replace("torch.", "") for k in ckpt.tensors)
    groups = param_groups(ckpt.tensors)
    total = sum(groups.values())
    info = {
        "file": ckpt.source,
        "version": spec.version,
        "form": ckpt.form,
        "hyperparameters": {"n_layer": spec.n_layer, "n_embd": spec.n_embd, "dim_att": spec.dim_att,
                            "n_head": spec.n_head, "head_size": spec.head_size, "ffn_dim": spec.ffn_dim,
                            "vocab": spec.vocab, **({"lora": spec.lora} if spec.lora else {}),
                            **({"bonus": spec.bonus} if spec.bonus else {})},
        "parameters": {"total": total, **groups},
        "tensors": len(ckpt.tensors),
        "dtypes": dict(dtypes),
        "source_format": ckpt.manifest.get("source_format"),
        "history": ckpt.history,
    }
    for k in ("notes", "lowrank", "quantized", "recursive"):
        if k in ckpt.manifest:
            info[k] = ckpt.manifest[k]
    stale = {k: later for k, later in _stale_summaries(ckpt.history).items() if k in info}
    if stale:
        info["stale_summaries"] = stale
    return info


_SUMMARY_OF = {"lowrank": "lowrank", "quantized": "quantize", "recursive": "recursive"}


def _stale_summaries(history: list) -> dict:
    """{summary key: the later transform}: a transform's summary (its sizes and counts) describes
    the model as that transform wrote it; a later lowrank / quantize / recursive changed them."""
    names = [h.get("transform") if isinstance(h, dict) else h for h in history]
    out = {}
    for key, tr in _SUMMARY_OF.items():
        if tr in names:
            last = len(names) - 1 - names[::-1].index(tr)
            later = [n for n in names[last + 1:] if n in _SUMMARY_OF.values()]
            if later:
                out[key] = later[-1]
    return out


def _fmt_n(n: int) -> str:
    for unit, d in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= d:
            return f"{n / d:.2f}{unit}"
    return str(n)


def format_description(info: dict) -> str:
    hp = info["hyperparameters"]
    lines = [f"file        {info['file']}",
             f"version     RWKV v{info['version']} ({info['form']} form)",
             f"layers      {hp['n_layer']}   n_embd {hp['n_embd']}   heads {hp['n_head']} x {hp['head_size']}"
             f"   ffn {hp['ffn_dim']}   vocab {hp['vocab']}"]
    if "lora" in hp:
        lines.append("lora dims   " + "  ".join(f"{k}={v}" for k, v in hp["lora"].items()))
    p = info["parameters"]
    lines.append(f"parameters  {_fmt_n(p['total'])} total: embedding {_fmt_n(p['embedding'])}, time-mix "
                 f"{_fmt_n(p['time_mix'])}, channel-mix {_fmt_n(p['channel_mix'])}, head {_fmt_n(p['head'])}, "
                 f"other {_fmt_n(p['other'])}")
    lines.append("dtypes      " + ", ".join(f"{k} x{v}" for k, v in info["dtypes"].items()))
    if info.get("source_format"):
        sf = info["source_format"]
        lines.append(f"stored as   {sf.get('format')} " + ", ".join(f"{k}={v}" for k, v in sf.items() if k != "format"))
    for n in info.get("notes", []):
        lines.append(f"note        {n}")
    stale = info.get("stale_summaries") or {}
    for k in ("lowrank", "quantized", "recursive"):  # a transform's summary line, if it wrote one
        if isinstance(info.get(k), dict) and info[k].get("summary"):
            when = f"(as written, before {stale[k]}) " if k in stale else ""
            lines.append(f"{k:<11} {when}{info[k]['summary']}")
    if info["history"]:
        lines.append("history:")
        for i, h in enumerate(info["history"], 1):
            opts = ", ".join(f"{k}={v}" for k, v in (h.get("options") or {}).items())
            lines.append(f"  {i}. {h.get('transform')}({opts})")
    else:
        lines.append("history     (none recorded: the file carries no rwkvtools manifest; a plain .pth, "
                     "rwkv.cpp file or another tool's file has none)")
    return "\n".join(lines)


def describe_onnx(path: str) -> dict:
    """What an ONNX file exported by rwkvtools is: its stored metadata (version, mode, dtype,
    opset, interface, the checkpoint's history), its inputs and outputs as onnxruntime sees them,
    and its size (external data included). Read through the same checks as ``eval``."""
    import os

    from .export.onnx_eval import OnnxModel
    m = OnnxModel(path)
    meta = m.meta
    ext = path + ".data"
    size = os.path.getsize(path)
    data = os.path.getsize(ext) if os.path.isfile(ext) else 0

    def io(items):
        return [{"name": x.name, "type": x.type, "shape": list(x.shape)} for x in items]
    keep = ("format", "interface_version", "rwkvtools", "rwkv_version", "mode", "dtype", "opset", "chunk_len",
            "logits", "linear_op", "n_layer", "n_embd", "n_head", "head_size", "vocab", "empty_state", "source",
            "history")
    return {"file": path, "kind": "onnx", **{k: meta.get(k) for k in keep if k in meta},
            "bytes": size, "external_data_bytes": data,
            "inputs": io(m.session.get_inputs()), "outputs": io(m.session.get_outputs())}


def format_onnx_description(info: dict) -> str:
    ins, outs = info["inputs"], info["outputs"]
    states = [x for x in ins if x["name"].startswith("state_in_")]
    groups = sorted({x["name"][len("state_in_"):].split(".")[0] for x in states})

    def shape(x):
        return "[" + ", ".join(str(d) for d in x["shape"]) + "]"
    tok = next((x for x in ins if x["name"] == "tokens"), None)
    logits = next((x for x in outs if x["name"] == "logits"), None)
    lines = [f"file        {info['file']}",
             f"format      ONNX exported by rwkvtools {info.get('rwkvtools')} (interface {info.get('interface_version')})",
             f"version     RWKV v{info.get('rwkv_version')}; {info.get('mode')} mode, {info.get('dtype')}, opset "
             f"{info.get('opset')}, logits {info.get('logits')}"
             + (f", chunk {info['chunk_len']}" if info.get("chunk_len") else ""),
             f"layers      {info.get('n_layer')}   n_embd {info.get('n_embd')}   heads {info.get('n_head')} x "
             f"{info.get('head_size')}   vocab {info.get('vocab')}",
             f"inputs      tokens {shape(tok) if tok else '?'}; {len(states)} state tensors "
             f"state_in_<name>.<layer> ({', '.join(groups)}), all zeros = the empty state",
             f"outputs     logits {shape(logits) if logits else '?'}; the matching state_out_<name>.<layer>",
             f"size        {info['bytes'] / 1e6:.2f} MB" + (f" + {info['external_data_bytes'] / 1e6:.2f} MB external "
                                                          "data" if info["external_data_bytes"] else "")]
    if info.get("source"):
        lines.append(f"exported    from {info['source']}")
    hist = info.get("history") or []
    def step(h):  # {transform, options} (files before: the transform's name only)
        if not isinstance(h, dict):
            return str(h)
        return f"{h.get('transform')}({', '.join(f'{k}={v}' for k, v in (h.get('options') or {}).items())})"
    lines.append("history     " + (" -> ".join(step(h) for h in hist) if hist else "(none)"))
    return "\n".join(lines)

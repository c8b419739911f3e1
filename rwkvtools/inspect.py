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
    return info


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
    for k in ("lowrank", "quantized", "recursive"):  # a transform's summary line, if it wrote one
        if isinstance(info.get(k), dict) and info[k].get("summary"):
            lines.append(f"{k:<11} {info[k]['summary']}")
    if info["history"]:
        lines.append("history:")
        for i, h in enumerate(info["history"], 1):
            opts = ", ".join(f"{k}={v}" for k, v in (h.get("options") or {}).items())
            lines.append(f"  {i}. {h.get('transform')}({opts})")
    else:
        lines.append("history     (none: not written by rwkvtools)")
    return "\n".join(lines)

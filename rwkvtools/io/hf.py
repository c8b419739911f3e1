"""Hugging Face model folders (config.json + weights), read and written.

Layouts (reference notes §11.1-11.3):

* ``rwkv`` (v4): transformers' ``RwkvForCausalLM``;
* ``rwkv5`` (v5.0 and v5.2) / ``rwkv6`` (v6): the community ``Rwkv5ForCausalLM`` /
  ``Rwkv6ForCausalLM`` remote code (BBuf/RWKV-World-HF-Tokenizer converters);
* ``rwkv7`` (v7): flash-linear-attention's ``RWKV7ForCausalLM`` (fla-hub).

All but v7 are renames of the BlinkDL keys with unchanged shapes and values; v7 transposes the
LoRA matrices, squeezes w0/a0/v0/k_k/k_a/ffn.x_k and drops layer 0's unused v0/v1/v2. Every
mapping is exact, so BlinkDL -> HF -> BlinkDL returns the same tensors bit for bit (minus v7's
layer-0 value-residual copies, which no runtime reads). v5.1 (gate + per-head decay) has no HF
implementation and is refused.

Reading accepts ``model.safetensors``, sharded ``model.safetensors.index.json``,
``pytorch_model.bin`` (loaded with weights_only) and its sharded index. Writing produces
``config.json`` + ``model.safetensors`` (streamed tensor by tensor, manifest in its metadata)."""
from __future__ import annotations

import json
import math
import os
import re

import torch

from ..checkpoint import Checkpoint, LazyTensors, default_manifest, load_json, tensor_dtype, tensor_shape
from ..errors import FormatError

_MAX_JSON = 16 * 1024 * 1024
FAMILIES = {"4": "rwkv", "5.0": "rwkv5", "5.2": "rwkv5", "6": "rwkv6", "7": "rwkv7"}
ARCHITECTURES = {"rwkv": "RwkvForCausalLM", "rwkv5": "Rwkv5ForCausalLM", "rwkv6": "Rwkv6ForCausalLM",
                 "rwkv7": "RWKV7ForCausalLM"}
_V4_MIX = {"time_mix_k": "time_mix_key", "time_mix_v": "time_mix_value", "time_mix_r": "time_mix_receptance",
           "time_mix_g": "time_mix_gate"}
_V7_LORA = {"w": "w_lora", "a": "a_lora", "v": "v_lora", "g": "g_lora"}
_V7_LIN = {"receptance": "r_proj", "key": "k_proj", "value": "v_proj", "output": "o_proj"}
_V7_VEC = ("k_k", "k_a")


# ------------------------------------------------------------------------------ name mapping
def _to_hf_rwkv(name: str, family: str) -> str | None:
    if name == "head.weight":
        return "head.weight"
    if name.startswith("emb."):
        return "rwkv.embeddings." + name[4:]
    if name.startswith("blocks.0.ln0."):
        return "rwkv.blocks.0.pre_ln." + name[len("blocks.0.ln0."):]
    if name.startswith("ln_out."):
        return "rwkv." + name
    m = re.match(r"^blocks\.(\d+)\.(att|ffn|ln1|ln2)\.(.+)$", name)
    if not m:
        return None
    i, part, rest = m.groups()
    if part in ("ln1", "ln2"):
        return f"rwkv.blocks.{i}.{part}.{rest}"
    if family in ("rwkv", "rwkv5") and rest in _V4_MIX:
        rest = _V4_MIX[rest]
    return f"rwkv.blocks.{i}.{'attention' if part == 'att' else 'feed_forward'}.{rest}"


def _to_hf_rwkv7(name: str) -> tuple[str, str] | None:
    """BlinkDL name -> (FLA name, transform) with transform in '', 'T', 'squeeze'."""
    if name == "head.weight":
        return "lm_head.weight", ""
    if name == "emb.weight":
        return "model.embeddings.weight", ""
    if name.startswith("blocks.0.ln0."):
        return "model.layers.0.pre_norm." + name[len("blocks.0.ln0."):], ""
    if name.startswith("ln_out."):
        return "model.norm." + name[len("ln_out."):], ""
    m = re.match(r"^blocks\.(\d+)\.(att|ffn|ln1|ln2)\.(.+)$", name)
    if not m:
        return None
    i, part, rest = m.groups()
    L = f"model.layers.{i}."
    if part == "ln1":
        return L + "attn_norm." + rest, ""
    if part == "ln2":
        return L + "ffn_norm." + rest, ""
    if part == "ffn":
        if rest == "x_k":
            return L + "ffn.x_k", "squeeze"
        return L + "ffn." + rest, ""
    if rest in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "r_k"):
        return L + "attn." + rest, ""
    if rest in _V7_VEC:
        return L + "attn." + rest, "squeeze"
    if len(rest) == 2 and rest[0] in _V7_LORA and rest[1] in "012":
        lora = L + "attn." + _V7_LORA[rest[0]] + ".lora."
        return {"0": (lora + "2.bias", "squeeze"), "1": (lora + "0.weight", "T"), "2": (lora + "2.weight", "T")}[rest[1]]
    if rest.endswith(".weight") and rest[:-7] in _V7_LIN:
        return L + "attn." + _V7_LIN[rest[:-7]] + ".weight", ""
    if rest.startswith("ln_x."):
        return L + "attn.g_norm." + rest[5:], ""
    return None


# -------------------------------------------------------------------------------------- write
_HF_FILE = re.compile(r"^[\w.\-]+\.(json|safetensors|bin|txt|model|md|py)$")


def check_replaceable(path: str) -> None:
    """An existing folder is replaced only when it looks like a model folder (config.json, only
    model files, no sub-folders): never a user's working folder. (That it holds no input is
    rwkvtools.io.paths.output_guard's check.)"""
    if not os.path.isdir(path):
        return
    entries = os.listdir(path)
    if entries and ("config.json" not in entries or any(
            os.path.isdir(os.path.join(path, e)) or not _HF_FILE.match(e) for e in entries)):
        raise FormatError(f"{path} is a folder that does not look like a Hugging Face model folder; refusing to "
                          "replace it (remove it yourself or choose a new path)")


def check_writable(ckpt: Checkpoint):
    """Refuse (FormatError) a training-form checkpoint no Hugging Face layout holds; returns
    (spec, family)."""
    from ..spec import detect, layout, linear_prefixes
    t = ckpt.tensors
    spec = detect(t)
    family = FAMILIES.get(spec.version)
    if family is None:
        raise FormatError(f"no Hugging Face implementation loads the RWKV {spec.version} layout (gate with "
                          "per-head decay); supported: v4 (transformers), v5.0 and v5.2 (rwkv5 remote code), "
                          "v6 (rwkv6 remote code), v7 (flash-linear-attention). Write .safetensors or .pth instead")
    for p in linear_prefixes(spec):
        if f"{p}.weight" not in t:
            raise FormatError(f"Hugging Face layouts need dense matrices, but '{p}' is stored in another "
                              "representation; write .safetensors instead")
    lay = layout(spec)
    unknown = [k for k in t if k not in lay]
    if unknown:
        raise FormatError(f"the Hugging Face {family} layout has no place for {len(unknown)} tensor(s), e.g. "
                          f"{', '.join(unknown[:5])}")
    return spec, family


def write_hf(ckpt: Checkpoint, path: str, progress: bool | None = None) -> None:
    """Write a Hugging Face folder: config.json + model.safetensors (training form)."""
    from ..transforms import prepare_for_model
    from .atomic import atomic_dir
    from .safetensors_io import write_safetensors

    check_replaceable(path)
    ckpt = prepare_for_model(ckpt)
    t = ckpt.tensors
    spec, family = check_writable(ckpt)
    names: list[str] = []
    plan: dict[str, tuple[str, str]] = {}
    for k in t:
        if family == "rwkv7":
            if k.startswith("blocks.0.att.v") and k[-1] in "012" and k.count(".") == 3:
                continue  # layer 0's value-residual copies are never read; FLA has no place for them
            hk, how = _to_hf_rwkv7(k)
        else:
            hk, how = _to_hf_rwkv(k, family), ""
        plan[hk] = (k, how)
        names.append(hk)

    def load(hk: str) -> torch.Tensor:
        k, how = plan[hk]
        x = t[k]
        if how == "T":
            return x.t().contiguous()
        if how == "squeeze":
            return x.reshape(-1)
        return x

    shapes, dtypes = {}, {}
    for hk in names:
        k, how = plan[hk]
        s = tuple(tensor_shape(t, k))
        shapes[hk] = (s[1], s[0]) if how == "T" else ((int(torch.tensor(s).prod()),) if how == "squeeze" else s)
        dtypes[hk] = tensor_dtype(t, k)
    config = _config(spec, family, {hk: dtypes[hk] for hk in names if len(shapes[hk]) == 2})  # the matrices' dtype
    out = Checkpoint(LazyTensors(names, load, shapes, dtypes), ckpt.manifest, ckpt.source)
    with atomic_dir(path) as tmp:
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")
        write_safetensors(out, os.path.join(tmp, "model.safetensors"), progress=progress,
                          extra_metadata={"format": "pt"})


def _config(spec, family: str, dtypes: dict) -> dict:
    """config.json; ``dtypes``: the matrices' dtypes (torch_dtype is theirs, vectors stay fp32)."""
    big = [d for d in dtypes.values() if d in (torch.float16, torch.bfloat16, torch.float32)]
    dt = max(set(big), key=big.count) if big else torch.float32
    common = {"architectures": [ARCHITECTURES[family]], "model_type": family, "vocab_size": spec.vocab,
              "hidden_size": spec.n_embd, "num_hidden_layers": spec.n_layer, "intermediate_size": spec.ffn_dim,
              "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 0,
              "torch_dtype": str(dt).replace("torch.", ""), "use_cache": True}
    if family == "rwkv7":
        lo = spec.lora
        return {**common, "head_dim": spec.head_size, "num_heads": spec.n_head, "hidden_ratio": spec.ffn_dim / spec.n_embd,
                "decay_low_rank_dim": lo["w"], "a_low_rank_dim": lo["a"], "v_low_rank_dim": lo.get("v") or lo["a"],
                "gate_low_rank_dim": lo["g"], "norm_eps": 1e-5, "norm_first": True, "norm_bias": True,
                "hidden_act": "sqrelu", "attn_mode": "chunk", "value_dim": [spec.n_embd] * spec.n_layer,
                "fuse_norm": False, "fuse_cross_entropy": False, "max_position_embeddings": 2048}
    # rescale_every 0: the exact choice (the runtimes' fp16 rescale changes LayerNorm eps effects)
    cfg = {**common, "attention_hidden_size": spec.dim_att, "layer_norm_epsilon": 1e-5, "rescale_every": 0,
           "context_length": 4096}
    if family in ("rwkv5", "rwkv6"):
        cfg.update({"head_size": spec.head_size, "num_attention_heads": spec.n_head, "head_size_divisor": 8})
    return cfg


# --------------------------------------------------------------------------------------- read
def _read_json(path: str) -> dict:
    try:
        if os.path.getsize(path) > _MAX_JSON:
            raise FormatError(f"{path}: larger than {_MAX_JSON} bytes; not a config/index file")
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise FormatError(f"{path}: cannot read ({e.strerror or e})") from None
    obj = load_json(raw, path, "config/index file")
    if not isinstance(obj, dict):
        raise FormatError(f"{path}: expected a JSON object")
    return obj


def _family(config: dict, path: str) -> str:
    mt = str(config.get("model_type", "")).lower()
    archs = config.get("architectures") or []
    if not isinstance(archs, list):
        raise FormatError(f"{path}: config.json 'architectures' is {archs!r}, not a list of class names")
    archs = [str(a) for a in archs]
    if mt in ("rwkv", "rwkv5", "rwkv6"):
        return mt
    if mt in ("rwkv7", "rwkv7_fla") or any(a.lower() == "rwkv7forcausallm" for a in archs):
        return "rwkv7"
    raise FormatError(f"{path}: config.json model_type '{mt or '?'}' (architectures {archs or '?'}) is not an RWKV "
                      "layout rwkvtools reads; known: rwkv (v4, transformers), rwkv5, rwkv6 (remote code), "
                      "rwkv7 (flash-linear-attention)")


def _weight_files(path: str) -> tuple[dict[str, str], str]:
    """HF tensor name -> file (within the folder), and the kind 'safetensors' | 'bin'."""
    def inside(fn: str) -> str:
        if not isinstance(fn, str) or os.path.basename(fn) != fn or fn in ("", ".", ".."):
            raise FormatError(f"{path}: weight file name {fn!r} in the index is not a plain file name in the folder")
        full = os.path.join(path, fn)
        if not os.path.isfile(full):
            raise FormatError(f"{path}: the index names '{fn}', which is missing")
        return full

    for index, kind in (("model.safetensors.index.json", "safetensors"), ("pytorch_model.bin.index.json", "bin")):
        ip = os.path.join(path, index)
        if os.path.exists(ip):
            wm = _read_json(ip).get("weight_map")
            if not isinstance(wm, dict) or not wm:
                raise FormatError(f"{ip}: no 'weight_map'")
            return {k: inside(v) for k, v in wm.items()}, kind
    for single, kind in (("model.safetensors", "safetensors"), ("pytorch_model.bin", "bin")):
        sp = os.path.join(path, single)
        if os.path.isfile(sp):
            return {"": sp}, kind
    raise FormatError(f"{path}: no model.safetensors, pytorch_model.bin or their index files")


def read_hf(path: str) -> Checkpoint:
    from .safetensors_io import META_KEY, read_safetensors
    cfg_path = os.path.join(path, "config.json")
    config = _read_json(cfg_path)
    family = _family(config, path)
    files, kind = _weight_files(path)
    sources: dict[str, Checkpoint] = {}
    for fn in sorted(set(files.values())):
        if kind == "safetensors":
            sources[fn] = read_safetensors(fn)
        else:
            from .pth import read_pth
            sources[fn] = read_pth(fn)
    hf: dict[str, Checkpoint] = {}
    for fn, ck in sources.items():
        for k in ck.tensors:
            if "" not in files and files.get(k) != fn:
                continue
            hf[k] = ck
    manifest = default_manifest()
    first = next(iter(sources.values()))
    if kind == "safetensors" and first.manifest.get("format_version") and first.manifest.get("history") is not None:
        # written by rwkvtools: keep its manifest (history) but it describes the training form
        manifest = dict(first.manifest)
    manifest["form"] = "parallel"
    manifest["source_format"] = {"format": "hf", "model_type": family, "weights": kind,
                                 "files": len(sources)}
    manifest.pop(META_KEY, None)
    # inverse mapping
    inv: dict[str, tuple[str, str]] = {}
    for hk in hf:
        b = _from_hf(hk, family)
        if b is None:
            continue
        inv[b[0]] = (hk, b[1])
    unknown = [hk for hk in hf if _from_hf(hk, family) is None]
    if unknown:
        raise FormatError(f"{path}: {len(unknown)} tensor(s) do not belong to the {family} layout, e.g. "
                          f"{', '.join(unknown[:5])}")
    order = [b for b in _blinkdl_order(list(inv))]

    def load(name: str) -> torch.Tensor:
        hk, how = inv[name]
        x = hf[hk].tensors[hk]
        if how == "T":
            return x.t().contiguous()
        if how == "unsqueeze":
            return x.reshape(1, 1, -1)
        return x

    shapes, dtypes = {}, {}
    for name in order:
        hk, how = inv[name]
        s = tuple(hf[hk].shape(hk))
        if how == "T" and len(s) != 2:
            raise FormatError(f"{path}: tensor '{hk}' has shape {s}; a LoRA matrix is 2-D")
        shapes[name] = (s[1], s[0]) if how == "T" else ((1, 1, math.prod(s)) if how == "unsqueeze" else s)
        dtypes[name] = hf[hk].dtype(hk)
    ck = Checkpoint(LazyTensors(order, load, shapes, dtypes), manifest, source=path)
    _check_config(ck, config, family, path)
    return ck


def _from_hf(hk: str, family: str) -> tuple[str, str] | None:
    if family != "rwkv7":
        if hk == "head.weight":
            return "head.weight", ""
        if not hk.startswith("rwkv."):
            return None
        n = hk[5:]
        if n.startswith("embeddings."):
            return "emb." + n[len("embeddings."):], ""
        if n.startswith("blocks.0.pre_ln."):
            return "blocks.0.ln0." + n[len("blocks.0.pre_ln."):], ""
        if n.startswith("ln_out."):
            return n, ""
        m = re.match(r"^blocks\.(\d+)\.(attention|feed_forward|ln1|ln2)\.(.+)$", n)
        if not m:
            return None
        i, part, rest = m.groups()
        if part in ("ln1", "ln2"):
            return f"blocks.{i}.{part}.{rest}", ""
        back = {v: k for k, v in _V4_MIX.items()}
        if family in ("rwkv", "rwkv5"):
            if rest in _V4_MIX:  # un-renamed keys would collide with the renamed ones
                return None
            rest = back.get(rest, rest)
        return f"blocks.{i}.{'att' if part == 'attention' else 'ffn'}.{rest}", ""
    # rwkv7 (FLA)
    if hk == "lm_head.weight":
        return "head.weight", ""
    if hk == "model.embeddings.weight":
        return "emb.weight", ""
    if hk.startswith("model.layers.0.pre_norm."):
        return "blocks.0.ln0." + hk[len("model.layers.0.pre_norm."):], ""
    if hk.startswith("model.norm."):
        return "ln_out." + hk[len("model.norm."):], ""
    m = re.match(r"^model\.layers\.(\d+)\.(attn_norm|ffn_norm|attn|ffn)\.(.+)$", hk)
    if not m:
        return None
    i, part, rest = m.groups()
    B = f"blocks.{i}."
    if part == "attn_norm":
        return B + "ln1." + rest, ""
    if part == "ffn_norm":
        return B + "ln2." + rest, ""
    if part == "ffn":
        if rest == "x_k":
            return B + "ffn.x_k", "unsqueeze"
        if rest in ("key.weight", "value.weight"):
            return B + "ffn." + rest, ""
        return None
    if rest in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "r_k"):
        return B + "att." + rest, ""
    if rest in _V7_VEC:
        return B + "att." + rest, "unsqueeze"
    for c, lname in _V7_LORA.items():
        if rest.startswith(lname + ".lora."):
            sub = rest[len(lname) + 6:]
            return {"2.bias": (B + f"att.{c}0", "unsqueeze"), "0.weight": (B + f"att.{c}1", "T"),
                    "2.weight": (B + f"att.{c}2", "T")}.get(sub)
    for b, f in _V7_LIN.items():
        if rest == f + ".weight":
            return B + f"att.{b}.weight", ""
    if rest.startswith("g_norm."):
        return B + "att.ln_x." + rest[len("g_norm."):], ""
    return None


def _blinkdl_order(names: list[str]) -> list[str]:
    """emb, blocks in index order (layer tensors in file order), ln_out, head."""
    def key(n):
        m = re.match(r"^blocks\.(\d+)\.", n)
        if n.startswith("emb."):
            return (0, 0)
        if m:
            return (1, int(m.group(1)))
        return (2, 0 if n.startswith("ln_out.") else 1)
    return sorted(names, key=key)  # stable: keeps file order inside a layer


def _check_config(ck: Checkpoint, config: dict, family: str, path: str) -> None:
    from ..spec import detect
    if family == "rwkv7" and "blocks.0.ln0.weight" not in ck.tensors:
        raise FormatError(f"{path}: no model.layers.0.pre_norm (norm_first false); RWKV-7 needs ln0")
    spec = detect(ck.tensors)
    want = FAMILIES.get(spec.version)
    if want != family:
        raise FormatError(f"{path}: config.json says {family}, but the tensors are an RWKV {spec.version} layout")
    for key, val in (("hidden_size", spec.n_embd), ("num_hidden_layers", spec.n_layer), ("vocab_size", spec.vocab)):
        got = config.get(key)
        if got is not None and got != val:
            raise FormatError(f"{path}: config.json {key} = {got!r}, but the tensors say {val!r}")

"""``convert``: any readable checkpoint -> any writable format, form and dtype, streamed tensor by
tensor. The library function behind ``rwkvtools convert`` (and recipe steps)."""
from __future__ import annotations

import math
import os
import time

import torch

from ..checkpoint import Checkpoint, LazyTensors, tensor_dtype, tensor_shape
from ..errors import RwkvToolsError, SpecError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FORMS = ("parallel", "rnn")
# formats whose layout fixes the form: rwkv.cpp stores its own inference form, the others training form
_FIXED_FORM = {"rwkvcpp": "rnn", "hf": "parallel", "gguf": "parallel"}
# training-form tensors the runtimes keep in fp32 whatever the weight dtype (decays, bonuses)
_KEEP_FP32 = ("time_decay", "time_first", "time_faaaa", "r_k", "w0")


def keeps_fp32(name: str, shape: tuple) -> bool:
    """True for tensors that stay float32 under --dtype fp16/bf16: vectors (at most one
    dimension > 1: norms, token-shift, per-channel parameters) and decays/bonuses, as ChatRWKV
    and rwkv.cpp keep them. Matrices (linears, embedding, head, LoRA) take the target dtype."""
    if sum(1 for d in shape if d > 1) <= 1:
        return True
    last = name.rsplit(".", 1)[-1]
    return last in _KEEP_FP32


def cast(ckpt: Checkpoint, dtype: str | torch.dtype) -> Checkpoint:
    """Matrices to ``dtype``, the keeps_fp32 tensors to float32; lazy. Training form only."""
    dt = DTYPES[dtype] if isinstance(dtype, str) else dtype
    if ckpt.form != "parallel":
        raise SpecError("cast works on the training form; convert to parallel first")
    src = ckpt.tensors
    names = list(src)
    target = {}
    for k in names:
        cur = tensor_dtype(src, k)
        if not cur.is_floating_point:
            target[k] = cur
        else:
            target[k] = torch.float32 if keeps_fp32(k, tuple(tensor_shape(src, k))) else dt
    changed = [k for k in names if target[k] != tensor_dtype(src, k)]
    if not changed:
        return ckpt

    def load(k):
        x = src[k]
        return x if x.dtype == target[k] else x.to(target[k])

    shapes = {k: tuple(tensor_shape(src, k)) for k in names}
    entry = {"transform": "cast", "options": {"dtype": str(dt).replace("torch.", "")},
             "result": {"tensors_changed": len(changed)}}
    return ckpt.with_tensors(LazyTensors(names, load, shapes, target), entry,
                             dtype=str(dt).replace("torch.", ""))


def check_layout(ckpt: Checkpoint) -> None:
    """Refuse unknown keys and mismatched shapes with a message naming the tensor (training
    form; linear prefixes may hold any representation the model knows, e.g. low-rank)."""
    from ..spec import SHARED_MAP, detect, layout, linear_prefixes, linear_shape
    t = ckpt.tensors
    spec = detect(t)
    lay = layout(spec)
    lin = linear_prefixes(spec)
    lin_set = set(lin)
    problems = []
    for k in t:
        if k == SHARED_MAP:
            continue  # a recursive checkpoint's layer -> block map (checked by spec.shared_map)
        ref = _layout_name(k, lay, spec.n_layer)
        if k.startswith("shared."):
            if ref is None:
                problems.append(f"'{k}' is not a shared block tensor of the RWKV {spec.version} layout "
                                "(expected 'shared.<block>.<a layer tensor's name>')")
                continue
        if ref in lay:
            want, _ = lay[ref]
            have = tuple(tensor_shape(t, k))
            dt = tensor_dtype(t, k)
            if not dt.is_floating_point:  # an integer or complex weight is no RWKV weight (read as garbage)
                problems.append(f"'{k}' is {str(dt).replace('torch.', '')}; RWKV weights are floating point")
                continue
            if not want:
                continue
            vec = sum(1 for d in want if d > 1) <= 1
            if have != want and not (vec and sum(1 for d in have if d > 1) <= 1 and math.prod(have) == math.prod(want)):
                problems.append(f"'{k}' has shape {have}, expected {want} (from the detected RWKV {spec.version} "
                                f"layout: n_embd {spec.n_embd}, heads {spec.n_head}x{spec.head_size}, ffn {spec.ffn_dim})")
            continue
        prefix = k.rsplit(".", 1)[0]
        if prefix in lin_set:
            continue  # another representation of a linear (low-rank factors, quantized, ...)
        problems.append(f"'{k}' is not a tensor of the RWKV {spec.version} layout")
    for k, (_, req) in lay.items():
        if not req or k in t:
            continue
        prefix = k.rsplit(".", 1)[0]
        if k.endswith(".weight") and prefix in lin_set and linear_shape(t, prefix) is not None:
            continue
        problems.append(f"'{k}' is missing")
    for p in lin:
        s = linear_shape(t, p)
        want = lay.get(p + ".weight", ((), False))[0]
        if s is not None and want and tuple(s) != tuple(want):
            problems.append(f"linear '{p}' is {tuple(s)}, expected {tuple(want)}")
    if problems:
        more = f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""
        raise SpecError(f"{len(problems)} problem(s) with the checkpoint's tensors: " + "; ".join(problems[:8]) + more)


def _layout_name(k: str, lay: dict, n_layer: int) -> str | None:
    """The layout entry that ``k`` is shaped like: itself, or for a recursive checkpoint's block
    tensor 'shared.B.REST' the first layer's 'blocks.i.REST' (None when there is none)."""
    if not k.startswith("shared."):
        return k
    parts = k.split(".", 2)
    rest = parts[2] if len(parts) == 3 and parts[1].isdigit() else None
    if rest is None:
        return None
    return next((f"blocks.{i}.{rest}" for i in range(n_layer) if f"blocks.{i}.{rest}" in lay), None)


def canonical_vectors(ckpt: Checkpoint, spec=None) -> Checkpoint:
    """``ckpt`` with each per-channel vector that check_layout let through in another vector layout
    ((C, 1) or (1, C) for (C,), (C,) for (1, 1, C), ...) reshaped to the layout's shape: the same
    values, in the shape the model and every writer expect (a (C, 1) norm weight was an internal
    error in the model and a refused write in the converters)."""
    from ..spec import detect, layout
    spec = spec or detect(ckpt.tensors)  # given for a stored recursive checkpoint (detected on its tied view)
    lay = layout(spec)
    odd = {}
    for k in ckpt.tensors:
        ref = _layout_name(k, lay, spec.n_layer)
        if ref in lay and lay[ref][0] and tuple(ckpt.shape(k)) != tuple(lay[ref][0]):
            odd[k] = lay[ref][0]
    if not odd:
        return ckpt
    src = ckpt.tensors
    names = list(src)
    shapes = {k: odd.get(k) or tuple(ckpt.shape(k)) for k in names}
    dtypes = {k: ckpt.dtype(k) for k in names}
    return ckpt.with_tensors(LazyTensors(names, lambda k: src[k].reshape(odd[k]) if k in odd else src[k],
                                         shapes, dtypes))


def check_form(fmt: str, to: str | None, rescale_every: int | None) -> None:
    """--to and --rescale-every against the output format, before any file is read."""
    if to is not None and to not in FORMS:
        raise RwkvToolsError(f"--to must be one of {', '.join(FORMS)}, got '{to}'")
    fixed = _FIXED_FORM.get(fmt)
    if fixed and to is not None and to != fixed:
        what = "rwkv.cpp's own inference form" if fmt == "rwkvcpp" else "the training (parallel) form"
        raise RwkvToolsError(f"the {fmt} format always stores {what}; --to {to} applies to .pth and .safetensors")
    if rescale_every is not None and rescale_every < 0:
        raise RwkvToolsError("--rescale-every must be >= 0")
    if rescale_every and (to or fixed) not in (None, "rnn"):
        raise RwkvToolsError("--rescale-every applies to the RNN form (--to rnn)")


def convert(src_path: str, dst_path: str, to: str | None = None, format: str | None = None,
            dtype: str | None = None, force: bool = False, rescale_every: int | None = None,
            progress: bool | None = None, **writer_options) -> dict:
    """Convert ``src_path`` to ``dst_path``; returns a report dict.

    ``to``: "parallel" | "rnn" | None (keep the source's form). Only .pth and .safetensors hold
    either form; rwkv.cpp files are always rwkv.cpp's inference form and Hugging Face folders and
    GGUF the training form (asking for the other one is an error).
    ``format``: pth | safetensors | rwkvcpp | hf | gguf (default: from DST's extension).
    ``dtype``: fp32 | fp16 | bf16 for the matrices (vectors and decays stay fp32); rwkv.cpp maps
    fp32/fp16 to its FP32/FP16 types (``writer_options`` may give ``data_type`` instead), GGUF
    passes it to its writer, which applies llama.cpp's rules.
    ``rescale_every``: fp16 residual rescale stored in the RNN form (0 = none; default: keep the
    source's, else 0). ``writer_options`` go to the format's writer.
    Never overwrites SRC; refuses an existing DST unless ``force``; writes atomically."""
    from ..io import read_checkpoint
    from ..io.writers import WRITABLE, check_writer_options, format_from_path, write_checkpoint
    from . import prepare_for_model
    from .rnn_form import to_rnn

    from ..io.paths import output_guard

    if not os.path.exists(src_path):
        raise RwkvToolsError(f"{src_path}: no such file or folder")
    fmt = format or format_from_path(dst_path)
    if fmt not in WRITABLE:
        raise RwkvToolsError(f"unknown output format '{fmt}'; known: {', '.join(WRITABLE)}")
    # DST is not SRC (any spelling, a link), not inside an input folder and not a folder holding
    # SRC; an existing DST only with force, a folder only replaced by a folder
    output_guard(src_path, dst_path, force, fmt=fmt)
    if dtype is not None and dtype not in DTYPES:
        raise RwkvToolsError(f"--dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
    check_form(fmt, to, rescale_every)
    fixed = _FIXED_FORM.get(fmt)
    writer_options = check_writer_options(fmt, writer_options)  # before any work

    t0 = time.perf_counter()
    src = read_checkpoint(src_path)
    src_form = src.form
    target_form = to or (src_form if fmt in ("pth", "safetensors") else fixed)
    if rescale_every and target_form != "rnn":
        raise RwkvToolsError("--rescale-every applies to the RNN form (--to rnn)")
    ck = prepare_for_model(src)
    check_layout(ck)
    from ..spec import SHARED_MAP, detect
    spec = detect(ck.tensors)
    ck = canonical_vectors(ck, spec)
    if SHARED_MAP in ck.tensors:  # recursive: written as stored (each shared tensor once), never expanded
        if fmt not in ("pth", "safetensors"):
            raise RwkvToolsError(f"{src_path} is a recursive checkpoint (its layers share blocks, 'shared.*' "
                                 f"tensors), and the {fmt} format needs every layer's own matrices: expand it "
                                 "first with `rwkvtools recursive SRC PLAIN --merge`, or write .safetensors/.pth")
        if target_form != "parallel":
            raise RwkvToolsError(f"{src_path} is a recursive checkpoint: the RNN form holds every layer's own "
                                 "tensors; expand it first with `rwkvtools recursive SRC PLAIN --merge` and "
                                 "convert PLAIN --to rnn")
        ck = canonical_vectors(src, spec)  # written as stored, its vectors in the layout's shapes as any model's
    options = dict(writer_options)
    if fmt == "rwkvcpp":
        if dtype == "bf16":
            raise RwkvToolsError("rwkv.cpp files have no bf16 type; use --dtype fp32 or fp16")
        if dtype and "data_type" not in options:
            options["data_type"] = dtype.upper()
        elif "data_type" not in options:  # unchanged: an fp16 model stays FP16 (not widened to FP32)
            from ..io.rwkvcpp import source_data_type
            options["data_type"] = source_data_type(ck)
        dtype = None  # the rwkv.cpp writer applies its own per-tensor rules
    elif fmt == "gguf":
        if dtype and "dtype" not in options:
            options["dtype"] = dtype  # the GGUF writer applies llama.cpp's own F32 rules
        dtype = options.get("dtype")
    elif dtype:
        ck = cast(ck, dtype)
    if target_form == "rnn" and fmt in ("pth", "safetensors"):
        if rescale_every is None:
            rescale_every = (src.manifest.get("rnn") or {}).get("rescale_every", 0) if src_form == "rnn" else 0
        ck = to_rnn(ck, rescale_every)
    if fmt == "gguf" and (options.get("quant") or options.get("dtype")):  # the GGUF writer casts/quantizes:
        lossy = {"format": "gguf", **({"dtype": options["dtype"]} if options.get("dtype") else {}),  # say so in
                 **({"quant": options["quant"], "method": "rtn"} if options.get("quant") else {})}  # its history
        ck = ck.with_tensors(ck.tensors, {"transform": "convert", "options": lossy})
    options["progress"] = progress
    written: dict = {}
    write_checkpoint(ck, dst_path, fmt, writer_report=written, **options)
    dt = time.perf_counter() - t0
    return {"src": src_path, "dst": dst_path, "format": fmt, "version": spec.version,
            "form_before": src_form, "form_after": target_form,
            "dtype": dtype or options.get("data_type") or "unchanged",
            **({"quant": options["quant"]} if options.get("quant") else {}),
            **written,   # GGUF: every tensor type written, and each demotion of a --quant type
            "tensors": len(ck.tensors), "params": _written_params(dst_path, fmt, ck),
            "bytes_src": _size(src_path), "bytes_dst": _size(dst_path), "seconds": dt,
            "source_format": (src.manifest.get("source_format") or {}).get("format", _sniff(src_path))}


def _written_params(path: str, fmt: str, ck: Checkpoint) -> int:
    """Parameters of the file as written (a GGUF writer densifies low-rank and int8/int4
    linears, so the checkpoint it was given may hold fewer); shapes only, nothing loaded."""
    if fmt != "gguf":
        return ck.num_params()
    from ..io import read_checkpoint
    return read_checkpoint(path).num_params()


def _sniff(path: str) -> str:
    from ..io import sniff
    return sniff(path)


def _size(path: str) -> int:
    from ..io.paths import disk_bytes
    return disk_bytes(path) or 0


def compare_checkpoints(a: Checkpoint, b: Checkpoint) -> dict:
    """Tensor by tensor (training form, float32): how far ``b`` is from ``a``. Tensors only one
    side has are listed (e.g. v7 layer 0's unused value-residual copies, which FLA drops)."""
    from . import prepare_for_model
    a, b = prepare_for_model(a), prepare_for_model(b)
    only_a = [k for k in a.tensors if k not in b.tensors]
    only_b = [k for k in b.tensors if k not in a.tensors]
    worst, worst_name, identical, n, same = 0.0, None, 0, 0, 0
    for k in a.tensors:
        if k not in b.tensors:
            continue
        x, y = a.tensors[k], b.tensors[k]
        n += 1
        if tuple(x.shape) != tuple(y.shape):
            return {"compared": n, "identical": identical, "shape_mismatch": k, "max_abs_diff": math.inf,
                    "max_abs_diff_tensor": k, "shapes": [list(x.shape), list(y.shape)],
                    "only_in_source": only_a, "only_in_output": only_b}
        if x.dtype == y.dtype and torch.equal(x, y):
            identical += 1
            same += 1
            continue
        d = 0.0
        if x.numel():
            diff = (x.float() - y.float()).abs()
            diff[x.float().isnan() & y.float().isnan()] = 0.0  # NaN where the source has NaN: kept as is
            d = float(diff.max())
            if math.isnan(d):
                d = math.inf  # a NaN only one side has: as far apart as can be (NaN compares false)
        if d == 0.0:
            identical += 1
        if d > worst or worst_name is None:
            worst, worst_name = d, k
    return {"compared": n, "identical": identical, "max_abs_diff": worst,
            "max_abs_diff_tensor": worst_name if worst > 0 else None,
            "only_in_source": only_a, "only_in_output": only_b,
            # the same tensors, dtypes and values: the same model (it runs the same arithmetic)
            "same_model": n > 0 and same == n and not only_a and not only_b}

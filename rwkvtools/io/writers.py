"""Pick a writer from the output path (or an explicit format)."""
from __future__ import annotations

import json
import os

from ..checkpoint import Checkpoint
from ..errors import FormatError, RwkvToolsError

WRITABLE = ("pth", "safetensors", "rwkvcpp", "hf", "gguf")


EXTENSIONS = {".pth": "pth", ".pt": "pth", ".safetensors": "safetensors", ".bin": "rwkvcpp", ".gguf": "gguf"}


def format_from_path(path: str) -> str:
    """The output format DST's name asks for: its extension, a folder (existing, or a name without
    extension) = Hugging Face; an extension no format has is an error (it used to mean
    safetensors, so `x.onnx` or `RWKV-7-1.5B` got a safetensors file)."""
    given = os.path.splitext(os.path.basename(os.path.normpath(path)))[1]
    ext = given.lower()
    if ext in EXTENSIONS:
        return EXTENSIONS[ext]
    if os.path.isdir(path):
        return "hf"
    if ext == "":
        return "safetensors" if os.path.isfile(path) else "hf"
    onnx = " (ONNX files are written by `rwkvtools export-onnx`)" if ext == ".onnx" else ""
    raise FormatError(f"{path}: cannot tell the output format from the extension '{given}'{onnx}: name it "
                      ".pth/.pt, .safetensors, .bin (rwkv.cpp), .gguf or a folder without extension "
                      "(Hugging Face); convert also takes the format as --format")


def write_checkpoint(ckpt: Checkpoint, path: str, format: str | None = None, writer_report: dict | None = None,
                     **options) -> str:
    """Write ``ckpt`` to ``path`` in ``format`` (default: from the extension: .pth, .safetensors,
    .bin = rwkv.cpp, .gguf, no extension = Hugging Face folder). ``options`` go to the format's
    writer (rwkvcpp: data_type, blocks, base_type, version; gguf: its own; all: progress).
    ``writer_report``: filled with what the writer reports (GGUF: tensor types, fallbacks)."""
    fmt = format or format_from_path(path)
    options = check_writer_options(fmt, options)
    if fmt == "pth":
        from .pth import write_pth
        options.pop("progress", None)
        write_pth(ckpt, path)
    elif fmt == "safetensors":
        from .safetensors_io import write_safetensors
        write_safetensors(ckpt, path, **options)
    elif fmt == "rwkvcpp":
        from .rwkvcpp import write_rwkvcpp
        write_rwkvcpp(ckpt, path, **options)
    elif fmt == "hf":
        from .hf import write_hf
        write_hf(ckpt, path, **options)
    elif fmt == "gguf":
        try:
            from .gguf_io import write_gguf
        except ImportError:
            raise RwkvToolsError("writing GGUF is not available in this build") from None
        rep = write_gguf(ckpt, path, **options)
        if writer_report is not None:
            writer_report.update({k: rep[k] for k in ("tensor_types", "fallbacks") if k in rep})
    else:
        raise RwkvToolsError(f"unknown output format '{fmt}'; known: {', '.join(WRITABLE)}")
    return fmt


def check_writable(ckpt: Checkpoint, fmt: str) -> None:
    """Refuse, before any work, a checkpoint the ``fmt`` writer would refuse only when writing
    (a layout or representation the format cannot hold: e.g. low-rank matrices for rwkv.cpp or
    Hugging Face, RWKV-4/5 for GGUF); .pth and .safetensors hold every checkpoint."""
    from ..transforms import prepare_for_model
    if fmt == "rwkvcpp":
        from .rwkvcpp import check_writable as check
    elif fmt == "hf":
        from .hf import check_writable as check
    elif fmt == "gguf":
        from .gguf_io import gguf_plan as check
    else:
        return
    check(prepare_for_model(ckpt))


# What each format's writer takes as options, by kind of value: the options a user may give
# (`convert --writer-option KEY=VALUE`, or keyword arguments of the Python `convert`). `blocks`
# (precomputed quantized blocks) and `progress` are passed by rwkvtools itself, from Python only.
WRITER_OPTIONS = {
    "pth": {},
    "safetensors": {"extra_metadata": "JSON object"},
    "rwkvcpp": {"data_type": "string", "base_type": "string", "version": "integer"},
    "hf": {},
    "gguf": {"dtype": "string", "quant": "string", "embed_type": "string", "head_type": "string",
             "tokenizer": "string", "vocab_file": "string", "name": "string"},
}
PYTHON_ONLY_OPTIONS = {"rwkvcpp": ("blocks",), "gguf": ("blocks",)}
_KINDS = {"string": "a string", "integer": "an integer", "JSON object": "a JSON object of strings"}


def check_writer_options(fmt: str, options: dict, from_cli: bool = False) -> dict:
    """``options`` checked against what the ``fmt`` writer takes, before any work: an unknown name
    or a value of the wrong kind is a :class:`RwkvToolsError` naming the writer's options (it was
    an internal error inside the writer, after the conversion). ``from_cli``: the values are the
    command line's strings (``KEY=VALUE``) and are turned into the option's kind; `blocks` and
    `progress` are not command-line options. Returns the options with their values."""
    known = WRITER_OPTIONS.get(fmt, {})
    internal = () if from_cli else PYTHON_ONLY_OPTIONS.get(fmt, ()) + ("progress",)
    out = {}
    for key, value in options.items():
        if key in internal:
            out[key] = value
            continue
        if key not in known:
            hint = " (use --progress)" if from_cli and key == "progress" else ""
            if not known:
                raise RwkvToolsError(f"the {fmt} writer takes no options ({key}){hint}")
            raise RwkvToolsError(f"the {fmt} writer has no option '{key}'{hint}; its options: "
                                 + ", ".join(f"{k} ({v})" for k, v in known.items()))
        out[key] = _option_value(fmt, key, known[key], value, from_cli)
    return out


def _option_value(fmt: str, key: str, kind: str, value, from_cli: bool):
    if from_cli and kind == "integer":
        try:
            value = int(value)
        except ValueError:
            pass
    elif from_cli and kind == "JSON object":
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
    ok = {"string": lambda v: isinstance(v, str),
          "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
          "JSON object": lambda v: isinstance(v, dict) and all(isinstance(a, str) and isinstance(b, str)
                                                          for a, b in v.items())}[kind]
    if value is not None and not ok(value):
        raise RwkvToolsError(f"the {fmt} writer's option '{key}' must be {_KINDS[kind]}, got {value!r}")
    return value

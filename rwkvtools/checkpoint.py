"""The in-memory checkpoint: a mapping of tensor names to tensors plus a manifest.

Readers return a ``Checkpoint``; transforms take one and return a new one (never mutating the
input); writers take one. Tensors may be lazy (memory-mapped safetensors): ``tensors[name]``
materialises one tensor at a time, so a large model can be streamed tensor by tensor.
"""
from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from .errors import FormatError

MANIFEST_FORMAT_VERSION = 1


class LazyTensors(Mapping):
    """Read-only mapping name -> tensor whose values are produced on access by ``loader``."""

    def __init__(self, names: list[str], loader: Callable[[str], torch.Tensor],
                 shapes: dict[str, tuple] | None = None, dtypes: dict[str, torch.dtype] | None = None):
        self._names = list(names)
        self._set = set(names)
        self._loader = loader
        self._shapes = shapes or {}
        self._dtypes = dtypes or {}

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._set:
            raise KeyError(name)
        return self._loader(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._set

    def shape(self, name: str) -> tuple:
        if name in self._shapes:
            return tuple(self._shapes[name])
        return tuple(self[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        if name in self._dtypes:
            return self._dtypes[name]
        return self[name].dtype


def tensor_shape(tensors: Mapping, name: str) -> tuple:
    """Shape of a tensor without materialising it when the mapping knows shapes."""
    if isinstance(tensors, LazyTensors):
        return tensors.shape(name)
    return tuple(tensors[name].shape)


def tensor_dtype(tensors: Mapping, name: str) -> torch.dtype:
    if isinstance(tensors, LazyTensors):
        return tensors.dtype(name)
    return tensors[name].dtype


# the RNN form's reserved names: what to_parallel needs to give the training form back bit for bit
# (kept originals of decays, elements an fp16 rescale lost bits of); storage, not parameters
RNN_RESERVED = "_parallel."


def param_count(tensors: Mapping, name: str) -> int:
    """Model parameters a stored tensor holds: a quantized linear counts its logical (out x in)
    weights however packed (int4: two per stored byte), and its scales and zero points are
    storage, not parameters; so are the RNN form's reserved tensors (RNN_RESERVED) and integer
    index tensors (recursive's shared.map); any other tensor counts its elements. So bits per
    weight (8 x bytes / parameters) compare across float, int8 and int4 files, and both forms of a
    model count the same parameters."""
    if name.startswith(RNN_RESERVED):
        return 0
    prefix, _, suffix = name.rpartition(".")
    if suffix not in ("weight_int8", "weight_int4") and not tensor_dtype(tensors, name).is_floating_point:
        return 0   # an index (a recursive model's layer -> block map), not a parameter
    if suffix in ("weight_scale", "weight_zero") and (
            f"{prefix}.weight_int8" in tensors or f"{prefix}.weight_int4" in tensors):
        return 0
    n = 2 if suffix == "weight_int4" else 1
    for d in tensor_shape(tensors, name):
        n *= d
    return n


def default_manifest() -> dict[str, Any]:
    return {"format_version": MANIFEST_FORMAT_VERSION, "form": "parallel", "history": []}


# the stored forms a transform leaves in a checkpoint's tensor names (no manifest needed)
_FORM_SUFFIXES = {"quantized": (".weight_int8", ".weight_int4"), "lowrank": (".weight_u",)}


def stored_forms(names) -> set[str]:
    """Which of 'quantized' (int8/int4 linears), 'lowrank' (factored linears) and 'recursive'
    (layers sharing blocks: 'shared.map') the tensor ``names`` hold; empty for a dense model."""
    names = list(names)
    forms = {f for f, suffixes in _FORM_SUFFIXES.items() if any(k.endswith(suffixes) for k in names)}
    if "shared.map" in names:
        forms.add("recursive")
    return forms


# JSON that rwkvtools reads from files (safetensors headers, manifests, config.json, ONNX
# metadata) holds a few thousand objects at most; a file of millions of tiny ones ('[{},{},...]')
# would take gigabytes as Python objects before any check could look at it
MAX_JSON_OBJECTS = 200_000


class _TooManyObjects(Exception):
    pass


def load_json(text, where: str, what: str = "JSON"):
    """json.loads, stopped once the text has built MAX_JSON_OBJECTS objects or lists (memory
    bounded by that, not by the text), errors as FormatError naming ``where``."""
    from .errors import FormatError
    count = [0]

    def hook(pairs):
        count[0] += 1
        if count[0] > MAX_JSON_OBJECTS:
            raise _TooManyObjects
        return dict(pairs)

    def parse_array(s_and_end, scan_once, _orig=json.decoder.JSONArray):
        count[0] += 1
        if count[0] > MAX_JSON_OBJECTS:
            raise _TooManyObjects
        return _orig(s_and_end, scan_once)

    decoder = json.JSONDecoder(object_pairs_hook=hook)
    decoder.parse_array = parse_array
    decoder.scan_once = json.scanner.py_make_scanner(decoder)  # the C scanner ignores parse_array
    try:
        if isinstance(text, (bytes, bytearray)):
            text = bytes(text).decode("utf-8")
        return decoder.decode(text)
    except _TooManyObjects:
        raise FormatError(f"{where}: the {what} holds more than {MAX_JSON_OBJECTS:,} objects/lists; not one "
                          "rwkvtools reads") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{where}: the {what} is not valid JSON ({e})") from None
    except RecursionError:
        raise FormatError(f"{where}: the {what} is nested too deep") from None


def parse_manifest(text, where: str) -> dict[str, Any]:
    """The manifest a file stores as JSON text (or UTF-8 bytes), checked to have the structure the
    rest of rwkvtools reads: an object, ``form`` a string, ``history`` a list of objects (their
    ``options`` objects), ``notes`` a list. ``where`` names the file in the FormatError."""
    m = load_json(text, where, "stored manifest")
    if not isinstance(m, dict):
        raise FormatError(f"{where}: the stored manifest is not a JSON object")
    history = m.get("history", [])
    if m.get("form", "parallel") not in ("parallel", "rnn"):
        raise FormatError(f"{where}: the stored manifest is damaged ('form' is {m.get('form')!r}; rwkvtools "
                          "writes 'parallel' or 'rnn')")
    if (not isinstance(m.get("form", ""), str) or not isinstance(history, list)
            or not isinstance(m.get("notes", []), list)
            or not all(isinstance(h, dict) and isinstance(h.get("options", {}), dict) for h in history)):
        raise FormatError(f"{where}: the stored manifest is damaged ('form' must be a string, 'history' "
                          "a list of objects, 'notes' a list)")
    return m


@dataclass
class Checkpoint:
    tensors: Mapping[str, torch.Tensor]
    manifest: dict[str, Any] = field(default_factory=default_manifest)
    source: str | None = None  # path it was read from, for messages

    def shape(self, name: str) -> tuple:
        return tensor_shape(self.tensors, name)

    def dtype(self, name: str) -> torch.dtype:
        return tensor_dtype(self.tensors, name)

    @property
    def form(self) -> str:
        return self.manifest.get("form", "parallel")

    @property
    def history(self) -> list[dict]:
        return self.manifest.get("history", [])

    def with_tensors(self, tensors: Mapping[str, torch.Tensor], entry: dict | None = None,
                     **manifest_updates) -> "Checkpoint":
        """A new checkpoint with other tensors; ``entry`` is appended to the history."""
        manifest = copy.deepcopy(self.manifest)
        manifest.update(manifest_updates)
        if entry is not None:
            manifest.setdefault("history", []).append(entry)
        return Checkpoint(tensors=tensors, manifest=manifest, source=self.source)

    def materialize(self) -> "Checkpoint":
        return Checkpoint({k: self.tensors[k] for k in self.tensors}, copy.deepcopy(self.manifest), self.source)

    def num_params(self) -> int:
        """Parameters of the model the checkpoint holds (see param_count)."""
        return sum(param_count(self.tensors, k) for k in self.tensors)

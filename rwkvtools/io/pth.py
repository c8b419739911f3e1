"""BlinkDL ``.pth`` training checkpoints (a flat dict of tensors, as RWKV-LM saves them).

Loaded with ``torch.load(weights_only=True)``: a pickle that needs any code to load is refused."""
from __future__ import annotations

import json
import os
import pickle
import zipfile

import torch

from ..checkpoint import Checkpoint, default_manifest
from ..errors import FormatError, UnsafeFileError
from .atomic import atomic_path

# RWKV-LM files hold tensors only, so a training-form .pth carries no manifest. An RNN-form .pth
# (not a training checkpoint) keeps its manifest as UTF-8 JSON bytes in this uint8 tensor, without
# which the form could not be undone.
MANIFEST_KEY = "_rwkvtools_manifest"
_MAX_MANIFEST = 64 * 1024 * 1024


def read_pth(path: str) -> Checkpoint:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))
    except pickle.UnpicklingError as e:
        msg = str(e).splitlines()[0] if str(e) else "unpickling refused"
        raise UnsafeFileError(
            f"{path}: refused to load: the pickle needs code to run ({msg[:200]}). rwkvtools only loads "
            "plain tensor checkpoints (torch.load weights_only=True); re-save the state dict with "
            "torch.save({k: v for k, v in sd.items()}) from a trusted environment") from None
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, OSError, AttributeError, IndexError, KeyError) as e:
        raise FormatError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise FormatError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    manifest = default_manifest()
    if MANIFEST_KEY in obj:
        m = obj.pop(MANIFEST_KEY)
        if not (isinstance(m, torch.Tensor) and m.dtype == torch.uint8 and m.dim() == 1 and m.numel() <= _MAX_MANIFEST):
            raise FormatError(f"{path}: '{MANIFEST_KEY}' must be a 1-D uint8 tensor of JSON bytes")
        try:
            manifest = json.loads(bytes(m.numpy().tobytes()).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise FormatError(f"{path}: '{MANIFEST_KEY}' is not valid JSON") from None
        if not isinstance(manifest, dict):
            raise FormatError(f"{path}: '{MANIFEST_KEY}' is not a JSON object")
    tensors = {}
    for k, v in obj.items():
        if not isinstance(k, str):
            raise FormatError(f"{path}: expected string keys, found {k!r}")
        if not isinstance(v, torch.Tensor):
            raise FormatError(f"{path}: entry '{k}' is a {type(v).__name__}, expected a tensor")
        tensors[k] = v
    return Checkpoint(tensors, manifest, source=path)


def _own(t: torch.Tensor) -> torch.Tensor:
    """The tensor itself when it owns its whole storage (torch.save then writes it directly,
    from a memory map too); a compact copy when it is a view into a bigger storage."""
    t = t.detach()
    if (t.is_contiguous() and t.storage_offset() == 0
            and t.untyped_storage().nbytes() == t.numel() * t.element_size()):
        return t
    return t.contiguous().clone()


def write_pth(ckpt: Checkpoint, path: str) -> None:
    """Write exactly the tensors (keys, shapes, dtypes) as RWKV-LM saves them: a flat dict in
    the checkpoint's order. An RNN-form checkpoint also stores its manifest (see MANIFEST_KEY).
    torch.save needs every tensor at once: tensors of a memory-mapped source are written from
    the map, others are materialised (one copy of the model at most)."""
    sd = {k: _own(ckpt.tensors[k]) for k in ckpt.tensors}
    if ckpt.form != "parallel":
        blob = json.dumps(ckpt.manifest, sort_keys=True).encode("utf-8")
        sd[MANIFEST_KEY] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    with atomic_path(path) as tmp:
        torch.save(sd, tmp)


def _is_zip(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PK\x03\x04" and os.path.getsize(path) > 22
    except OSError:
        return False

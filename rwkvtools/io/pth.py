"""BlinkDL ``.pth`` training checkpoints (a flat dict of tensors, as RWKV-LM saves them).

Loaded with ``torch.load(weights_only=True)``: a pickle that needs any code to load is refused."""
from __future__ import annotations

import os
import pickle
import zipfile

import torch

from ..checkpoint import Checkpoint, default_manifest
from ..errors import FormatError, UnsafeFileError
from .atomic import atomic_path

MANIFEST_KEY = "_rwkvtools_manifest"  # never written into .pth (RWKV-LM files hold tensors only)


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
    tensors = {}
    for k, v in obj.items():
        if not isinstance(k, str):
            raise FormatError(f"{path}: expected string keys, found {k!r}")
        if not isinstance(v, torch.Tensor):
            raise FormatError(f"{path}: entry '{k}' is a {type(v).__name__}, expected a tensor")
        tensors[k] = v
    return Checkpoint(tensors, default_manifest(), source=path)


def write_pth(ckpt: Checkpoint, path: str) -> None:
    """Write exactly the tensors (keys, shapes, dtypes) as RWKV-LM saves them."""
    sd = {k: ckpt.tensors[k].contiguous().clone() for k in ckpt.tensors}
    with atomic_path(path) as tmp:
        torch.save(sd, tmp)


def _is_zip(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PK\x03\x04" and os.path.getsize(path) > 22
    except OSError:
        return False

"""BlinkDL ``.pth`` training checkpoints (a flat dict of tensors, as RWKV-LM saves them).

Loaded with ``torch.load(weights_only=True)``: a pickle that needs any code to load is refused."""
from __future__ import annotations

import io
import json
import os
import pickle
import pickletools
import re
import struct
import warnings
import zipfile

import torch

from ..checkpoint import Checkpoint, default_manifest, parse_manifest, stored_forms
from ..errors import FormatError, UnsafeFileError
from .atomic import staged_output

# RWKV-LM files hold tensors only, so a training-form .pth carries no manifest. An RNN-form .pth
# (not a training checkpoint) keeps its manifest as UTF-8 JSON bytes in this uint8 tensor, without
# which the form could not be undone.
MANIFEST_KEY = "_rwkvtools_manifest"
_MAX_MANIFEST = 64 * 1024 * 1024


def read_pth(path: str) -> Checkpoint:
    try:
        obj = _torch_load(path)
    except pickle.UnpicklingError as e:
        msg = _refusal_reason(str(e))
        raise UnsafeFileError(
            f"{path}: refused to load: the pickle needs code to run ({msg}). rwkvtools only loads "
            "plain tensor checkpoints (torch.load weights_only=True); re-save the state dict with "
            "torch.save({k: v for k, v in sd.items()}) from a trusted environment") from None
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, OSError, AttributeError, IndexError,
            KeyError, TypeError, AssertionError, struct.error) as e:
        # what torch's loader raises on a damaged file: a broken archive or pickle (struct.error: a
        # pickle cut short), rebuild functions given arguments of the wrong type (TypeError),
        # storage keys that match no storage (AssertionError, legacy files)
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
        manifest = parse_manifest(m.numpy().tobytes(), f"{path} ('{MANIFEST_KEY}')")
    tensors = {}
    stored: dict[int, int] = {}  # storage -> its bytes: what the file really holds
    claimed = 0
    for k, v in obj.items():
        if not isinstance(k, str):
            raise FormatError(f"{path}: expected string keys, found {k!r}")
        if not isinstance(v, torch.Tensor):
            raise FormatError(f"{path}: entry '{k}' is a {type(v).__name__}, expected a tensor")
        # a view may repeat its storage (zero or overlapping strides): a few bytes in the file
        # that claim a tensor of any size, materialised in full by every use
        nbytes, have = v.numel() * v.element_size(), v.untyped_storage().nbytes()
        if nbytes > have:
            raise FormatError(f"{path}: tensor '{k}' of shape {tuple(v.shape)} claims {nbytes:,} bytes from "
                              f"{have:,} stored (repeated by its strides {tuple(v.stride())}); a checkpoint stores "
                              "every element")
        stored[v.untyped_storage().data_ptr()] = have
        claimed += nbytes
        tensors[k] = v
    if claimed > 2 * sum(stored.values()) + (1 << 20):  # tied pairs (e.g. emb/head) are fine, a fan-out is not
        raise FormatError(f"{path}: its tensors claim {claimed:,} bytes from {sum(stored.values()):,} stored (views "
                          "of the same storage many times over); a checkpoint stores every tensor")
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
    the checkpoint's order. An RNN-form, low-rank, int8/int4 or recursive checkpoint also stores its
    manifest (see MANIFEST_KEY).
    torch.save needs every tensor at once: tensors of a memory-mapped source are written from
    the map, others are materialised (one copy of the model at most)."""
    sd = {k: _own(ckpt.tensors[k]) for k in ckpt.tensors}
    # the manifest goes in where the file is no plain RWKV-LM checkpoint anyway (RNN form, low-rank,
    # int8/int4, recursive: what RWKV-LM and ChatRWKV cannot load as they are): kept, not dropped
    if ckpt.form != "parallel" or stored_forms(ckpt.tensors):
        blob = json.dumps(ckpt.manifest, sort_keys=True).encode("utf-8")
        sd[MANIFEST_KEY] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    # staged under the final file name: torch.save names the zip's inner folder after the file it
    # writes (RWKV-LM's 'rwkv-final/data.pkl'), not after a temporary name
    with staged_output(path) as staged:
        torch.save(sd, staged)


def _refusal_reason(text: str) -> str:
    """What torch's weights-only unpickler refused, in a few words ('it names the global
    posix.system', 'pickle opcode 149'), without torch's own preamble and advice (re-running
    torch.load with weights_only=False, allow-listing the global), which are not for this tool's
    users. torch words these messages differently from case to case and release to release."""
    m = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+?)(?:[.,]?\s|$)", text)
    if m:
        return f"it names the global {m.group(1)}"
    m = re.search(r"Unsupported operand (\d+)", text)
    if m:
        return f"pickle opcode {m.group(1)}, which plain tensor files do not use"
    rest = text.partition("WeightsUnpickler error:")[2]
    line = next((ln.strip() for ln in rest.splitlines() if ln.strip()), "")
    return line.split(". ")[0].rstrip(".")[:200] or "unpickling refused"


def _torch_load(path: str):
    # torch warns about pickle protocols other than 2 (a hand-made or hostile file) before it
    # refuses or loads; the refusal, if any, is the message the user gets
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        return _torch_load_quiet(path)


def _torch_load_quiet(path: str):
    """torch.load(weights_only=True), a zip file from a memory map. torch.load(path) reads any path
    ending in '.safetensors' as safetensors, so such a name is opened here first. A legacy (pre-zip)
    file is read from memory, after the storage sizes it declares are checked against its size."""
    if _is_zip(path):
        _check_zip(path)
        if not os.fspath(path).endswith(".safetensors"):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        with open(path, "rb") as f:
            return torch.load(f, map_location="cpu", weights_only=True)
    with open(path, "rb") as f:
        data = f.read()
    _check_legacy_sizes(data, path)
    # from memory: a corrupt string length in the pickle cannot make a read allocate beyond the file
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _check_zip(path: str) -> None:
    """torch's zip reader allocates a record at the size the zip directory states before reading
    it: check every record against the file first. torch.save stores records uncompressed (and a
    memory-mapped load cannot read compressed ones), so a compressed record is refused too. Then
    the pickle's tensor rebuild functions (see _check_rebuild)."""
    size = os.path.getsize(path)
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
            for i in infos:
                if i.compress_type != zipfile.ZIP_STORED or i.file_size != i.compress_size \
                        or i.header_offset + i.compress_size > size:
                    raise FormatError(f"{path}: corrupt PyTorch checkpoint: zip record '{i.filename}' states "
                                      f"{i.file_size} bytes ({i.compress_size} stored, method "
                                      f"{i.compress_type}) at byte {i.header_offset}; the file has {size}")
            pkl = [(i.filename, z.read(i)) for i in infos if i.filename.endswith("/data.pkl")][:1]
            records = {i.filename: i.file_size for i in infos}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise FormatError(f"{path}: not a readable PyTorch checkpoint (damaged zip archive: {e})") from None
    try:
        for op, arg, _ in pickletools.genops(pkl[0][1] if pkl else b""):
            if op.name == "GLOBAL":  # the only way torch's weights-only unpickler names a global
                _check_rebuild(*arg.partition(" ")[::2], path)
    except ValueError:
        return  # a broken pickle: torch.load stops at the same place and says why
    if pkl:
        _check_zip_storages(path, pkl[0][0][:-len("data.pkl")], pkl[0][1], records)


def _check_zip_storages(path: str, folder: str, pkl: bytes, records: dict) -> None:
    """A memory-mapped load places each storage at its record's offset with the size the pickle
    declares, without comparing it to the record's: a record shorter than its storage would be read
    on into the records after it (garbage weights, no error). Each declared size is checked here."""
    declared: dict = {}
    try:
        _SizeScan(io.BytesIO(pkl), declared, path, zip_form=True).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            OverflowError, RecursionError):
        return  # a broken pickle: torch.load stops at the same place and says why
    for key, nbytes in declared.items():
        name = f"{folder}data/{key}"
        have = records.get(name)
        if have is not None and nbytes > have:
            raise FormatError(f"{path}: corrupt PyTorch checkpoint: storage '{key}' holds {nbytes} bytes by its "
                              f"pickle, its zip record '{name}' only {have}")


# torch.load(weights_only=True) allows the rebuild functions of every tensor kind; rwkvtools reads
# dense tensors only, and some others (quantized) allocate the size their pickle states unchecked
_DENSE_REBUILDS = ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
                   "_rebuild_parameter_with_state")


def _check_rebuild(module: str, name: str, path: str) -> None:
    if module == "torch._utils" and name.startswith("_rebuild") and name not in _DENSE_REBUILDS:
        raise FormatError(f"{path}: holds a tensor that is not a plain dense tensor (its pickle calls "
                          f"torch._utils.{name}); rwkvtools reads dense tensors only")


# torch's legacy layout (torch.save before 1.6, or _use_new_zipfile_serialization=False): pickles
# of a magic number, the protocol version, system info and the objects, where each storage is a
# persistent id ('storage', storage type, key, location, numel, view) and each tensor a call
# _rebuild_tensor_v2(storage, offset, size, stride, ...); then the storage data
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_ELEMENT_BYTES = {"DoubleStorage": 8, "FloatStorage": 4, "HalfStorage": 2, "BFloat16Storage": 2,
                  "LongStorage": 8, "IntStorage": 4, "ShortStorage": 2, "CharStorage": 1, "ByteStorage": 1,
                  "BoolStorage": 1}


class _Inert:
    """Stands for every global a pickle names while its sizes are scanned: takes any arguments and
    state, runs nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, item):
        pass

    def extend(self, items):
        pass


class _SizeScan(pickle._Unpickler):
    """Reads a legacy pickle without building anything: each global is an _Inert class, each
    storage's declared size is recorded (key -> bytes) instead of allocated, and each tensor must lie
    inside its storage (torch's legacy loader would grow the storage to fit it). The pure-Python
    unpickler, whose memo is a dict: the C one grows an array to the largest memo index named."""

    def __init__(self, f, declared: dict, path: str, zip_form: bool = False):
        super().__init__(f, encoding="utf-8")
        self.declared = declared
        self.path = path
        self.zip_form = zip_form  # persistent ids ('storage', type, key, location, numel); key -> bytes

    def find_class(self, module, name):
        _check_rebuild(module, name, self.path)
        if module == "torch._utils" and name in _DENSE_REBUILDS[:3]:  # the ones that place a storage
            return self._rebuild
        return type(str(name), (_Inert,), {})

    def persistent_load(self, pid):
        if self.zip_form:
            if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] in ("storage", b"storage")):
                return None
            stype, key, _, numel = pid[1:5]
            size = _ELEMENT_BYTES.get(getattr(stype, "__name__", ""))
            if not isinstance(numel, int) or numel < 0:
                raise pickle.UnpicklingError(f"storage of {numel!r} elements")
            if size is not None and isinstance(key, str):  # an element type not listed is left to torch
                self.declared[key] = max(self.declared.get(key, 0), numel * size)
            return (numel * (size or 1), size or 1)
        if not (isinstance(pid, tuple) and len(pid) >= 6 and pid[0] in ("storage", b"storage")):
            return None
        stype, key, _, numel, view = pid[1:6]
        if not isinstance(numel, int) or numel < 0:
            raise pickle.UnpicklingError(f"storage of {numel!r} elements")
        size = _ELEMENT_BYTES.get(getattr(stype, "__name__", ""), 8)
        nbytes = self.declared.setdefault(repr(key), numel * size)  # torch allocates a key's first
        if isinstance(view, tuple) and len(view) == 3 and isinstance(view[2], int):
            nbytes = view[2] * size  # a view of view[2] elements into the storage
        return (nbytes, size)

    def _rebuild(self, storage, offset, size, stride, *rest):
        if not (isinstance(storage, tuple) and isinstance(offset, int)
                and all(isinstance(d, int) for d in (*size, *stride)) and len(size) == len(stride)):
            raise pickle.UnpicklingError("tensor arguments of the wrong types")
        nbytes, elsize = storage
        if all(d > 0 for d in size):
            end = offset + 1 + sum((d - 1) * s for d, s in zip(size, stride))
            if end * elsize > nbytes:
                raise FormatError(f"{self.path}: corrupt PyTorch checkpoint: a tensor of shape {tuple(size)} "
                                  f"(offset {offset}, strides {tuple(stride)}) does not fit its storage of "
                                  f"{nbytes} bytes")
        return _Inert()


def _check_legacy_sizes(data: bytes, path: str) -> None:
    """torch's legacy loader allocates every storage at the size its pickle declares before reading
    the data, and grows a storage that a tensor overruns: check both first, and refuse a file whose
    storages declare more than it holds."""
    declared: dict = {}
    f = io.BytesIO(data)

    def scan():
        # pickletools reads every opcode's argument from the buffer first (a length beyond the file
        # is a ValueError), since the unpickler allocates some (bytearray8) before reading them
        start = f.tell()
        for _ in pickletools.genops(f):
            pass
        f.seek(start)
        return _SizeScan(f, declared, path).load()

    try:
        if scan() == _LEGACY_MAGIC:
            for _ in range(3):  # protocol version, system info, the objects
                scan()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            OverflowError, RecursionError):
        pass  # a broken pickle: torch.load stops at the same place and says why; what came before is checked
    total = sum(declared.values())
    if total > len(data):
        raise FormatError(f"{path}: corrupt PyTorch checkpoint: its pickle declares storages of {total} "
                          f"bytes, the file has {len(data)}")


def _is_zip(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PK\x03\x04" and os.path.getsize(path) > 22
    except OSError:
        return False

"""Atomic writes: write to a temp file beside the target, then rename. A failure leaves no
partial output behind and never touches an existing file until the rename."""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile

from ..errors import FormatError


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def _make_parents(folder: str) -> list[str]:
    """os.makedirs(folder); returns the folders it created, deepest first (removed again, when
    empty, by _remove_made after a failure: a failed write leaves no trace)."""
    made, d = [], folder
    while d and not os.path.exists(d):
        made.append(d)
        d = os.path.dirname(d)
    os.makedirs(folder, exist_ok=True)
    return made


def _remove_made(made: list[str]) -> None:
    for d in made:
        with contextlib.suppress(OSError):
            os.rmdir(d)  # only while empty


@contextlib.contextmanager
def atomic_path(path: str):
    """Yields a temporary path in the target's folder; renames it onto ``path`` on success."""
    d = os.path.dirname(os.path.abspath(path)) or "."
    made = _make_parents(d)
    fd, tmp = tempfile.mkstemp(prefix=".rwkvtools-", suffix=".tmp", dir=d)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        publish(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        _remove_made(made)
        raise


@contextlib.contextmanager
def atomic_dir(path: str):
    """Like atomic_path for a folder (HF layouts): build in a temp folder, rename at the end."""
    parent = os.path.dirname(os.path.abspath(path)) or "."
    made = _make_parents(parent)
    tmp = tempfile.mkdtemp(prefix=".rwkvtools-", dir=parent)
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
        publish(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_made(made)
        raise


@contextlib.contextmanager
def staged_output(path: str, companions: tuple[str, ...] = ()):
    """For an output that is checked after it is written: yields a path of the same name in a
    private temp folder beside ``path``; when the block ends without an exception the output
    (file or folder) is renamed onto ``path``, otherwise it is removed and ``path`` is left as
    it was. ``companions``: suffixes of files that belong to the output (".data": ONNX external
    weights), renamed first; an old one the new output does not have is removed with the old
    output it belonged to; all put back as they were if the main rename fails."""
    parent = os.path.dirname(os.path.abspath(path)) or "."
    made = _make_parents(parent)
    tmp = tempfile.mkdtemp(prefix=".rwkvtools-", dir=parent)
    ok = False
    try:
        staged = os.path.join(tmp, os.path.basename(os.path.abspath(path)))
        yield staged
        moved = []  # (companion, its old file set aside in tmp, or None)
        try:
            for i, suffix in enumerate(companions):
                new = os.path.lexists(staged + suffix)
                old = os.path.join(tmp, f"old-{i}") if os.path.lexists(path + suffix) else None
                if old:
                    os.replace(path + suffix, old)
                if new or old:
                    moved.append((path + suffix, old))
                if new:
                    os.replace(staged + suffix, path + suffix)
            publish(staged, path)
        except BaseException:
            for p, old in reversed(moved):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(p)
                if old:
                    os.replace(old, p)
            raise
        ok = True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not ok:
            _remove_made(made)


def publish(tmp: str, path: str) -> None:
    """Rename the finished output ``tmp`` onto ``path``. A folder replaces a folder by moving the
    old one aside first and putting it back if the rename fails, so a failure never loses it;
    a file never replaces a folder, nor a folder a file."""
    if os.path.isdir(path) and not os.path.isdir(tmp):
        raise FormatError(f"{path} is a folder; a file cannot replace it (remove it or choose another path)")
    if os.path.lexists(path) and not os.path.isdir(path) and os.path.isdir(tmp):
        raise FormatError(f"{path} is a file; a folder cannot replace it (remove it or choose another path)")
    if not os.path.isdir(path):
        os.replace(tmp, path)
        return
    aside = tempfile.mkdtemp(prefix=".rwkvtools-old-", dir=os.path.dirname(os.path.abspath(path)))
    old = os.path.join(aside, "old")
    os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(old, path)
        os.rmdir(aside)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _finite(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def json_text(obj) -> str:
    """A report as strict JSON (RFC 8259), indented: a float that is not finite (the perplexity of
    a model whose outputs overflow, a rate over zero seconds) is written as null, which every JSON
    parser reads (Python's NaN/Infinity tokens are not JSON)."""
    import json
    return json.dumps(_finite(obj), indent=2, default=str, allow_nan=False)


def write_json(path: str, obj) -> None:
    """``obj`` as indented strict JSON (see json_text) at ``path``, atomically: a reader (a resumed
    recipe, a CI job) never sees half a file."""
    text = json_text(obj)
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)

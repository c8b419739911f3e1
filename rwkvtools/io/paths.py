"""Where outputs may go: an output never overwrites or lands inside an input, never replaces a
folder with a file (or the reverse), and replaces an existing output only when asked. Shared by
the commands and the Python API (``convert``)."""
from __future__ import annotations

import os

from ..errors import RwkvToolsError


def model_files(path: str) -> list[str]:
    """The files a model at ``path`` is made of: a folder's files, or the file and an ONNX
    file's external data beside it (OUT.onnx.data)."""
    if os.path.isdir(path):
        return sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
    return [path] + ([path + ".data"] if path.endswith(".onnx") and os.path.isfile(path + ".data") else [])


def disk_bytes(path: str | None) -> int | None:
    """Bytes on disk of the model at ``path`` (every file of it, see model_files); None when there
    is none."""
    if not path or not os.path.exists(path):
        return None
    return sum(os.path.getsize(p) for p in model_files(path))


def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(path))


def within(path: str, folder: str) -> bool:
    """True when ``path`` is ``folder`` or lies inside it (any spelling, symlinks resolved)."""
    p, f = _real(path), _real(folder)
    return p == f or p.startswith(f.rstrip(os.sep) + os.sep)


def _held_file(out: str, folder: str) -> str | None:
    """A file directly in ``folder`` that is ``out`` through a symlink or a hard link, or None."""
    real_out = _real(out)
    out_exists = os.path.exists(out)
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return None
    for e in entries:
        try:
            if not e.is_file():
                continue
            if _real(e.path) == real_out or (out_exists and os.path.samefile(e.path, out)):
                return e.path
        except OSError:
            continue
    return None


def clash(out: str, inp: str, label: str = "", out_is_folder: bool = False) -> str | None:
    """Why writing ``out`` would touch the existing input ``inp`` (a sentence), or None: ``out``
    is ``inp`` (any spelling, a symlink, a hard link), lies inside an input folder, or is a
    folder (replaced as a whole) that holds the input."""
    lbl = f" ({label})" if label else ""
    if os.path.isdir(inp):
        if _real(out) == _real(inp):
            return f"{out} is the input folder{lbl}"
        if within(out, inp):
            return f"{out} is inside the input folder {inp}{lbl}"
        held = _held_file(out, inp)  # a file of the folder that is a link to out (the Hugging Face cache layout)
        if held:
            return f"{out} is the input file {held}{lbl}"
    elif _real(out) == _real(inp) or (os.path.exists(out) and os.path.samefile(out, inp)):
        return f"{out} is the input file{lbl}"
    if out_is_folder and within(inp, out):
        return f"{out} is a folder that holds the input {inp}{lbl}"
    return None


def check_name(path) -> None:
    """A path whose name is not UTF-8 (bytes the file system gave Python as surrogate escapes):
    the safetensors, ONNX and torch libraries cannot open or write it; refused up front."""
    if path is None:
        return
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise RwkvToolsError(f"{os.fsencode(str(path))!r}: the name is not valid UTF-8; rename the file "
                             "(the model libraries cannot open such names)") from None


def check_place(path: str, what: str) -> None:
    """``path`` is not empty, and the nearest existing folder above it is a folder (not a file)
    in which a file can be created (tried: permission bits say nothing to root, nor about
    /proc, /sys or a read-only mount)."""
    if not str(path).strip():
        raise RwkvToolsError(f"{what} is an empty path; give a file name")
    d = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(d):
        if os.path.lexists(d):  # a symbolic link to nothing: the folders could not be made under it
            raise RwkvToolsError(f"{what} {path}: {d} is a broken symbolic link (to {os.readlink(d)})")
        d = os.path.dirname(d)
    if not os.path.isdir(d):
        raise RwkvToolsError(f"{what} {path}: {d} is a file, not a folder")
    import tempfile
    try:
        fd, probe = tempfile.mkstemp(prefix=".rwkvtools-probe-", dir=d)
    except OSError as e:
        raise RwkvToolsError(f"{what} {path}: cannot create files in {d} ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(probe)


def _file_name(path: str, what: str) -> None:
    """A file output named with a trailing '/': refused before any work (the final rename would fail)."""
    if str(path).endswith((os.sep, "/")):
        raise RwkvToolsError(f"{what} {path} ends with '/' (a folder path); give a file name")


def output_guard(src: str | None, dst: str, force: bool, inputs: dict | None = None,
                 report: str | None = None, fmt: str | None = None) -> None:
    """Before any work: refuse an output that would overwrite or sit in an input, then an
    existing DST without --force. Inputs are SRC and ``inputs`` ({label: path}, e.g. the
    teacher or a text); checked: DST (see ``clash``; a folder DST for the hf format, else a
    file) and ``report`` (neither an input nor DST, nor inside an input folder or DST).
    ``fmt``: DST's format (default: from its name)."""
    if not str(dst).strip():
        raise RwkvToolsError("DST is an empty path; give a file or folder name")
    if report is not None and not str(report).strip():  # given, but empty: refused like an empty DST
        raise RwkvToolsError("--report is an empty path; give a file name")
    if fmt is None:
        from .writers import format_from_path
        fmt = format_from_path(dst)
    folder = fmt == "hf"
    for p in (src, dst, report, *(inputs or {}).values()):
        check_name(p)
    ins = [(label, p) for label, p in [("", src), *(inputs or {}).items()] if p and os.path.exists(p)]
    for label, p in ins:
        why = clash(dst, p, label, folder)
        if why:
            raise RwkvToolsError(f"{why}; write to another path")
    if report:
        if within(report, dst):
            raise RwkvToolsError(f"--report {report} would overwrite DST {dst}; choose another report path")
        for label, p in ins:
            why = clash(report, p, label)
            if why:
                raise RwkvToolsError(f"--report {why}; choose another report path")
        if os.path.isdir(report):
            raise RwkvToolsError(f"--report {report} is a folder; give a file path")
        _file_name(report, "--report")
        if os.path.lexists(report) and not force:
            raise RwkvToolsError(f"--report {report} exists; pass --force to overwrite it")
        check_place(report, "--report")
    if not folder:
        _file_name(dst, "DST")
    if os.path.lexists(dst) and not force:
        raise RwkvToolsError(f"{dst} exists; pass --force to overwrite it")
    if os.path.isdir(dst) and not folder:
        raise RwkvToolsError(f"{dst} is a folder; a {fmt} file cannot replace it (remove it or choose another "
                        "path)")
    if folder and os.path.lexists(dst) and not os.path.isdir(dst):
        raise RwkvToolsError(f"{dst} is a file; a Hugging Face folder cannot replace it (remove it or choose "
                        "another path)")
    if folder and os.path.isdir(dst):
        from .hf import check_replaceable
        check_replaceable(dst)
    check_place(dst, "DST")

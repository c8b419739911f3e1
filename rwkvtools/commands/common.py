"""Options and helpers shared by the transform commands (lowrank, quantize, recursive, ...):
held-out evaluation, the perplexity gate, the JSON report, safe output paths."""
from __future__ import annotations

import functools
import json
import os

import click

from ..cli import UserError


def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(path))


def _within(path: str, folder: str) -> bool:
    """True when ``path`` is ``folder`` or lies inside it (any spelling, symlinks resolved)."""
    p, f = _real(path), _real(folder)
    return p == f or p.startswith(f.rstrip(os.sep) + os.sep)


def clash(out: str, inp: str, label: str = "", out_is_folder: bool = False) -> str | None:
    """Why writing ``out`` would touch the existing input ``inp`` (a sentence), or None: ``out``
    is ``inp`` (any spelling, a symlink, a hard link), lies inside an input folder, or is a
    folder (replaced as a whole) that holds the input."""
    lbl = f" ({label})" if label else ""
    if os.path.isdir(inp):
        if _real(out) == _real(inp):
            return f"{out} is the input folder{lbl}"
        if _within(out, inp):
            return f"{out} is inside the input folder {inp}{lbl}"
    elif _real(out) == _real(inp) or (os.path.exists(out) and os.path.samefile(out, inp)):
        return f"{out} is the input file{lbl}"
    if out_is_folder and _within(inp, out):
        return f"{out} is a folder that holds the input {inp}{lbl}"
    return None


def _check_place(path: str, what: str) -> None:
    """The nearest existing folder above ``path`` must be a folder (not a file)."""
    d = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(d):
        d = os.path.dirname(d)
    if not os.path.isdir(d):
        raise UserError(f"{what} {path}: {d} is a file, not a folder")


def output_guard(src: str | None, dst: str, force: bool, inputs: dict | None = None,
                 report: str | None = None, fmt: str | None = None) -> None:
    """Before any work: refuse an output that would overwrite or sit in an input, then an
    existing DST without --force. Inputs are SRC and ``inputs`` ({label: path}, e.g. the
    teacher or a text); checked: DST (see ``clash``; a folder DST for the hf format, else a
    file) and ``report`` (neither an input nor DST, nor inside an input folder or DST).
    ``fmt``: DST's format (default: from its name)."""
    if fmt is None:
        from ..io.writers import format_from_path
        fmt = format_from_path(dst)
    folder = fmt == "hf"
    ins = [(label, p) for label, p in [("", src), *(inputs or {}).items()] if p and os.path.exists(p)]
    for label, p in ins:
        why = clash(dst, p, label, folder)
        if why:
            raise UserError(f"{why}; write to another path")
    if report:
        if _within(report, dst):
            raise UserError(f"--report {report} would overwrite DST {dst}; choose another report path")
        for label, p in ins:
            why = clash(report, p, label)
            if why:
                raise UserError(f"--report {why}; choose another report path")
        if os.path.isdir(report):
            raise UserError(f"--report {report} is a folder; give a file path")
        _check_place(report, "--report")
    if os.path.lexists(dst) and not force:
        raise UserError(f"{dst} exists; pass --force to overwrite it")
    if os.path.isdir(dst) and not folder:
        raise UserError(f"{dst} is a folder; a {fmt} file cannot replace it (remove it or choose another "
                        "path)")
    if folder and os.path.lexists(dst) and not os.path.isdir(dst):
        raise UserError(f"{dst} is a file; a Hugging Face folder cannot replace it (remove it or choose "
                        "another path)")
    if folder and os.path.isdir(dst):
        from ..io.hf import check_replaceable
        check_replaceable(dst)
    _check_place(dst, "DST")


def validation_options(fn):
    """--eval-text / --eval-tokens / --max-ppl-increase / --device / --no-validate / --report / --json / --force"""
    opts = [
        click.option("--eval-text", type=click.Path(), default=None,
                     help="Held-out text for perplexity before/after (default: the packaged held-out text)."),
        click.option("--eval-tokens", type=int, default=4096, show_default=True, help="Tokens of it to score."),
        click.option("--tokenizer", type=click.Choice(["auto", "bytes", "world", "neox"]), default="auto",
                     show_default=True),
        click.option("--encoding", default="utf-8", show_default=True, help="Byte encoding for the bytes tokenizer."),
        click.option("--max-ppl-increase", type=float, default=None,
                     help="Gate: fail (exit 1) when perplexity rises by more than this many percent."),
        click.option("--device", default="auto", show_default=True, metavar="auto|cpu|cuda[:N]",
                     callback=_device_option,
                     help="Where the perplexity check (and heal's training) runs: auto = CUDA when there is "
                          "one; on CUDA rwkvtools' WKV kernels are used (the report's 'backend' names them)."),
        click.option("--no-validate", is_flag=True, help="Skip the perplexity check."),
        click.option("--report", type=click.Path(), default=None, help="Also write the JSON report to this file."),
        click.option("--json", "as_json", is_flag=True, help="Print the JSON report."),
        click.option("--force", is_flag=True, help="Overwrite DST if it exists."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def write_report(report: dict, path: str | None) -> None:
    if path:
        from ..io.atomic import atomic_path
        with atomic_path(path) as tmp:
            with open(tmp, "w") as f:
                json.dump(report, f, indent=2, default=str)


def print_summary(title: str, report: dict, as_json: bool, lines: list[str] | None = None) -> None:
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
        return
    click.echo(title)
    for line in lines or []:
        click.echo(f"  {line}")
    v = report.get("validation")
    if v:
        click.echo(f"  ppl {v['ppl_before']:.4f} -> {v['ppl_after']:.4f} ({v['ppl_increase_pct']:+.2f}%) on "
                   f"{v['eval_tokens']} held-out tokens; max |logit drift| {v['logits_drift']['max_abs']:.4g}")
        for g in v.get("gates", []):
            click.echo(f"  gate {'PASS' if g['passed'] else 'FAIL'}: {g['detail']}")


def run_validation(before, after, opts: dict) -> dict | None:
    """The standard post-transform check from the validation options; None with --no-validate."""
    if opts.get("no_validate"):
        return None
    from ..spec import detect
    from ..validate import text_tokens, validate_transform
    spec = detect(before.tensors)
    toks = text_tokens(opts.get("eval_text"), spec.vocab, "heldout", opts.get("tokenizer", "auto"),
                       opts.get("eval_tokens"), opts.get("encoding", "utf-8"))
    device = check_device(opts.get("device") or "auto")
    return validate_transform(before, after, toks, opts.get("max_ppl_increase"), device=device)


def _device_option(ctx, param, value):
    """Checked when the command line is parsed, before anything is read or written."""
    if value is None:
        return value
    try:
        check_device(value)
    except UserError as e:
        raise click.BadParameter(str(e).split(": ", 1)[-1]) from None
    return value


def check_device(device: str) -> str:
    """'auto', 'cpu', 'cuda' or 'cuda:N' -> a device usable on this machine; else a clear error
    (exit 2). auto: the first CUDA device when there is one, else the CPU."""
    import torch
    d = str(device).strip().lower()
    if d == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if d == "cpu":
        return d
    if d == "cuda" or (d.startswith("cuda:") and d[5:].isdigit()):
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: no CUDA device is available here (use --device cpu)")
        if ":" in d and int(d[5:]) >= torch.cuda.device_count():
            raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return d
    raise UserError(f"--device {device}: expected auto, cpu, cuda or cuda:N")


def finish(report: dict, opts: dict) -> None:
    """Write the report, then fail with exit 1 if a gate failed (report already written)."""
    write_report(report, opts.get("report"))
    v = report.get("validation")
    if v and not v.get("passed", True):
        from ..validate import raise_on_failed
        raise_on_failed(v)


def pass_opts(fn):
    @functools.wraps(fn)
    def wrapper(**kwargs):
        return fn(kwargs)
    return wrapper

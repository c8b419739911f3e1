"""Options and helpers shared by the transform commands (lowrank, quantize, recursive, ...):
held-out evaluation, the perplexity gate, the JSON report, safe output paths."""
from __future__ import annotations

import functools

import click

from ..cli import FINITE_FLOAT, UserError, emit_json
from ..errors import RwkvToolsError
from ..io.paths import output_guard as _guard



# command name -> the check of its options that needs no file (see option_check)
OPTION_CHECKS: dict = {}


def option_check(command: str):
    """Register ``fn(dst, opts, given)``: everything about a command's options (and DST's name)
    that can be refused without reading a file. The command runs it first; `recipe check` runs
    the same function on every step, so a recipe is refused for what its run would refuse.
    ``given`` holds the names of the options set explicitly (not left at their defaults)."""
    def deco(fn):
        OPTION_CHECKS[command] = fn
        return fn
    return deco


def given_options(ctx) -> frozenset:
    """The parameters of a parsed command line that were set, not left at their defaults."""
    return frozenset(n for n in ctx.params
                     if ctx.get_parameter_source(n) not in (None, click.core.ParameterSource.DEFAULT))


def output_guard(src: str | None, dst: str, force: bool, inputs: dict | None = None,
                 report: str | None = None, fmt: str | None = None) -> None:
    """rwkvtools.io.paths.output_guard, its refusals as the command's error (exit 2)."""
    try:
        _guard(src, dst, force, inputs, report, fmt)
    except RwkvToolsError as e:
        raise UserError(str(e)) from None


def validation_options(fn=None, *, gate_help: str | None = None):
    """--eval-text / --eval-tokens / --max-ppl-increase / --device / --no-validate / --report / --json / --force.
    ``gate_help``: what --max-ppl-increase compares, where a command gates otherwise (heal: against
    the teacher); used as @validation_options(gate_help=...)."""
    if fn is None:
        return lambda f: validation_options(f, gate_help=gate_help)
    opts = [
        click.option("--eval-text", type=click.Path(), default=None,
                     help="Held-out text for perplexity before/after (default: the packaged held-out text)."),
        click.option("--eval-tokens", type=int, default=4096, show_default=True, callback=_eval_tokens,
                     help="Tokens of it to score (at least 2)."),
        click.option("--tokenizer", type=click.Choice(["auto", "bytes", "world", "neox"]), default="auto",
                     show_default=True),
        click.option("--encoding", default="utf-8", show_default=True, callback=encoding_option,
                     help="Byte encoding for the bytes tokenizer."),
        click.option("--max-ppl-increase", type=FINITE_FLOAT, default=None, callback=_gate_needs_validation,
                     help=gate_help or "Gate: fail (exit 1) when perplexity rises by more than this many percent."),
        click.option("--device", default="auto", show_default=True, metavar="auto|cpu|cuda[:N]",
                     callback=_device_option,
                     help="Where the perplexity check (and heal's training) runs: auto = CUDA when there is "
                          "one; on CUDA rwkvtools' WKV kernels are used (the report's 'backend' names them)."),
        click.option("--no-validate", is_flag=True, callback=_gate_needs_validation,
                     help="Skip the perplexity check."),
        click.option("--report", type=click.Path(), default=None, help="Also write the JSON report to this file."),
        click.option("--json", "as_json", is_flag=True, help="Print the JSON report."),
        click.option("--force", is_flag=True, help="Overwrite DST if it exists."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def _gate_needs_validation(ctx, param, value):
    """--max-ppl-increase with --no-validate: refused rather than ignored (the gate was silently
    dropped and DST written). Whichever of the two Click processes second sees the other."""
    gate = value if param.name == "max_ppl_increase" else ctx.params.get("max_ppl_increase")
    off = value if param.name == "no_validate" else ctx.params.get("no_validate")
    if gate is not None and off:
        raise click.UsageError("--max-ppl-increase is a gate on the perplexity check; it has no effect with "
                               "--no-validate", ctx=ctx)
    return value


def _eval_tokens(ctx, param, value):
    """--eval-tokens: a count of at least 2 (perplexity needs a prediction). 0 scored the whole
    text and a negative N all but its last |N| tokens (a Python slice)."""
    if value is not None and value < 2:
        raise click.BadParameter(f"{value}: must be at least 2")
    return value


def write_report(report: dict, path: str | None) -> None:
    if path:
        from ..io.atomic import write_json
        write_json(path, report)


def print_summary(title: str, report: dict, as_json: bool, lines: list[str] | None = None) -> None:
    if as_json:
        emit_json(report)
        return
    click.echo(title)
    for line in lines or []:
        click.echo(f"  {line}")
    v = report.get("validation")
    if v:
        click.echo(f"  ppl {v['ppl_before']:.4f} -> {v['ppl_after']:.4f} ({v['ppl_increase_pct']:+.2f}%) on "
                   f"{v['eval_tokens']} held-out tokens; max |logit drift| "
                   + (f"from the {v['drift_against']} " if v.get("drift_against") else "")
                   + f"{v['logits_drift']['max_abs']:.4g}")
        for g in v.get("gates", []):
            click.echo(f"  gate {'PASS' if g['passed'] else 'FAIL'}: {g['detail']}")


def run_validation(before, after, opts: dict, identical: bool = False) -> dict | None:
    """The standard post-transform check from the validation options; None with --no-validate.
    ``identical``: every tensor of ``after`` was compared equal to ``before``'s (scored once)."""
    if opts.get("no_validate"):
        return None
    from ..spec import detect
    from ..validate import text_tokens, validate_transform
    spec = detect(before.tensors)
    toks = text_tokens(opts.get("eval_text"), spec.vocab, "heldout", opts.get("tokenizer", "auto"),
                       opts.get("eval_tokens"), opts.get("encoding", "utf-8"))
    device = check_device(opts.get("device") or "auto")
    return validate_transform(before, after, toks, opts.get("max_ppl_increase"), device=device, identical=identical)


def encoding_option(ctx, param, value):
    """--encoding: a text encoding Python knows, checked when the command line is parsed."""
    from ..tokenizer import check_encoding
    try:
        return check_encoding(value)
    except RwkvToolsError as e:
        raise click.BadParameter(str(e).split(": ", 1)[-1]) from None


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


CORE_KEYS = ("command", "src", "dst", "written", "version", "file_bytes_before", "file_bytes_after",
             "ppl_before", "ppl_after")


def with_core(report: dict, command: str, src: str, dst: str, version: str | None, written: bool,
              output: str | None) -> dict:
    """``report`` led by the keys every writing command's report has, named alike (CORE_KEYS):
    the command, SRC and DST as given, the RWKV version, whether DST was written, the bytes on
    disk of SRC and of the output (``output``: the file as written, under its staged name; None
    when nothing was written) and the held-out perplexity before and after (None when not
    measured). A figure the report already has (not None) is kept."""
    from ..io.paths import disk_bytes
    v = report.get("validation") or {}
    fixed = {"command": command, "src": src, "dst": dst, "written": written}
    measured = {"version": version, "file_bytes_before": disk_bytes(src),
                "file_bytes_after": disk_bytes(output) if written else None,
                "ppl_before": v.get("ppl_before"), "ppl_after": v.get("ppl_after")}
    measured.update({k: report[k] for k in measured if report.get(k) is not None})
    core = {**fixed, **measured}
    return {**{k: core[k] for k in CORE_KEYS}, **{k: x for k, x in report.items() if k not in core}}


def publish(dst: str, passed: bool, write, describe, title: str, opts: dict) -> None:
    """DST and its --report, published together. ``write(path)`` writes the output (only when the
    gate passed) under a staged name beside DST; ``describe(path)`` (the staged output, or None
    when nothing was written) returns (report, summary lines). The report is written, then DST is
    renamed onto its path: an error, a failed gate or an interruption anywhere before leaves no
    DST (an existing one as it was), never a DST whose report is missing. A failed gate prints the
    summary and exits 1 (the report written, DST not)."""
    from ..io.atomic import staged_output
    from ..io.writers import format_from_path
    fmt = format_from_path(dst)   # of DST as it is (an existing file or folder), not of the staged name
    with staged_output(dst) as staged:
        if passed:
            write(staged, fmt)
        report, lines = describe(staged if passed else None)
        report = with_core(report, report["command"], report["src"], dst, report.get("version"), passed,
                           staged if passed else None)
        if not passed:
            print_summary(title, report, opts["as_json"], lines)
        finish(report, opts)  # a failed gate raises here, before DST is renamed
    print_summary(title, report, opts["as_json"], lines)


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

"""``export-onnx``: any checkpoint rwkvtools reads -> ONNX (step or sequence graph, fp32 or fp16),
checked in onnxruntime against the reference model before the file is written."""
from __future__ import annotations

import click

from ..cli import FINITE_FLOAT, UserError, emit_json, handle_errors, main
from .common import given_options, option_check


@main.command(name="export-onnx")
@click.argument("src", type=click.Path())
@click.argument("out", type=click.Path())
@click.option("--mode", type=click.Choice(["step", "sequence"]), default="step", show_default=True,
              help="step: one token per call (tokens [batch, 1]); sequence: a whole prompt per call "
                   "(tokens [batch, seq], chunked WKV), e.g. for prefill.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="fp16 keeps decays, WKV state and group norms in fp32 and rescales the residual "
                   "stream of v4-v6 every 6 layers, as RWKV runtimes do.")
@click.option("--opset", type=int, default=17, show_default=True, help="ONNX opset (17 or newer).")
@click.option("--chunk-len", type=click.Choice(["8", "16", "32", "64"]), default="16", show_default=True,
              help="Sequence mode: tokens per chunk of the chunked WKV.")
@click.option("--logits", "logits", type=click.Choice(["all", "last"]), default="all", show_default=True,
              help="Sequence mode: logits of every position, or only the last one (prefill-only graphs).")
@click.option("--linear-op", type=click.Choice(["matmul", "conv"]), default="matmul", show_default=True,
              help="fp32 step graphs: 'conv' writes each large matrix-vector product as a 1x1 Conv, which "
                   "onnxruntime's x86 CPU provider runs with its NCHWc kernels, ~10% faster per token than "
                   "MatMul (docs/BENCHMARKS.md); keep matmul for other providers and platforms.")
@click.option("--no-validate", is_flag=True, help="Write the file without checking it in onnxruntime.")
@click.option("--tol", type=FINITE_FLOAT, default=None,
              help="Validation tolerance: max |logit diff| (fp32, default 1e-4), or relative to "
                   "max(1, max |logit|) (fp16, default 5e-2).")
@click.option("--external-data-threshold", type=int, default=2_000_000_000, show_default=True,
              help="Weights go to OUT.data (ONNX external data) when they exceed this many bytes.")
@click.option("--report", type=click.Path(), default=None, help="Also write the JSON report to this file.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report.")
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
@click.option("--progress/--no-progress", default=None, help="Progress bars on stderr (default: in a terminal).")
def export_onnx_cmd(src, out, mode, dtype, opset, chunk_len, logits, linear_op, no_validate, tol,
                    external_data_threshold, report, as_json, force, progress):
    """Export SRC (any checkpoint rwkvtools reads: v4, v5, v6, v7, also low-rank or otherwise
    transformed) to the ONNX file OUT.

    Inputs: tokens int64 [batch, 1|seq] and one state_in_<name>.<layer> float32 [batch, ...]
    per state tensor of every layer; outputs: logits float32 [batch, seq, vocab] and the
    matching state_out_<name>.<layer>. A state of all zeros is the empty state (docs/ONNX.md).
    Unless --no-validate, the file is run in onnxruntime on random prompts and stepped through
    its state against the torch model; it is written only if the max |logit diff| stays within
    the tolerance (exit 1 otherwise).

    \b
    Examples:
      rwkvtools export-onnx ../shared/fixtures/tiny-rwkv-7v0-834K.pth tiny7-step.onnx
      rwkvtools export-onnx ../shared/fixtures/tiny-rwkv-7v0-834K.pth tiny7-step-conv.onnx --linear-op conv
      rwkvtools export-onnx ../shared/fixtures/tiny-rwkv-5v2-730K-FP32.bin tiny5-seq.onnx --mode sequence
      rwkvtools export-onnx ../shared/fixtures/tiny-rwkv-4v0-660K.pth tiny4-fp16.onnx --dtype fp16 --json
      rwkvtools eval tiny7-step.onnx --text ../shared/data/wikitext-2-test.txt --max-tokens 1024
    """
    given = given_options(click.get_current_context())
    handle_errors(_export)(src, out, mode, dtype, opset, int(chunk_len), logits, linear_op, no_validate, tol,
                           external_data_threshold, report, as_json, force, progress, given)


@option_check("export-onnx")
def check_options(out, opts, given):
    """export-onnx's options and OUT's name, checked before any file is read."""
    if opts["mode"] == "step":  # options that only shape the sequence graph: refused rather than ignored
        for opt, name in (("--chunk-len", "chunk_len"), ("--logits", "logits")):
            if name in given:
                raise UserError(f"{opt} applies to --mode sequence (a step graph takes one token per call)")
    if opts.get("no_validate") and "tol" in given:  # refused rather than ignored, as the step-mode options
        raise UserError("--tol is the validation's tolerance; it has no effect with --no-validate")
    if not str(out).endswith(".onnx"):
        raise UserError(f"{out}: the output file name must end in .onnx")
    if opts["external_data_threshold"] < 0:
        raise UserError("--external-data-threshold must not be negative")
    if opts.get("opset") is not None:
        from ..export.onnx import check_opset
        check_opset(opts["opset"])


def _export(src, out, mode, dtype, opset, chunk_len, logits, linear_op, no_validate, tol, threshold, report_path,
            as_json, force, progress, given=frozenset()):
    import os

    from ..errors import GateError
    from ..export.onnx import ExportError, export_onnx, validation_failure_message
    from ..io.atomic import staged_output
    from .common import output_guard, with_core, write_report
    output_guard(src, out, force, report=report_path, fmt="onnx")
    output_guard(src, out + ".data", force, fmt="onnx")  # where external weights go
    if report_path and os.path.realpath(os.path.abspath(report_path)) == os.path.realpath(os.path.abspath(out + ".data")):
        raise UserError(f"--report {report_path} is where OUT's external weights go ({os.path.basename(out)}.data); "
                        "choose another report path")
    check_options(out, {"mode": mode, "external_data_threshold": threshold, "opset": opset,
                        "no_validate": no_validate}, given)
    # exported (and checked) under a temporary name, then renamed onto OUT with its OUT.data:
    # any failure leaves neither behind, and existing ones as they were
    with staged_output(out, companions=(".data",)) as staged:
        try:
            rep = export_onnx(src, staged, mode=mode, dtype=dtype, opset=opset, validate=not no_validate,
                              chunk_len=chunk_len, logits=logits, external_data_threshold=threshold, tol=tol,
                              progress=progress, raise_on_fail=False, linear_op=linear_op)
        except ExportError as e:  # name OUT, not the temporary name it is written under
            raise ExportError(str(e).replace(staged, out)) from None
        rep["output"] = os.path.abspath(out)
        rep = with_core(rep, "export-onnx", src, out, rep["rwkv_version"], rep["published"], staged)
        write_report(rep, report_path)
        if not rep["published"]:
            _show(rep, out, as_json)
            raise GateError(validation_failure_message(rep))
    _show(rep, out, as_json)


def _show(rep: dict, out: str, as_json: bool) -> None:
    lines = [f"RWKV v{rep['rwkv_version']}, {rep['n_layer']} layers, dim {rep['n_embd']}, vocab {rep['vocab']}; "
             f"{rep['mode']} mode, {rep['dtype']}, opset {rep['opset']}"
             + (", linear op conv" if rep["linear_op"] == "conv" else "")
             + (f", chunk {rep['chunk_len']}" if rep["chunk_len"] else ""),
             f"{rep['nodes']} nodes, {rep['bytes'] / 1e6:.2f} MB"
             + (f" (weights in {rep['data_file']})" if rep["external_data"] else "")
             + f"; linear kinds: {', '.join(rep['linear_kinds'])}"]
    v = rep["validation"]
    if v is None:
        lines.append("not validated (--no-validate)")
    else:
        for prov, r in v["providers"].items():
            lines.append(f"{'PASS' if r['passed'] else 'FAIL'} {prov}: max |logit diff| {r['max_abs_logit_diff']:.3g} "
                         f"(limit {r['limit']:.3g}, max |logit| {r['max_abs_logit']:.3g}) over {r['batch']} x "
                         f"{r['prompt'] + r['steps']} tokens ({r['prompt']} prompt, {r['steps']} steps)")
    if as_json:
        emit_json(rep)
    else:
        click.echo((f"wrote {out}" if rep["published"] else f"not written: {out}") + f" ({rep['seconds']:.1f} s)")
        for line in lines:
            click.echo(f"  {line}")

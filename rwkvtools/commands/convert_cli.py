"""``rwkvtools convert``: formats, forms and dtypes, loss-free, checked after writing."""
from __future__ import annotations

import click

from ..cli import handle_errors, main, UserError
from ..io.writers import WRITER_OPTIONS
from .common import finish, option_check, output_guard, print_summary, validation_options


def _writer_options(pairs) -> dict:
    """``--writer-option KEY=VALUE`` pairs as strings (the writer's option table gives each its kind)."""
    out = {}
    for p in pairs:
        if "=" not in p:
            raise UserError(f"--writer-option '{p}': expected KEY=VALUE")
        k, v = p.split("=", 1)
        out[k.strip()] = v
    return out


@main.command()
@click.argument("src", type=click.Path())
@click.argument("dst", type=click.Path())
@click.option("--to", "to", type=click.Choice(["parallel", "rnn"]), default=None,
              help="Form of the output (.pth/.safetensors only; default: keep the source's).")
@click.option("--format", "fmt", type=click.Choice(["pth", "safetensors", "hf", "rwkvcpp", "gguf"]), default=None,
              help="Output format (default: from DST: .pth, .safetensors, .bin = rwkv.cpp, .gguf, "
                   "no extension = Hugging Face folder).")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default=None,
              help="dtype of the matrices (vectors and decays stay fp32); default: unchanged.")
@click.option("--rescale-every", type=int, default=None,
              help="RNN form only: divide att.output/ffn.value of layer i by 2^(i//N) for fp16 runtimes.")
@click.option("--rwkvcpp-type", "cpp_type", type=click.Choice(["FP32", "FP16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]),
              default=None, help="rwkv.cpp data type (block types quantize like rwkv.cpp's quantizer).")
@click.option("--quant", type=click.Choice(["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"]),
              default=None, help="GGUF only: quantize the large matrices (round to nearest, llama.cpp's bytes); "
                                 "embedding and head keep --dtype.")
@click.option("--writer-option", "writer_opts", multiple=True, metavar="KEY=VALUE",
              help="Extra option for the output format's writer (repeatable). "
                   + "; ".join(f"{fmt}: " + ", ".join(f"{k} ({kind})" for k, kind in opts.items())
                               for fmt, opts in WRITER_OPTIONS.items() if opts)
                   + ". Other formats take none.")
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr (default: large models in a terminal).")
@validation_options
def convert(src, dst, to, fmt, dtype, rescale_every, cpp_type, quant, writer_opts, progress, **opts):
    """Convert SRC to DST: .pth, .safetensors, Hugging Face folder, rwkv.cpp .bin (and GGUF),
    training (parallel) or RNN form, fp32/fp16/bf16, streamed tensor by tensor.

    DST is written under a temporary name, read back and compared with SRC: tensor by tensor,
    logits drift and perplexity on held-out text (skip with --no-validate); it takes its name
    only when the check passes (a failed --max-ppl-increase gate exits 1 and writes no DST).

    \b
    Examples:
      rwkvtools convert ../shared/fixtures/tiny-rwkv-7v0-834K.pth /tmp/tiny7.safetensors
      rwkvtools convert ../shared/fixtures/tiny-rwkv-7v0-834K.pth /tmp/tiny7-rnn.safetensors --to rnn
      rwkvtools convert ../shared/fixtures/tiny-rwkv-7v0-834K.pth /tmp/tiny7-FP32.bin
      rwkvtools convert ../shared/fixtures/tiny-rwkv-5v2-730K-FP32.bin /tmp/tiny5-Q5_1.bin --rwkvcpp-type Q5_1
      rwkvtools convert ../shared/fixtures/tiny-rwkv-4v0-660K.pth /tmp/tiny4-hf --json
      rwkvtools convert /tmp/tiny7.safetensors /tmp/tiny7-bf16.pth --dtype bf16 --max-ppl-increase 1
      rwkvtools convert ../shared/fixtures/tiny-rwkv-7v0-834K.pth /tmp/tiny7-Q4_K.gguf --quant Q4_K
    """
    handle_errors(_convert)(src, dst, to, fmt, dtype, rescale_every, cpp_type, writer_opts, progress, opts, quant)


@option_check("convert")
def check_options(dst, opts, given=frozenset()):
    """convert's options and DST's format, checked before any file is read: (format, the writer's
    options)."""
    from ..io.writers import check_writer_options, format_from_path
    from ..transforms.convert import check_form
    fmt = opts.get("fmt") or format_from_path(dst)
    check_form(fmt, opts.get("to"), opts.get("rescale_every"))
    options = check_writer_options(fmt, _writer_options(opts.get("writer_opts") or ()), from_cli=True)
    for flag, key, name in (("quant", "quant", "--quant"), ("cpp_type", "data_type", "--rwkvcpp-type")):
        if opts.get(flag) and key in options:  # the same setting twice: one of them would be ignored
            raise UserError(f"{name} {opts[flag]} and --writer-option {key}={options[key]} set the same thing; "
                            "give one")
    if opts.get("quant"):
        if fmt != "gguf":
            raise UserError("--quant applies to GGUF output (.gguf or --format gguf); for rwkv.cpp use --rwkvcpp-type")
        options["quant"] = opts["quant"]
    if opts.get("cpp_type"):
        if fmt != "rwkvcpp":
            raise UserError("--rwkvcpp-type applies to rwkv.cpp output (.bin or --format rwkvcpp)")
        options["data_type"] = opts["cpp_type"]
    return fmt, options


def _convert(src, dst, to, fmt, dtype, rescale_every, cpp_type, writer_opts, progress, opts, quant=None):
    from ..io.atomic import staged_output
    from ..transforms.convert import convert as do_convert
    from .common import with_core
    from ..io.writers import format_from_path
    output_guard(src, dst, opts.get("force", False), {"--eval-text": opts.get("eval_text")},
                 opts.get("report"), fmt or format_from_path(dst))
    fmt, options = check_options(dst, {"fmt": fmt, "writer_opts": writer_opts, "quant": quant, "cpp_type": cpp_type})
    # written under a temporary name, read back and checked, and only then renamed onto DST: a
    # failed check (or any failure) leaves no DST and an existing DST as it was
    with staged_output(dst) as staged:
        report = do_convert(src, staged, to=to, format=fmt, dtype=dtype, rescale_every=rescale_every,
                            progress=progress, **options)
        if not opts.get("no_validate"):
            from ..io import read_checkpoint
            from ..transforms import prepare_for_model
            from ..transforms.convert import canonical_vectors, compare_checkpoints
            from .common import run_validation
            before = canonical_vectors(prepare_for_model(read_checkpoint(src)))  # as convert wrote it
            after = prepare_for_model(read_checkpoint(staged))
            report["tensors_compared"] = tc = compare_checkpoints(before, after)
            if tc.get("shape_mismatch"):  # a writer that cannot hold this model: never a file that reads as another
                from ..errors import FormatError
                raise FormatError(f"{dst} not written: it reads back with '{tc['shape_mismatch']}' of shape "
                                  f"{tuple(tc['shapes'][1])}, the source has {tuple(tc['shapes'][0])} (the {fmt} "
                                  "writer cannot hold this model as it is; please report it)")
            report["validation"] = run_validation(before, after, opts, identical=tc["same_model"])
        v = report.get("validation")
        written = not v or v.get("passed", True)
        report = with_core(report, "convert", src, dst, report.get("version"), written, staged)
        lines = _summary_lines(report)
        if not report["written"]:
            print_summary(f"NOT written (gate failed): {dst}", report, opts.get("as_json"), lines)
        finish(report, opts)  # writes --report; a failed gate raises (exit 1) before DST is renamed
    print_summary(f"wrote {dst}", report, opts.get("as_json"), lines)


def _summary_lines(report: dict) -> list[str]:
    tc = report.get("tensors_compared")
    lines = [f"{report['source_format']} ({report['form_before']}) -> {report['format']} ({report['form_after']}), "
             f"RWKV v{report['version']}, {report['params']:,} parameters, dtype {report['dtype']}"
             + (f", {report['quant']} blocks" if report.get("quant") else ""),
             f"{report['bytes_src']:,} -> {report['bytes_dst']:,} bytes in {report['seconds']:.2f} s"]
    if report.get("tensor_types"):
        lines.append("tensor types: " + ", ".join(f"{t} x{n}" for t, n in sorted(report["tensor_types"].items())))
    fb = report.get("fallbacks") or []
    if fb:
        kinds = sorted({f"{f['wanted']} -> {f['written']}" for f in fb})
        lines.append(f"demoted: {len(fb)} tensors ({', '.join(kinds)}: rows not a multiple of the block; "
                     "see 'fallbacks' in --json)")
    if tc:
        if tc["max_abs_diff"] == 0:
            lines.append(f"tensors: all {tc['compared']} read back identical")
        else:
            lines.append(f"tensors: {tc['identical']}/{tc['compared']} identical, max |diff| "
                         f"{tc['max_abs_diff']:.3g} ({tc['max_abs_diff_tensor']})")
        dense = set(tc.get("only_in_output") or [])   # P.weight written for P's factors / int8-int4 codes
        folded = [k for k in tc.get("only_in_source") or [] if k.rsplit(".", 1)[0] + ".weight" in dense]
        unused = [k for k in tc.get("only_in_source") or [] if k not in folded]
        if folded:
            n = len({k.rsplit(".", 1)[0] for k in folded})
            lines.append(f"densified: {n} low-rank or int8/int4 linears written as dense matrices "
                         f"({', '.join(sorted({k.rsplit('.', 1)[0] for k in folded})[:4])}{', ...' if n > 4 else ''}); "
                         "perplexity checks them")
        if unused:
            lines.append(f"not in output (unused by every runtime): {', '.join(unused[:6])}")
    return lines

"""``rwkvtools quantize``: int8 / int4 weights in rwkvtools' format, or ggml's block formats in an
rwkv.cpp ``.bin`` or a llama.cpp ``.gguf``, by round-to-nearest or GPTQ; a thin layer over
rwkvtools.transforms.quantize."""
from __future__ import annotations

import os
import sys
import time

import click

from ..cli import FINITE_FLOAT, UserError, handle_errors, main
from .common import given_options, option_check, output_guard, publish, run_validation, validation_options

SCHEME_CHOICES = ["int8", "int4", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"]


@main.command()
@click.argument("src", type=click.Path())
@click.argument("dst", type=click.Path())
@click.option("--scheme", required=True, type=click.Choice(SCHEME_CHOICES),
              help="int8: symmetric per output channel; int4: groups of --group-size input columns with an "
                   "fp16 scale and zero point; Q4_0..Q8_0: ggml blocks in an rwkv.cpp .bin or a .gguf; "
                   "Q4_K, Q5_K, Q6_K: ggml's K-quants, .gguf only.")
@click.option("--method", type=click.Choice(["rtn", "gptq"]), default=None,
              help="rtn: round to nearest; gptq: error compensation with the inverse Hessian of each "
                   "layer's inputs on calibration text. Default: gptq when --calib is given, else rtn.")
@click.option("--group-size", type=click.Choice(["32", "64", "128"]), default="64", show_default=True,
              help="int4 only: input columns per scale/zero point (4 + 32/G bits per weight).")
@click.option("--calib", type=click.Path(), default=None,
              help="Calibration text for gptq (default: the packaged calibration text, disjoint from the "
                   "default held-out text). Use text that is not your --eval-text.")
@click.option("--calib-tokens", type=int, default=8192, show_default=True, help="Calibration tokens to use.")
@click.option("--skip", multiple=True, metavar="GLOB",
              help="Keep matching tensors in high precision (tensor name or linear prefix, e.g. "
                   "'blocks.0.*' or '*.ffn.value.weight'); repeatable; wins over --include.")
@click.option("--include", multiple=True, metavar="GLOB",
              help="Also quantize matching linears that stay by default (int8/int4; e.g. 'head.weight'); "
                   "repeatable.")
@click.option("--act-order/--no-act-order", default=False, show_default=True,
              help="gptq: quantize columns by decreasing input energy (groups fixed beforehand).")
@click.option("--clip/--no-clip", default=False, show_default=True,
              help="Search a shrunk range per group that rounds with the least error (int8/int4, and "
                   "Q4_0..Q8_0 with gptq; not the K-quants).")
@click.option("--damp", type=FINITE_FLOAT, default=0.01, show_default=True,
              help="gptq: Hessian dampening, relative to the mean input energy.")
@click.option("--chunk-len", type=int, default=512, show_default=True, help="Tokens per forward during calibration.")
@click.option("--tune-steps", type=int, default=0, show_default=True,
              help="After rounding, train the scales (levels fixed) end to end for N Adam steps to minimise "
                   "the KL divergence from the original model on calibration sequences (0: off). Costs N "
                   "forward+backward passes of --tune-batch x --tune-seq tokens; kept only if it lowers the "
                   "KL on held-out calibration sequences. Runs on --device. Not for the K-quants.")
@click.option("--tune-lr", type=FINITE_FLOAT, default=3e-3, show_default=True, help="Tuning: Adam learning rate (log-scales).")
@click.option("--tune-tokens", type=int, default=262144, show_default=True,
              help="Tuning: calibration tokens to draw sequences from (the last eighth held out); a shorter "
                   "text gives what it has.")
@click.option("--tune-batch", type=int, default=16, show_default=True, help="Tuning: sequences per step.")
@click.option("--tune-seq", type=int, default=512, show_default=True, help="Tuning: tokens per sequence.")
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr (default: in a terminal).")
@validation_options
def quantize(src, dst, **opts):
    """Quantize the weights of SRC and write DST.

    int8/int4 write rwkvtools' packed format (.safetensors or .pth): `rwkvtools eval`,
    `rwkvtools.load` and `export-onnx` run it with the weights still packed. Q4_0, Q4_1, Q5_0,
    Q5_1 and Q8_0 write an rwkv.cpp .bin; with rtn the bytes are exactly those of rwkv.cpp's own
    quantizer, with gptq they are better blocks that rwkv.cpp loads as they are. A .gguf DST
    (RWKV-6/7) writes the same block types and the K-quants Q4_K, Q5_K, Q6_K for llama.cpp,
    following llama.cpp's own tensor rule (rtn: the bytes of llama.cpp's quantizer; rows that do
    not fit a K-quant fall back as llama.cpp does, e.g. Q4_K -> Q5_0).

    Kept in high precision by default: embedding, head, 1-D/3-D tensors, decays and bonuses,
    token-shift mixes, norms and the small v6/v7 LoRA matrices (ggml formats: rwkv.cpp's or
    llama.cpp's own rule). `rwkvtools inspect DST --json` shows per tensor what was done.

    Perplexity is measured before and after on a held-out text; --max-ppl-increase turns it into
    a gate (exit 1, the report still written, DST not written).

    \b
    Examples:
      rwkvtools quantize ../shared/fixtures/tiny-rwkv-5v2-730K-FP32.bin /tmp/q8.safetensors --scheme int8
      rwkvtools quantize ../shared/fixtures/tiny-rwkv-5v2-730K-FP32.bin /tmp/q4.safetensors --scheme int4 \\
          --calib ../shared/data/wikitext-2-valid.txt --eval-text ../shared/data/wikitext-2-test.txt \\
          --eval-tokens 8192 --max-ppl-increase 5 --json --force
      rwkvtools quantize ../shared/fixtures/tiny-rwkv-7v0-834K-FP32.bin /tmp/tiny7-Q5_1.bin --scheme Q5_1
      rwkvtools quantize ../shared/fixtures/tiny-rwkv-5v2-730K-FP32.bin /tmp/q40.bin --scheme Q4_0 --method gptq
      rwkvtools quantize ../shared/fixtures/tiny-rwkv-5v2-730K-FP32.bin /tmp/q40t.bin --scheme Q4_0 \\
          --calib ../shared/data/wikitext-2-valid.txt --tune-steps 200
      rwkvtools quantize ../shared/fixtures/tiny-rwkv-7v0-834K.pth /tmp/tiny7-Q4_K.gguf --scheme Q4_K --method gptq
      rwkvtools quantize ../shared/fixtures/tiny-rwkv-7v0-834K.pth /tmp/q7.safetensors --scheme int4 \\
          --group-size 32 --skip 'blocks.0.*' --include head.weight
      rwkvtools inspect /tmp/q8.safetensors
    """
    handle_errors(_quantize)(src, dst, opts, given_options(click.get_current_context()))


@option_check("quantize")
def check_options(dst, opts, given):
    """quantize's options and DST's extension, checked before any file is read; the config."""
    from ..transforms.quantize import BLOCK_SCHEMES, KQUANT_SCHEMES, QuantizeConfig
    scheme = opts["scheme"]
    if scheme != "int4" and "group_size" in given:  # refused rather than ignored
        raise UserError(f"--group-size applies to --scheme int4 ({scheme} has its own grouping: "
                        f"{'one scale per output channel' if scheme == 'int8' else 'ggml blocks'})")
    ext = os.path.splitext(dst)[1].lower()
    if scheme in KQUANT_SCHEMES and ext != ".gguf":
        raise UserError(f"{dst}: {scheme} is a K-quant, written as a llama.cpp GGUF file: use a .gguf output "
                        "(rwkv.cpp's .bin takes Q4_0, Q4_1, Q5_0, Q5_1, Q8_0)")
    if scheme in BLOCK_SCHEMES and ext not in (".bin", ".gguf"):
        raise UserError(f"{dst}: {scheme} is a ggml block format: write an rwkv.cpp .bin or a llama.cpp .gguf "
                        "(or --scheme int8/int4 for .safetensors)")
    if scheme not in BLOCK_SCHEMES and ext not in (".safetensors", ".pth", ".pt"):
        raise UserError(f"{dst}: {scheme} is written as .safetensors (or .pth); for an rwkv.cpp .bin or a .gguf use "
                        "a ggml scheme (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0; Q4_K, Q5_K, Q6_K for .gguf)")
    if opts["calib_tokens"] < 2:
        raise UserError("--calib-tokens must be at least 2")
    if opts["chunk_len"] < 1:
        raise UserError("--chunk-len must be positive")
    method = opts["method"] or ("gptq" if opts["calib"] else "rtn")
    tuning = opts["tune_steps"] > 0
    if opts["calib"] and method == "rtn" and not tuning:
        raise UserError("--calib is only used by --method gptq and by --tune-steps (rtn needs no calibration)")
    if opts["tune_steps"] < 0:
        raise UserError("--tune-steps must be 0 (off) or positive")
    if opts["act_order"] and method != "gptq":
        raise UserError("--act-order applies to --method gptq")
    # options that would be ignored are refused, as --group-size is
    unused = [o for o in ("damp", "calib_tokens") if o in given and method != "gptq"]
    unused += [o for o in ("chunk_len",) if o in given and method != "gptq" and not tuning]
    if unused:
        raise UserError(f"{', '.join('--' + o.replace('_', '-') for o in unused)} appl{'ies' if len(unused) == 1 else 'y'} "
                        f"to {'--method gptq' if unused != ['chunk_len'] else 'gptq calibration and --tune-steps'} "
                        f"(the method here is {method})")
    idle = [o for o in ("tune_lr", "tune_tokens", "tune_batch", "tune_seq") if o in given and not tuning]
    if idle:
        raise UserError(f"{', '.join('--' + o.replace('_', '-') for o in idle)}: tuning options; tuning runs with "
                        "--tune-steps N (N > 0)")
    return QuantizeConfig(scheme=scheme, method=method, group_size=int(opts["group_size"]),
                          skip=tuple(opts["skip"]), include=tuple(opts["include"]),
                          calib_tokens=opts["calib_tokens"], chunk_len=opts["chunk_len"], damp=opts["damp"],
                          act_order=opts["act_order"], clip=opts["clip"],
                          target="gguf" if ext == ".gguf" else "rwkvcpp", tune_steps=opts["tune_steps"],
                          tune_lr=opts["tune_lr"], tune_tokens=opts["tune_tokens"], tune_batch=opts["tune_batch"],
                          tune_seq=opts["tune_seq"])


def _quantize(src, dst, opts, given):
    from ..io import read_checkpoint
    from ..spec import detect
    from ..transforms import prepare_for_model
    from ..transforms.quantize import apply, calibration_tokens, plan, write_quantized

    output_guard(src, dst, opts["force"], {"--calib": opts["calib"], "--eval-text": opts["eval_text"]},
                 opts["report"])
    cfg = check_options(dst, opts, given)
    method, tuning = cfg.method, cfg.tune_steps > 0
    progress = opts["progress"] if opts["progress"] is not None else sys.stderr.isatty()
    t0 = time.perf_counter()
    before = prepare_for_model(read_checkpoint(src))
    spec = detect(before.tensors, before.manifest)
    p = plan(before, cfg)
    for w in p["warnings"]:
        click.echo(f"warning: {w}", err=True)
    calib = None
    if method == "gptq" or tuning:
        n = max(cfg.calib_tokens if method == "gptq" else 0, cfg.tune_tokens if tuning else 0)
        calib = calibration_tokens(opts["calib"], spec.vocab, n, opts["tokenizer"], opts["encoding"])
    device = "cpu"
    if tuning:   # tuning runs where validation does (--device; auto: CUDA when present)
        from .common import check_device
        device = check_device(opts.get("device") or "auto")
    after = apply(before, p, calib, progress=progress, device=device)
    t_transform = time.perf_counter() - t0

    validation = run_validation(before, after, opts)
    passed = validation is None or validation.get("passed", True)

    def describe(staged):
        return _quantize_report(src, dst, opts, passed, staged, spec, cfg, p, calib, after, t_transform, validation)

    publish(dst, passed, lambda path, fmt: write_quantized(after, path, progress=progress), describe,
            f"quantize {src} -> {dst}", opts)


def _quantize_report(src, dst, opts, passed, staged, spec, cfg, p, calib, after, t_transform, validation):
    scheme, method = cfg.scheme, cfg.method
    ext = os.path.splitext(dst)[1].lower()
    size = os.path.getsize(staged) if staged else None
    src_size = os.path.getsize(src) if os.path.isfile(src) else None
    q = after.manifest["quantized"]
    if validation is not None:  # tensor bytes on both sides, gate passed or not (a ggml view holds dequantized
        # values: its quantized tensors count their stored bytes); the files' sizes are file_bytes_*
        validation["bytes_after"] = (validation["bytes_before"] - q["quantized_bytes_before"]
                                     + q["quantized_bytes_after"])
    report = {
        "command": "quantize", "src": src, "dst": dst, "written": passed, "version": spec.version,
        "config": cfg.to_dict(),
        "calibration": None if calib is None else {"text": opts["calib"] or "(packaged calib.txt)",
                                                   "tokens": len(calib)},
        "format": q.get("format") or ext.lstrip("."),
        "bits_per_weight": q["bits_per_weight"], "quantized_params": q["quantized_params"],
        "quantized_bytes_before": q["quantized_bytes_before"], "quantized_bytes_after": q["quantized_bytes_after"],
        "file_bytes_before": src_size, "file_bytes_after": size,
        "tuning": q.get("tuning"), "tensors": q["tensors"], "kept": q["kept"], "fallbacks": q.get("fallbacks", {}), "warnings": p["warnings"],
        "seconds_transform": t_transform, "validation": validation,
    }
    if validation is not None:
        report["ppl_before"] = validation["ppl_before"]
        report["ppl_after"] = validation["ppl_after"]
    errs = [v["rel_error"] for v in q["tensors"].values()]
    lines = [f"{len(q['tensors'])} matrices, {q['quantized_params']:,} weights -> {scheme}"
             f"{' g' + str(cfg.group_size) if scheme == 'int4' else ''} by {method}: "
             f"{q['bits_per_weight']:.3f} bits per weight; {len(q['kept'])} tensors kept in high precision",
             f"quantized matrices {_mb(q['quantized_bytes_before'])} -> {_mb(q['quantized_bytes_after'])}; "
             f"relative weight error mean {sum(errs) / len(errs):.4g}, max {max(errs):.4g}; {t_transform:.1f} s",
             *([_tuning_line(q["tuning"])] if q.get("tuning") else []),
             (f"wrote {dst} ({_mb(size)}" + (f", source {_mb(src_size)})" if src_size else ")")) if passed
             else f"NOT written (gate failed): {dst}"]
    return report, lines


def _tuning_line(t: dict) -> str:
    head = (f"scales tuned on {t['tensors']} matrices, {t['steps']} steps: KL to the source on "
            f"{t['heldout_sequences']} held-out calibration sequences {t['heldout_kl_before']:.4g} -> "
            f"{t['heldout_kl_after']:.4g}")
    return head + ("" if t["kept"] else " (not lower: the rounded scales were kept)")


def _mb(n) -> str:
    if n is None:
        return "?"
    return f"{n / 1e6:.3f} MB" if n >= 1e5 else f"{n / 1e3:.1f} KB"

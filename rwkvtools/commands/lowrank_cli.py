"""``rwkvtools lowrank``: factor feed-forward (and optionally time-mix) weights by truncated SVD,
plain or activation-aware (whitened); a thin layer over rwkvtools.transforms.lowrank."""
from __future__ import annotations

import sys
import time

import click

from ..cli import FINITE_FLOAT, UserError, handle_errors, main
from .common import given_options, option_check, output_guard, publish, run_validation, validation_options


@main.command()
@click.argument("src", type=click.Path())
@click.argument("dst", type=click.Path())
@click.option("--rank", "rank", type=FINITE_FLOAT, required=True,
              help="R < 1: share of each targeted matrix's parameters kept (r = R*m*n/(m+n)); "
                   "R >= 1: absolute rank.")
@click.option("--method", type=click.Choice(["whiten", "svd"]), default="whiten", show_default=True,
              help="whiten: activation-aware SVD (SVD-LLM) on calibration text; svd: plain truncated SVD.")
@click.option("--targets", type=click.Choice(["ffn", "ffn+att"]), default="ffn", show_default=True,
              help="ffn: channel-mix key/value (+receptance in v4-v6); ffn+att adds time-mix "
                   "receptance/key/value/gate/output.")
@click.option("--alloc", type=click.Choice(["uniform", "energy"]), default="uniform", show_default=True,
              help="uniform: the same share everywhere; energy: the same total budget, spent where the "
                   "(whitened) spectra keep the most energy per parameter.")
@click.option("--calib", type=click.Path(), default=None,
              help="Calibration text for --method whiten (default: the packaged calibration text, "
                   "disjoint from the default held-out text).")
@click.option("--calib-tokens", type=int, default=8192, show_default=True, help="Calibration tokens to use.")
@click.option("--damp", type=FINITE_FLOAT, default=0.1, show_default=True,
              help="Whitening regulariser, relative to the mean input variance.")
@click.option("--chunk-len", type=int, default=512, show_default=True, help="Tokens per forward during calibration.")
@click.option("--merge", is_flag=True, help="Write dense weights (U V) for runtimes without low-rank layers.")
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr (default: in a terminal).")
@validation_options
def lowrank(src, dst, **opts):
    """Factor the weights of SRC into low-rank pairs (P.weight_u, P.weight_v) and write DST.

    The reference model runs each pair as two thin matmuls. Perplexity is measured before and
    after on a held-out text (never the calibration text); --max-ppl-increase turns it into a
    gate (exit 1, the report still written, DST not written).

    \b
    Examples:
      rwkvtools lowrank ../shared/fixtures/tiny-rwkv-5v2-730K-FP32.bin /tmp/lr.safetensors --rank 0.5
      rwkvtools lowrank ../shared/fixtures/tiny-rwkv-5v2-730K-FP32.bin /tmp/lr.safetensors --rank 0.32 \\
          --alloc energy --eval-text ../shared/data/wikitext-2-test.txt --eval-tokens 8192 \\
          --max-ppl-increase 100 --json --force
      rwkvtools lowrank ../shared/fixtures/tiny-rwkv-7v0-834K.pth /tmp/lr7.pth --rank 0.5 --method svd --merge
      rwkvtools inspect /tmp/lr.safetensors
    """
    handle_errors(_lowrank)(src, dst, opts, given_options(click.get_current_context()))


@option_check("lowrank")
def check_options(dst, opts, given=frozenset()):
    """lowrank's options and DST's format, checked before any file is read; the config."""
    from ..io.writers import format_from_path
    from ..transforms.lowrank import LowRankConfig
    fmt = format_from_path(dst)
    if fmt in ("rwkvcpp", "gguf", "hf") and not opts["merge"]:
        raise UserError(f"{dst}: the {fmt} format has no low-rank layers; pass --merge to write dense weights, "
                        "or write .safetensors / .pth")
    if opts["calib_tokens"] < 2:
        raise UserError("--calib-tokens must be at least 2")
    unused = [o for o in ("calib", "calib_tokens", "damp", "chunk_len") if o in given and opts["method"] != "whiten"]
    if unused:  # refused rather than ignored
        raise UserError(f"{', '.join('--' + o.replace('_', '-') for o in unused)} appl{'ies' if len(unused) == 1 else 'y'} "
                        f"to --method whiten (svd factors the weights alone, with no calibration)")
    rank = opts["rank"]
    if rank >= 1 and rank == int(rank):
        rank = int(rank)
    return LowRankConfig(rank=rank, method=opts["method"], targets=opts["targets"], alloc=opts["alloc"],
                         calib_tokens=opts["calib_tokens"], chunk_len=opts["chunk_len"], damp=opts["damp"],
                         merge=opts["merge"])


def _lowrank(src, dst, opts, given=frozenset()):
    from ..io import read_checkpoint
    from ..io.writers import write_checkpoint
    from ..spec import detect
    from ..transforms.lowrank import calibration_tokens, lowrank
    from ..transforms import prepare_for_model

    output_guard(src, dst, opts["force"], {"--calib": opts["calib"], "--eval-text": opts["eval_text"]},
                 opts["report"])
    cfg = check_options(dst, opts, given)
    progress = opts["progress"] if opts["progress"] is not None else sys.stderr.isatty()
    t0 = time.perf_counter()
    before = prepare_for_model(read_checkpoint(src))
    spec = detect(before.tensors, before.manifest)
    calib = None
    if cfg.method == "whiten":
        calib = calibration_tokens(opts["calib"], spec.vocab, cfg.calib_tokens, opts["tokenizer"], opts["encoding"])
    after = lowrank(before, cfg, calib, progress=progress)
    t_transform = time.perf_counter() - t0
    plan = after.manifest["history"][-1]["plan"]

    validation = run_validation(before, after, opts)
    passed = validation is None or validation.get("passed", True)

    def describe(_staged):
        return _lowrank_report(src, dst, opts, passed, spec, cfg, calib, plan, before, after, t_transform, validation)

    publish(dst, passed, lambda path, fmt: write_checkpoint(after, path, fmt), describe, f"lowrank {src} -> {dst}", opts)


def _lowrank_report(src, dst, opts, passed, spec, cfg, calib, plan, before, after, t_transform, validation):
    report = {
        "command": "lowrank", "src": src, "dst": dst, "written": passed, "version": spec.version,
        "config": cfg.to_dict(),
        "calibration": None if calib is None else {"text": opts["calib"] or "(packaged calib.txt)",
                                                   "tokens": len(calib)},
        "layers": [{k: x[k] for k in ("prefix", "shape", "rank", "full_rank", "kept_energy",
                                      "params_before", "params_after")} for x in plan["layers"]],
        "target_params_before": plan["params_before"], "target_params_after": plan["params_after"],
        "params_before": before.num_params(), "params_after": after.num_params(),
        "kept_energy_mean": plan["kept_energy_mean"], "kept_energy_min": plan["kept_energy_min"],
        "seconds_transform": t_transform, "validation": validation,
    }
    if validation is not None:
        report["ppl_before"] = validation["ppl_before"]
        report["ppl_after"] = validation["ppl_after"]
    ranks = [x["rank"] for x in plan["layers"]]
    pb, pa = plan["params_before"], plan["params_after"]
    lines = [f"{len(ranks)} matrices ({cfg.targets}), {cfg.method}, {cfg.alloc} allocation: ranks "
             f"{min(ranks)}-{max(ranks)}{' (merged to dense)' if cfg.merge else ''}",
             f"targeted params {pb:,} -> {pa:,} ({100.0 * pa / max(pb, 1):.1f}%); model {report['params_before']:,} "
             f"-> {report['params_after']:,}",
             f"kept energy mean {plan['kept_energy_mean']:.4f}, min {plan['kept_energy_min']:.4f} "
             f"({'whitened' if cfg.method == 'whiten' else 'weight'} spectrum); {t_transform:.1f} s",
             f"{'wrote ' + dst if passed else 'NOT written (gate failed): ' + dst}"]
    return report, lines

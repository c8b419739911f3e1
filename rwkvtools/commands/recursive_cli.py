"""``rwkvtools recursive`` (shared blocks looped, relaxed by per-layer LoRA) and ``rwkvtools heal``
(knowledge distillation from the original model); thin layers over rwkvtools.transforms.recursive
and rwkvtools.transforms.heal."""
from __future__ import annotations

import sys
import time

import click

from ..cli import FINITE_FLOAT, SEED, UserError, handle_errors, main
from .common import given_options, option_check, output_guard, publish, run_validation, validation_options


def _format(dst: str) -> str:
    from ..io.writers import format_from_path
    return format_from_path(dst)


def _writable_format(dst: str, merged: bool) -> str:
    fmt = _format(dst)
    if not merged and fmt not in ("safetensors", "pth"):
        raise UserError(f"{dst}: a recursive checkpoint is written as .safetensors or .pth (other runtimes do "
                        "not know shared blocks); pass --merge for a plain checkpoint")
    return fmt


# ---------------------------------------------------------------------------------- recursive
@main.command()
@click.argument("src", type=click.Path())
@click.argument("dst", type=click.Path())
@click.option("--blocks", "-k", type=int, default=None,
              help="K shared blocks; the shared layers (all but --keep-first/--keep-last) must be a multiple of K. "
                   "Required unless SRC is already recursive and --merge expands it.")
@click.option("--order", type=click.Choice(["cycle", "sequence"]), default="cycle", show_default=True,
              help="cycle: blocks 1..K, then 1..K again (layer l uses block l mod K); sequence: each block "
                   "L/K times back to back.")
@click.option("--init", "init", type=click.Choice(["stepwise", "average", "lower"]), default="stepwise",
              show_default=True,
              help="Shared block from: stepwise = layers picked evenly across the depth; average = the mean of "
                   "its layers; lower = the first K layers.")
@click.option("--lora-rank", default="0", show_default=True,
              help="Per-layer LoRA rank of every shared matrix (capped at min(out, in)); 0 = pure recursive; "
                   "'full' reproduces the original (up to float rounding).")
@click.option("--lora-method", type=click.Choice(["svd", "whiten"]), default="svd", show_default=True,
              help="svd: truncated SVD of W_layer - W_shared; whiten: truncated in the layer's activation-whitened "
                   "space (calibration text).")
@click.option("--share", default="att,ffn", show_default=True,
              help="Groups tied by the blocks, comma-separated: att (time-mix matrices), ffn (channel-mix "
                   "matrices), lora (v6/v7 small low-rank matrices), mix (token-shift vectors), decay (decay, "
                   "bonus, v7 w0/a0/v0/k_k/k_a/r_k), norm (ln1, ln2, ln_x); vectors = mix,decay,norm; "
                   "matrices = att,ffn; all. "
                   "Only att/ffn matrices get a LoRA; the others are tied exactly.")
@click.option("--keep-first", type=int, default=0, show_default=True, help="Leave the first N layers unshared.")
@click.option("--keep-last", type=int, default=0, show_default=True, help="Leave the last N layers unshared.")
@click.option("--merge", is_flag=True,
              help="Write a plain checkpoint (every layer's W_shared + LoRA expanded) for runtimes without "
                   "shared blocks; with a recursive SRC (and no --blocks), just expand it.")
@click.option("--calib", type=click.Path(), default=None,
              help="Calibration text for --lora-method whiten (default: the packaged calibration text, disjoint "
                   "from the default held-out text).")
@click.option("--calib-tokens", type=int, default=8192, show_default=True, help="Calibration tokens to use.")
@click.option("--seed", type=SEED, default=0, show_default=True,
              help="Seed of the random LoRA rows given to directions with no energy.")
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr (default: in a terminal).")
@validation_options
def recursive(src, dst, **opts):
    """Turn SRC's layers into K shared blocks looped L/K times, each layer relaxed by a LoRA.

    The large time-mix and channel-mix matrices of the layers that map to a block are replaced
    by one shared matrix (stored once) plus, per layer, a LoRA pair from the truncated SVD of
    what sharing lost. Vectors and the small v6/v7 low-rank matrices stay per layer unless
    --share ties them. The layer -> block mapping, ranks and unique parameters are recorded in
    the manifest (see `rwkvtools inspect`). Heal the result with `rwkvtools heal`.

    Perplexity is measured before and after on a held-out text; --max-ppl-increase turns it into
    a gate (exit 1, the report still written, DST not written).

    \b
    Examples:
      rwkvtools recursive ../shared/fixtures/tiny-rwkv-5v2-730K-FP32.bin /tmp/rec6.safetensors \\
          --blocks 6 --lora-rank 16 --force
      rwkvtools recursive ../shared/fixtures/tiny-rwkv-7v0-834K.pth /tmp/rec7.safetensors --blocks 4 \\
          --order sequence --init average --lora-rank 8 --lora-method whiten --json --force
      rwkvtools recursive ../shared/fixtures/tiny-rwkv-5v2-730K-FP32.bin /tmp/rec5.pth --blocks 5 \\
          --keep-first 1 --keep-last 1 --lora-rank 8 --merge --force
      rwkvtools inspect /tmp/rec6.safetensors
      rwkvtools recursive /tmp/rec6.safetensors /tmp/rec6-plain.safetensors --merge --force
    """
    handle_errors(_recursive)(src, dst, opts, given_options(click.get_current_context()))


def _merge_only(src, dst, src_ck, fmt, opts):
    from ..io.writers import write_checkpoint
    from ..spec import detect
    from ..transforms import prepare_for_model
    from ..transforms.recursive import merge
    from ..validate import checkpoint_bytes
    if opts["blocks"] is not None:
        raise UserError(f"{src} is already recursive; to expand it pass --merge without --blocks (to re-collapse, "
                        "start from the original model)")
    t0 = time.perf_counter()
    before = prepare_for_model(src_ck)
    after = merge(src_ck)
    validation = run_validation(before, after, opts)
    passed = validation is None or validation.get("passed", True)
    summary = (src_ck.manifest.get("recursive") or {}).get("summary", "recursive checkpoint")

    def describe(_staged):
        report = {"command": "recursive", "src": src, "dst": dst, "written": passed,
                  "version": detect(after.tensors).version, "merged": True, "merge_only": True, "from": summary,
                  "params_before": src_ck.num_params(), "params_after": after.num_params(), "bytes_before": checkpoint_bytes(src_ck),
                  "bytes_after": checkpoint_bytes(after), "seconds_transform": time.perf_counter() - t0,
                  "validation": validation}
        lines = [f"expanded: {summary}",
                 f"stored {report['bytes_before']:,} -> {report['bytes_after']:,} bytes (plain checkpoint)",
                 f"{'wrote ' + dst if passed else 'NOT written (gate failed): ' + dst}"]
        return report, lines

    publish(dst, passed, lambda path, f: write_checkpoint(after, path, fmt), describe,
            f"recursive --merge {src} -> {dst}", opts)


@option_check("recursive")
def check_options(dst, opts, given=frozenset()):
    """recursive's options and DST's format, checked before any file is read; the config (None
    without --blocks, which only expanding a recursive SRC with --merge may leave out)."""
    from ..transforms.recursive import RecursiveConfig
    _writable_format(dst, opts["merge"])
    if opts["calib_tokens"] < 2:
        raise UserError("--calib-tokens must be at least 2")
    if opts["blocks"] is None:
        # only expanding a recursive SRC (--merge) goes without --blocks: it takes nothing that
        # configures a collapse (refused rather than ignored)
        collapse = [o for o in ("order", "init", "lora_rank", "lora_method", "share", "keep_first", "keep_last",
                                "calib", "calib_tokens", "seed") if o in given]
        if collapse and opts["merge"]:   # without --merge, '--blocks K is required' (or SRC is recursive) comes next
            names = ", ".join("--" + o.replace("_", "-") for o in collapse)
            raise UserError(f"{names} configure{'s' if len(collapse) == 1 else ''} a collapse into --blocks K "
                            "shared blocks; without --blocks (expanding a recursive SRC with --merge) "
                            f"{'it does' if len(collapse) == 1 else 'they do'} not apply")
        return None
    no_lora = str(opts["lora_rank"]).strip() == "0"
    if "lora_method" in given and no_lora:  # refused rather than ignored
        raise UserError("--lora-method chooses how the LoRA relaxation starts: it applies with --lora-rank above 0")
    unused = [o for o in ("calib", "calib_tokens") if o in given and (no_lora or opts["lora_method"] != "whiten")]
    if unused:
        raise UserError(f"{', '.join('--' + o.replace('_', '-') for o in unused)} appl{'ies' if len(unused) == 1 else 'y'} "
                        "to --lora-method whiten with --lora-rank above 0 (nothing else is calibrated)")
    return RecursiveConfig(blocks=opts["blocks"], order=opts["order"], init=opts["init"], lora_rank=opts["lora_rank"],
                           lora_method=opts["lora_method"], share=opts["share"], keep_first=opts["keep_first"],
                           keep_last=opts["keep_last"], calib_tokens=opts["calib_tokens"], seed=opts["seed"])


def _recursive(src, dst, opts, given=frozenset()):
    from ..io import read_checkpoint
    from ..io.writers import write_checkpoint
    from ..spec import detect
    from ..transforms import prepare_for_model
    from ..transforms.lowrank import calibration_tokens
    from ..transforms.recursive import apply, merge, plan

    output_guard(src, dst, opts["force"], {"--calib": opts["calib"], "--eval-text": opts["eval_text"]},
                 opts["report"])
    cfg = check_options(dst, opts, given)
    fmt = _writable_format(dst, opts["merge"])
    src_ck = read_checkpoint(src)
    if "shared.map" in src_ck.tensors:
        if not opts["merge"]:
            raise UserError(f"{src} is already recursive: pass --merge to expand it into a plain checkpoint, or start "
                            "from the original model to collapse it differently")
        return _merge_only(src, dst, src_ck, fmt, opts)
    if cfg is None:
        raise UserError("--blocks K is required (the number of shared blocks)")
    progress = opts["progress"] if opts["progress"] is not None else sys.stderr.isatty()
    t0 = time.perf_counter()
    before = prepare_for_model(src_ck)
    spec = detect(before.tensors, before.manifest)
    p = plan(before, cfg)
    calib = None
    if cfg.lora_method == "whiten" and cfg.lora_rank != 0:
        calib = calibration_tokens(opts["calib"], spec.vocab, cfg.calib_tokens, opts["tokenizer"], opts["encoding"])
    after = apply(before, p, calib, progress=progress)
    summary = after.manifest["recursive"]
    if opts["merge"]:
        after = merge(after)
    t_transform = time.perf_counter() - t0

    validation = run_validation(before, after, opts)
    passed = validation is None or validation.get("passed", True)
    from ..validate import checkpoint_bytes

    def describe(_staged):
        return _recursive_report(src, dst, opts, passed, spec, cfg, calib, summary, p, before, after,
                                 checkpoint_bytes, t_transform, validation)

    publish(dst, passed, lambda path, f: write_checkpoint(after, path, fmt), describe, f"recursive {src} -> {dst}", opts)


def _recursive_report(src, dst, opts, passed, spec, cfg, calib, summary, p, before, after, checkpoint_bytes,
                      t_transform, validation):
    report = {"command": "recursive", "src": src, "dst": dst, "written": passed, "merged": opts["merge"],
              "version": spec.version, "n_layer": spec.n_layer, "config": cfg.to_dict(),
              "calibration": None if calib is None else {"text": opts["calib"] or "(packaged calib.txt)",
                                                         "tokens": len(calib)},
              "mapping": summary["mapping"], "block_sources": p["block_sources"], "shared": p["shared"],
              "ranks": summary["ranks"], "unique_params": summary["unique_params"],
              "params_original": summary["params_original"], "params_before": before.num_params(),
              "params_after": after.num_params(), "bytes_before": checkpoint_bytes(before),
              "bytes_after": checkpoint_bytes(after), "notes": p.get("notes", []),
              "seconds_transform": t_transform, "validation": validation}
    if validation is not None:
        report["ppl_before"] = validation["ppl_before"]
        report["ppl_after"] = validation["ppl_after"]
    lines = [summary["summary"],
             "shared: " + ", ".join(p["shared"]),
             f"stored {report['bytes_before']:,} -> {report['bytes_after']:,} bytes"
             f"{' (merged back to a plain checkpoint)' if opts['merge'] else ''}; {t_transform:.1f} s",
             *[f"note: {n}" for n in report["notes"]],
             f"{'wrote ' + dst if passed else 'NOT written (gate failed): ' + dst}"]
    return report, lines


# --------------------------------------------------------------------------------------- heal
@main.command()
@click.argument("src", type=click.Path())
@click.argument("dst", type=click.Path())
@click.option("--teacher", required=True, type=click.Path(), help="The original model SRC was made from.")
@click.option("--text", type=click.Path(), default=None,
              help="Training text (default: the packaged calibration text, disjoint from the held-out text).")
@click.option("--tokens", type=int, default=65536, show_default=True,
              help="Training budget in tokens (steps = tokens / (batch-size * seq-len)).")
@click.option("--seq-len", type=int, default=256, show_default=True, help="Tokens per training sequence.")
@click.option("--batch-size", type=int, default=4, show_default=True, help="Sequences per step.")
@click.option("--lr", type=FINITE_FLOAT, default=1e-3, show_default=True, help="Peak learning rate (AdamW, cosine decay).")
@click.option("--train", "train", default="auto", show_default=True,
              help="What trains, comma-separated: auto (LoRA + low-rank factors present), lora, lowrank, "
                   "shared (shared block matrices), all (every tensor).")
@click.option("--lm-weight", type=FINITE_FLOAT, default=0.0, show_default=True,
              help="Add this times the language-model loss to the KL divergence.")
@click.option("--temperature", type=FINITE_FLOAT, default=1.0, show_default=True, help="Distillation temperature.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed (the run is deterministic for it).")
@click.option("--progress/--no-progress", default=None,
              help="Progress bar with loss and tokens/s on stderr (default: in a terminal).")
@validation_options(gate_help="Gate: fail (exit 1) when the healed model's perplexity is more than this many "
                              "percent above the teacher's.")
def heal(src, dst, **opts):
    """Heal a compressed model SRC by distillation from its original (--teacher); write DST.

    Trains, by default, only the LoRA relaxation (recursive) and low-rank factors (lowrank) of
    SRC to match the teacher's next-token distribution (KL divergence, plus --lm-weight times
    the LM loss) through the differentiable chunked forward. Everything else in DST is SRC's,
    bit for bit. The held-out perplexity of SRC before and after, and of the teacher, is
    measured and recorded in DST's manifest; --max-ppl-increase gates the healed model against
    the teacher (exit 1, report written, DST not written).

    \b
    Examples:
      rwkvtools recursive ../shared/fixtures/tiny-rwkv-5v2-730K-FP32.bin /tmp/rec6.safetensors \\
          --blocks 6 --lora-rank 16 --force
      rwkvtools heal /tmp/rec6.safetensors /tmp/rec6-healed.safetensors \\
          --teacher ../shared/fixtures/tiny-rwkv-5v2-730K-FP32.bin --tokens 16384 --seq-len 128 --lr 3e-3 --force
      rwkvtools heal /tmp/lr.safetensors /tmp/lr-healed.safetensors \\
          --teacher ../shared/fixtures/tiny-rwkv-5v2-730K-FP32.bin --train lowrank \\
          --text ../shared/data/tinyshakespeare.txt --json --force
    """
    handle_errors(_heal)(src, dst, opts)


@option_check("heal")
def check_heal_options(dst, opts, given=frozenset()):
    """heal's options, checked before any file is read; the config."""
    from ..transforms.heal import HealConfig
    return HealConfig(tokens=opts["tokens"], seq_len=opts["seq_len"], batch_size=opts["batch_size"], lr=opts["lr"],
                      train=opts["train"], lm_weight=opts["lm_weight"], temperature=opts["temperature"],
                      seed=opts["seed"], device=opts["device"])


def _heal(src, dst, opts):
    from ..io import read_checkpoint
    from ..io.writers import check_writable, write_checkpoint
    from ..spec import detect
    from ..transforms import prepare_for_model
    from ..transforms.heal import heal
    from ..validate import Gate, apply_gates, checkpoint_bytes, logits_drift, text_tokens

    output_guard(src, dst, opts["force"], {"--teacher": opts["teacher"], "--text": opts["text"],
                                           "--eval-text": opts["eval_text"]}, opts["report"])
    cfg = check_heal_options(dst, opts)
    student = read_checkpoint(src)
    if "shared.map" in student.tensors and _format(dst) not in ("safetensors", "pth"):
        raise UserError(f"{dst}: a healed recursive checkpoint is written as .safetensors or .pth; expand it "
                        "afterwards with 'rwkvtools recursive HEALED PLAIN --merge'")
    check_writable(student, _format(dst))  # the healed model keeps the student's representation
    teacher = read_checkpoint(opts["teacher"])
    spec = detect(prepare_for_model(teacher).tensors, teacher.manifest)
    train = text_tokens(opts["text"], spec.vocab, "calib", opts["tokenizer"], None, opts["encoding"])
    ev = None
    if not opts["no_validate"]:
        ev = text_tokens(opts["eval_text"], spec.vocab, "heldout", opts["tokenizer"], opts["eval_tokens"],
                         opts["encoding"])
    progress = opts["progress"] if opts["progress"] is not None else sys.stderr.isatty()
    out, rep = heal(student, teacher, train, cfg, eval_tokens=ev, progress=progress)

    validation = None
    if ev is not None:
        from ..model import build_model
        drift = logits_drift(build_model(out), build_model(teacher), ev)
        validation = {"ppl_before": rep["ppl_before"], "ppl_after": rep["ppl_after"],
                      "ppl_increase_pct": 100.0 * (rep["ppl_after"] / rep["ppl_before"] - 1.0),
                      "ppl_teacher": rep["ppl_teacher"],
                      "ppl_vs_teacher_pct": 100.0 * (rep["ppl_after"] / rep["ppl_teacher"] - 1.0),
                      "kl_before": rep["kl_before"], "kl_after": rep["kl_after"], "recovered": rep["recovered"],
                      "eval_tokens": rep["eval_tokens"], "backend": rep["backend"], "logits_drift": drift,
                      "drift_against": "teacher", "params_before": student.num_params(),
                      "params_after": out.num_params(), "bytes_before": checkpoint_bytes(student),
                      "bytes_after": checkpoint_bytes(out)}
        gates = [] if opts["max_ppl_increase"] is None else [Gate("ppl_vs_teacher_pct", max=opts["max_ppl_increase"])]
        apply_gates(validation, gates)
    passed = validation is None or validation.get("passed", True)

    def describe(_staged):
        report, lines = _heal_report(src, dst, opts, passed, cfg, train, rep, validation)
        return {**report, "version": spec.version}, lines

    publish(dst, passed, lambda path, fmt: write_checkpoint(out, path, fmt), describe, f"heal {src} -> {dst}", opts)


def _heal_report(src, dst, opts, passed, cfg, train, rep, validation):
    report = {"command": "heal", "src": src, "dst": dst, "teacher": opts["teacher"], "written": passed,
              "text": opts["text"] or "(packaged calib.txt)", "train_text_tokens": len(train),
              "config": cfg.to_dict(), **{k: v for k, v in rep.items() if k not in ("curve",)},
              "curve": rep["curve"], "validation": validation}
    lines = [f"trained {rep['trained_params']:,} parameters in {rep['trained_tensors']} tensors ({cfg.to_dict()['train']}) "
             f"on {rep['tokens_trained']:,} tokens: {rep['steps']} steps, {rep['seconds']:.1f} s "
             f"({rep['tokens_per_s']:.0f} tokens/s on {rep['device']})",
             f"loss (KL{' + LM' if cfg.lm_weight else ''}) {rep['loss_first']:.4f} -> {rep['loss_last']:.4f}"]
    if validation is not None:
        rec = rep["recovered"]
        lines.append(f"held-out KL to the teacher {rep['kl_before']:.4f} -> {rep['kl_after']:.4f}; teacher ppl "
                     f"{rep['ppl_teacher']:.4f}, healed {validation['ppl_vs_teacher_pct']:+.2f}% from it"
                     + (f"; recovered {100 * rec:.1f}% of the lost log-perplexity" if rec is not None else ""))
        if rep["kl_after"] > rep["kl_before"]:
            lines.append("warning: healing raised the held-out KL to the teacher; try a lower --lr or more --tokens")
    lines.append(f"{'wrote ' + dst if passed else 'NOT written (gate failed): ' + dst}")
    return report, lines

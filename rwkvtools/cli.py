"""The ``rwkvtools`` command: a thin Click layer over the library. Heavy modules are imported
inside the commands; user errors become one clear message and exit code 2 (gates: exit 1)."""
from __future__ import annotations

import errno
import functools
import os
import sys
import traceback

import click

from . import __version__


class UserError(click.ClickException):
    exit_code = 2

    def show(self, file=None):
        click.echo(f"error: {self.format_message()}", err=True)


class InternalError(UserError):
    """An unexpected exception: a bug in rwkvtools (or a library below it), not the user's input.
    Exit code 3, so that a CI job can tell it from bad input (2) and a failed gate (1)."""
    exit_code = 3


class Stopped(click.ClickException):
    """The run was stopped by a signal (Ctrl-C: SIGINT; SIGTERM, SIGHUP: rwkvtools.entry); exit
    code 128 + the signal's number, as a shell reports it (Ctrl-C: 130, not the 1 of a failed
    gate). Outputs not finished were removed on the way out."""

    def __init__(self, signum: int):
        import signal
        self.signum = int(signum)
        name = signal.Signals(self.signum).name
        super().__init__("Aborted!" if self.signum == signal.SIGINT else
                         f"stopped by {name} (an output not finished was removed)")
        self.exit_code = 128 + self.signum

    def show(self, file=None):
        msg = self.format_message()
        click.echo(msg if msg == "Aborted!" else f"error: {msg}", err=True)


class GateFailed(click.ClickException):
    exit_code = 1

    def show(self, file=None):
        click.echo(self.format_message(), err=True)


def handle_errors(fn):
    """Turn library errors into clean messages; unexpected errors into a short internal-error
    note (the traceback only with RWKVTOOLS_DEBUG=1)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .errors import GateError, RwkvToolsError, Terminated
        try:
            return fn(*args, **kwargs)
        except click.ClickException:
            raise
        except GateError as e:
            raise GateFailed(str(e)) from None
        except RwkvToolsError as e:
            raise UserError(str(e)) from None
        except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM / SIGHUP (Terminated): outputs already removed
            import signal
            raise Stopped(e.signum if isinstance(e, Terminated) else signal.SIGINT) from None
        except MemoryError:
            raise UserError("out of memory; try a smaller --chunk-len or a machine with more memory") from None
        except BrokenPipeError:  # stdout's reader went away (`| head`): stop quietly, as a shell tool does
            _drop_stdout()
            raise click.exceptions.Exit(128 + 13) from None   # 141: the shell's code for SIGPIPE
        except OSError as e:
            if e.errno not in _RESOURCE_ERRNOS and not _short_write(e):
                raise_internal(e)
            where = f" ({e.filename})" if e.filename else ""
            raise UserError(f"cannot write{where}: {e.strerror or e} (free disk space, or raise the file-size "
                            "limit); an output not finished was removed") from None
        except RuntimeError as e:
            if _writer_ran_out(e):
                raise UserError("cannot write the output: the file system refused more data (disk full or a "
                                "file-size limit); an output not finished was removed") from None
            raise_internal(e)
        except Exception as e:
            raise_internal(e)
    return wrapper


def _drop_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's last flush raises nothing."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout without a file descriptor (tests)
        pass


def raise_internal(e: Exception):
    if os.environ.get("RWKVTOOLS_DEBUG") == "1":
        traceback.print_exception(e)
    raise InternalError(f"internal error ({type(e).__name__}: {e}); please report it "
                    "(set RWKVTOOLS_DEBUG=1 for the traceback)") from None


_RESOURCE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS}


def _short_write(e: OSError) -> bool:
    """A writer that checks how much was written (gguf-py: 'N requested and M written') when the
    file system took less (disk full, file-size limit) raises an OSError without an errno."""
    return e.errno is None and "requested and" in str(e) and "written" in str(e)


def _writer_ran_out(e: RuntimeError) -> bool:
    """torch.save's zip writer reports a failed write (ENOSPC, EFBIG) as a RuntimeError of its own."""
    m = str(e)
    return "PytorchStreamWriter" in m or ("inline_container" in m and "unexpected pos" in m)


class FiniteFloat(click.ParamType):
    """A float option that must be a finite number (NaN compares false with everything, so a NaN
    gate bound would pass every model; inf is no bound or no rate)."""
    name = "float"

    def convert(self, value, param, ctx):
        import math
        try:
            v = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(v):
            self.fail(f"{value!r}: must be a finite number", param, ctx)
        return v


FINITE_FLOAT = FiniteFloat()


class Seed(click.ParamType):
    """A random seed torch accepts: an integer from -2**63 to 2**64 - 1 (beyond, manual_seed
    raised 'Overflow when unpacking long long')."""
    name = "integer"

    def convert(self, value, param, ctx):
        try:
            v = int(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a valid integer", param, ctx)
        if not -2**63 <= v < 2**64:
            self.fail(f"{value}: a seed must lie between -2**63 and 2**64 - 1", param, ctx)
        return v


SEED = Seed()


def emit_json(obj) -> None:
    from .io.atomic import json_text
    click.echo(json_text(obj))


def _dtype(name: str):
    import torch
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def _one_line(e: click.UsageError) -> UserError:
    """Click's usage error (a missing or bad option, an unknown command) as the one `error:` line
    every other user error is, with where to look (Click printed three lines: usage, hint, error)."""
    sub = (e.ctx.command_path.split(" ", 1)[1:] if e.ctx is not None else [])   # the program is rwkvtools
    where = " ".join(["rwkvtools", *sub])
    return UserError(f"{e.format_message()} (see '{where} --help')")


class RwkvGroup(click.Group):
    """The command group: usage errors of the group and of every command below it in one line."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as e:
            raise _one_line(e) from None

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as e:
            raise _one_line(e) from None


@click.group(cls=RwkvGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="rwkvtools")
@click.option("-v", "--verbose", is_flag=True, help="Log which backends and kernels are used.")
def main(verbose):
    """Convert, compress and validate RWKV language models (v4, v5, v6, v7).

    \b
    Examples:
      rwkvtools inspect model.pth
      rwkvtools eval model.pth --text wiki.txt --max-tokens 8192
      rwkvtools init tiny.safetensors --version 7 --layers 2 --dim 64 --vocab 256
    """
    if verbose:
        import logging
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)


# ------------------------------------------------------------------------------------ inspect
@main.command()
@click.argument("model", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def inspect(model, as_json):
    """Show a checkpoint's version, hyper-parameters, parameter counts and history; for an ONNX
    file exported by rwkvtools, its interface (mode, dtype, opset, inputs, outputs) and history.

    \b
    Examples:
      rwkvtools inspect ../shared/fixtures/tiny-rwkv-7v0-834K.pth --json
      rwkvtools export-onnx ../shared/fixtures/tiny-rwkv-7v0-834K.pth /tmp/tiny7-step.onnx --force
      rwkvtools inspect /tmp/tiny7-step.onnx
    """
    handle_errors(_inspect)(model, as_json)


def _inspect(model, as_json):
    from .inspect import describe, describe_onnx, format_description, format_onnx_description
    from .io import is_onnx_file, read_checkpoint
    if is_onnx_file(model):  # an exported model: its metadata
        info = describe_onnx(model)
        text = format_onnx_description
    else:
        info = describe(read_checkpoint(model))
        text = format_description
    if as_json:
        emit_json(info)
    else:
        click.echo(text(info))


def _device(ctx, param, value):
    """eval's --device: checked while parsing, auto resolved to the device it means."""
    from .commands.common import _device_option, check_device
    return check_device(_device_option(ctx, param, value))


def _encoding(ctx, param, value):
    from .commands.common import encoding_option
    return encoding_option(ctx, param, value)


# --------------------------------------------------------------------------------------- eval
@main.command(name="eval")
@click.argument("model", type=click.Path())
@click.option("--text", required=True, type=click.Path(), help="Text file (UTF-8) to score.")
@click.option("--tokenizer", type=click.Choice(["auto", "bytes", "world", "neox"]), default="auto", show_default=True,
              help="auto picks by vocab size: 256 bytes, 65536 World, 50277/50304 GPT-NeoX.")
@click.option("--tokenizer-file", type=click.Path(), default=None, help="20B_tokenizer.json for --tokenizer neox.")
@click.option("--encoding", default="utf-8", show_default=True, callback=_encoding,
              help="Byte encoding for the bytes tokenizer (utf-16le for the v6 fixture).")
@click.option("--max-tokens", type=int, default=None, help="Score only the first N tokens (N-1 predictions).")
@click.option("--chunk-len", type=int, default=1024, show_default=True, help="Tokens per forward call.")
@click.option("--device", default="cpu", show_default=True, metavar="auto|cpu|cuda[:N]",
              callback=_device, help="Where the model runs (auto = CUDA when there is one).")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default=None,
              help="Compute dtype (default: fp32; an .onnx file runs in the dtype it was exported in, and "
                   "another --dtype is refused).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr (default: on long texts in a terminal).")
def eval_cmd(model, text, tokenizer, tokenizer_file, encoding, max_tokens, chunk_len, device, dtype, as_json, progress):
    """Perplexity of MODEL on a text, the state carried across the whole text.

    MODEL is any checkpoint rwkvtools reads, or an .onnx file exported by rwkvtools.

    \b
    Examples:
      rwkvtools eval ../shared/fixtures/tiny-rwkv-7v0-834K.pth \\
          --text ../shared/data/wikitext-2-test.txt --max-tokens 8192
      rwkvtools eval model.pth --text wiki.txt --json
    """
    handle_errors(_eval)(model, text, tokenizer, tokenizer_file, encoding, max_tokens, chunk_len, device, dtype,
                         as_json, progress)


def check_eval_options(model, opts, given=frozenset()):
    """eval's options, checked before any file is read (`recipe check` runs it on eval steps)."""
    if opts["max_tokens"] is not None and opts["max_tokens"] < 2:
        raise UserError("--max-tokens must be at least 2")
    if opts["chunk_len"] < 1:
        raise UserError("--chunk-len must be positive")


def _eval(model, text, tokenizer, tokenizer_file, encoding, max_tokens, chunk_len, device, dtype, as_json, progress):
    from .evaluate import evaluate_file
    check_eval_options(model, {"max_tokens": max_tokens, "chunk_len": chunk_len})
    res = evaluate_file(model, text, tokenizer=tokenizer, tokenizer_file=tokenizer_file, encoding=encoding,
                        max_tokens=max_tokens, chunk_len=chunk_len, device=device,
                        dtype=_dtype(dtype) if dtype else None,
                        progress=progress)
    if as_json:
        emit_json(res)
    else:
        click.echo(f"model        {model}")
        click.echo(f"text         {text} ({res['tokenizer']} tokens)")
        click.echo(f"ppl          {res['ppl']:.6f}")
        click.echo(f"nll/token    {res['nll_per_token']:.6f}")
        click.echo(f"tokens       {res['tokens']} ({res['predictions']} predictions)")
        click.echo(f"tokens/s     {res['tokens_per_s']:.1f}")
        click.echo(f"backend      {res['backend']} on {res['device']}")
    import math
    from .errors import GateError
    ppl = res.get("ppl")
    if not (isinstance(ppl, float) and math.isfinite(ppl)):  # a number that measures nothing: not a success
        raise GateError(f"error: the perplexity is {'nan' if ppl is None or ppl != ppl else ppl}: the model's outputs are "
                        "not finite (a NaN/Inf weight, or activations that overflow the compute dtype)")


# --------------------------------------------------------------------------------------- init
@main.command()
@click.argument("out", type=click.Path())
@click.option("--version", "version", required=True, type=click.Choice(["4", "5.0", "5.1", "5.2", "6", "7"]),
              help="RWKV version (5.0 = no gate, per-head decay; 5.2 = gate, per-channel decay).")
@click.option("--layers", type=int, required=True)
@click.option("--dim", type=int, required=True, help="n_embd.")
@click.option("--vocab", type=int, required=True)
@click.option("--head-size", type=int, default=64, show_default=True)
@click.option("--ffn-dim", type=int, default=None, help="Default: 4*dim (v4, v7), 3.5*dim rounded to 32 (v5, v6).")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--init", "init_kind", type=click.Choice(["random", "trainer"]), default="random", show_default=True,
              help="trainer: the official trainers' scheme (zero matrices included); random: same scales, no zeros.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True)
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
def init(out, version, layers, dim, vocab, head_size, ffn_dim, seed, init_kind, dtype, force):
    """Write a random checkpoint of the given version and shape (real key names and shapes).

    The format follows OUT's name, as for convert: .pth/.pt (BlinkDL), .safetensors, .bin
    (rwkv.cpp), .gguf (llama.cpp; v6 and v7), or a folder without extension (Hugging Face).

    \b
    Examples:
      rwkvtools init tiny7.safetensors --version 7 --layers 2 --dim 64 --vocab 256 --head-size 16
      rwkvtools init rwkv7-0.1b.pth --version 7 --layers 12 --dim 768 --vocab 65536
    """
    handle_errors(_init)(out, version, layers, dim, vocab, head_size, ffn_dim, seed, init_kind, dtype, force)


def _init(out, version, layers, dim, vocab, head_size, ffn_dim, seed, init_kind, dtype, force):
    from .commands.common import output_guard
    from .io.writers import write_checkpoint
    from .random_init import random_checkpoint
    output_guard(None, out, force)
    from .io.writers import format_from_path
    fmt = format_from_path(out)
    if fmt == "rwkvcpp" and dtype == "bf16":  # as convert: not silently written FP32
        raise UserError("rwkv.cpp files have no bf16 type; use --dtype fp32 or fp16")
    ck = random_checkpoint(version, layers, dim, vocab, head_size, ffn_dim, seed, init_kind, _dtype(dtype))
    opts = {"data_type": "FP16"} if fmt == "rwkvcpp" and dtype == "fp16" else {}
    fmt = write_checkpoint(ck, out, **opts)
    n = ck.num_params()
    click.echo(f"wrote {out} ({fmt}): RWKV v{version}, {layers} layers, dim {dim}, vocab {vocab}, {n:,} parameters")


def _register_more():
    """Commands of later modules register themselves here (kept in their own files)."""
    import importlib
    for mod in ("convert_cli", "lowrank_cli", "onnx_cli", "quantize_cli", "recursive_cli", "recipe_cli"):
        try:
            importlib.import_module(f".commands.{mod}", __package__)
        except ModuleNotFoundError as e:
            if e.name and e.name.endswith(mod):
                continue
            raise
    from .commands.common import OPTION_CHECKS
    OPTION_CHECKS["eval"] = check_eval_options


_register_more()

if __name__ == "__main__":  # pragma: no cover
    # `python -m rwkvtools.cli`: the command modules register on the importable rwkvtools.cli,
    # not on this __main__ copy of it
    from rwkvtools.cli import main as _main
    _main()

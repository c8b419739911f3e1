"""Recipes: compression pipelines written as YAML, run through the very same commands as the CLI.

A recipe names a source model, an evaluation text, an ordered list of steps (each a CLI command
with the same option names) and gates. ``run`` executes every step by invoking the Click command
itself (no second code path), measures every stage on the same held-out text with the same
function as ``rwkvtools eval``, checks the gates, and writes ``report.json``, ``report.md`` and
``plot.png``. Stages whose output exists for the same inputs and options are not recomputed.

Schema (see recipes/*.yaml)::

    name: lowrank-0.32-heal
    description: free text
    model: ${RWKVTOOLS_SHARED:-../shared}/fixtures/tiny-rwkv-5v2-730K-FP32.bin   # --model overrides
    eval: {text: PATH, tokens: 4096, tokenizer: auto, encoding: utf-8}
    gates: {max_ppl_increase: 5.0, min_size_reduction: 0.3}            # final stage vs source
    steps:
      - lowrank: {rank: 0.32, method: whiten}
        gates: {max_ppl_increase: 10}                                  # this stage vs its input
      - quantize: {scheme: int4}
        sweep: {group-size: [32, 64]}                                  # optional: one option, a list
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import math
import os
import re
import time
from dataclasses import dataclass, field

import yaml

from .errors import RwkvToolsError

# step kind -> (CLI command, output extension or None, metrics it provides beyond ppl/size)
STEP_KINDS = {
    "convert": ("convert", None, ("logit_drift",)),
    "lowrank": ("lowrank", ".safetensors", ("logit_drift",)),
    "recursive": ("recursive", ".safetensors", ("logit_drift",)),
    "heal": ("heal", ".safetensors", ("logit_drift",)),
    "quantize": ("quantize", None, ("logit_drift",)),
    "export-onnx": ("export-onnx", ".onnx", ()),
    "eval": ("eval", None, ()),
}
# gate name -> (metric, bound kind)
GATES = {"max_ppl_increase": ("ppl_increase_pct", "max"),
         "max_logit_drift": ("logit_drift", "max"),
         "min_size_reduction": ("size_reduction", "min")}
TOP_KEYS = {"name", "description", "model", "eval", "gates", "steps"}
EVAL_KEYS = {"text": str, "tokens": int, "tokenizer": str, "encoding": str}
STEP_KEYS = {"gates", "sweep"}
RESERVED = {"json", "report", "force", "help", "as_json"}


class RecipeError(RwkvToolsError):
    pass


MAX_RECIPE_BYTES = 4 << 20        # a recipe is a page of YAML; a larger file is refused unread
MAX_RECIPE_VALUES = 100_000       # values after YAML aliases are expanded (an alias bomb is refused)

_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"


class _Loader(yaml.SafeLoader):
    """YAML as PyYAML's safe loader reads it, but with YAML 1.2's numbers (the core schema):
    `1e-3` and `5E+2` are floats (YAML 1.1, PyYAML's default, wants a dot and read them as text,
    so a gate or an option written that way was refused); `010000` is ten thousand, not the octal
    4096, and `1:08:16` (a base-60 number in YAML 1.1) or `0b1000` are text, as in YAML 1.2
    (digit-group underscores, `1_024`, are kept from YAML 1.1: they mean nothing else). A
    key given twice in one mapping is refused (YAML 1.1 loaders kept the last one silently)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = {}
            for key_node, _ in node.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                    k = (key_node.tag, key_node.value)
                    if k in seen:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"the key '{key_node.value}' is given twice in one mapping (lines "
                            f"{seen[k] + 1} and {key_node.start_mark.line + 1})", key_node.start_mark)
                    seen[k] = key_node.start_mark.line
        return super().construct_mapping(node, deep)

    def construct_yaml_int(self, node):
        text = self.construct_scalar(node).replace("_", "")
        sign = -1 if text.startswith("-") else 1
        body = text.lstrip("+-")
        if body.startswith("0o"):
            return sign * int(body[2:], 8)
        if body.startswith("0x"):
            return sign * int(body[2:], 16)
        return sign * int(body, 10)


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in rs if tag not in (_INT, _FLOAT)]
    for first, rs in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(_INT, re.compile(r"^(?:[-+]?[0-9][0-9_]*|0o[0-7_]+|0x[0-9a-fA-F_]+)$"),
                              list("-+0123456789"))
_Loader.add_implicit_resolver(
    _FLOAT, re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
                       r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))
_Loader.add_constructor(_INT, _Loader.construct_yaml_int)


def _count_values(obj, limit: int) -> None:
    """Walk what YAML built (aliases are shared references, so a few lines can stand for billions
    of values) and stop at ``limit`` values: ValueError."""
    stack, n = [obj], 0
    while stack:
        o = stack.pop()
        n += 1
        if n > limit:
            raise ValueError(f"it expands to more than {limit:,} values (YAML aliases)")
        if isinstance(o, dict):
            stack.extend(o.keys())
            stack.extend(o.values())
        elif isinstance(o, list):
            stack.extend(o)


@dataclass
class Step:
    index: int
    kind: str
    options: dict
    gates: dict = field(default_factory=dict)
    sweep: tuple[str, list] | None = None


@dataclass
class Recipe:
    path: str
    name: str
    description: str
    model: str | None
    eval: dict
    gates: dict
    steps: list[Step]
    raw: dict
    model_unset: str = ""   # why 'model' has no value (an unset ${VAR}): refused only if --model is not given

    def source(self, model: str | None = None) -> str | None:
        """The source model: --model, else the recipe's (refused here if its ${VAR} is unset)."""
        if model:
            return model
        if self.model_unset:
            raise RecipeError(f"{self.path}: model {self.model_unset}; or pass --model")
        return self.model


# ------------------------------------------------------------------------------------ parsing
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand(value: str, base_dir: str) -> str:
    """${VAR} / ${VAR:-default} from the environment; a relative path is relative to the recipe
    file, except one that starts with a variable set in the environment (a value from the
    user's shell, relative to where the command runs). A ${VAR} that is not set and has no
    default is refused (it silently became '', e.g. no evaluation text: the packaged one)."""
    def sub(m):
        v = os.environ.get(m.group(1))
        if v is None and m.group(2) is None:
            raise RecipeError(f"'{value}': the environment variable {m.group(1)} is not set (write "
                              f"${{{m.group(1)}:-default}} to give a default)")
        return v if v is not None else m.group(2)
    out = _VAR.sub(sub, value)
    first = _VAR.match(value)
    from_shell = first is not None and os.environ.get(first.group(1)) is not None
    if out and not os.path.isabs(out) and not from_shell:
        return os.path.normpath(os.path.join(base_dir, out))
    return out


def _command(kind: str):
    from .cli import main
    name = STEP_KINDS[kind][0]
    cmd = main.commands.get(name)
    if cmd is None:
        raise RecipeError(f"step '{kind}': the command '{name}' is not available in this installation")
    return cmd


def _param_for(cmd, opt: str):
    key = opt.replace("-", "_")
    for p in cmd.params:
        if p.name == key or any(o.lstrip("-") == opt for o in getattr(p, "opts", [])):
            return p
    return None


def _is_path_option(cmd, opt: str) -> bool:
    import click
    return isinstance(getattr(_param_for(cmd, opt), "type", None), click.Path)


def _expand_path_option(cmd, opt: str, value, base_dir: str):
    """Path-valued step options (e.g. quantize's calib) get what the model and eval text get:
    ${VAR} / ${VAR:-default} expansion and paths relative to the recipe file."""
    if isinstance(value, str) and _is_path_option(cmd, opt):
        return expand(value, base_dir)
    return value


def _option_names(cmd) -> list[str]:
    import click
    return sorted([o.lstrip("-") for p in cmd.params if isinstance(p, click.Option) and p.name not in RESERVED
                   for o in p.opts[:1]] + (["output"] if cmd.name in OUTPUT_KINDS else []))


# the recipe's own step option: the format of the stage's file, for the commands that take it from
# DST's name (the run names DST); convert takes its own 'format' option instead
OUTPUT_EXT = {"safetensors": ".safetensors", "pth": ".pth", "rwkvcpp": ".bin", "gguf": ".gguf", "hf": ""}
OUTPUT_KINDS = ("lowrank", "recursive", "heal", "quantize")


def _check_value(where: str, cmd, opt: str, value):
    import click
    if opt == "output" and cmd.name in OUTPUT_KINDS:
        if not isinstance(value, str) or value not in OUTPUT_EXT:
            raise RecipeError(f"{where}: option 'output' (the stage file's format) is one of "
                              f"{', '.join(OUTPUT_EXT)}, not {value!r}")
        return
    p = _param_for(cmd, opt)
    if p is None or not isinstance(p, click.Option) or p.name in RESERVED:
        raise RecipeError(f"{where}: unknown option '{opt}' for '{cmd.name}'; allowed: {', '.join(_option_names(cmd))}")
    if p.is_flag:
        if not isinstance(value, bool):
            raise RecipeError(f"{where}: option '{opt}' is a flag: use true or false, not {value!r}")
        return
    values = value if (p.multiple and isinstance(value, list)) else [value]
    for v in values:
        if isinstance(v, (dict, list)):
            raise RecipeError(f"{where}: option '{opt}' takes a single value, not {type(v).__name__}")
        if v is None or isinstance(v, bool):
            raise RecipeError(f"{where}: option '{opt}' needs a value, not {'null' if v is None else str(v).lower()}")
        try:  # as the command line will receive it (the step runs with str(value))
            p.type.convert(str(v), p, None)
        except click.BadParameter as e:
            raise RecipeError(f"{where}: option '{opt}' = {v!r}: {e.format_message()}") from None


def _names(where: str, mapping: dict, what: str) -> None:
    """Keys YAML read as something other than text (1:, true:, null:) name nothing."""
    for k in mapping:
        if not isinstance(k, str):
            raise RecipeError(f"{where}: {what} {k!r} is not a name; write it as text")


def _one_spelling(where: str, opts: dict, sweep: str | None = None) -> None:
    """An option given twice (`calib-tokens` and `calib_tokens`; or set on the step and swept):
    both were passed to the command, or the sweep silently overrode the step's value."""
    seen = {}
    for k in opts:
        norm = str(k).replace("_", "-")
        if norm in seen:
            raise RecipeError(f"{where}: option '{norm}' is given twice ('{seen[norm]}' and '{k}')")
        seen[norm] = k
    if sweep is not None and str(sweep).replace("_", "-") in seen:
        raise RecipeError(f"{where}: option '{sweep}' is both set on the step and swept; keep one")


def _check_gates(where: str, gates, provided: set[str], scope: str = "this step") -> dict:
    if gates is None:
        return {}
    if not isinstance(gates, dict):
        raise RecipeError(f"{where}: gates must be a mapping of gate name to number")
    for g, v in gates.items():
        if g not in GATES:
            raise RecipeError(f"{where}: unknown gate '{g}'; known: {', '.join(GATES)}")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise RecipeError(f"{where}: gate '{g}' needs a finite number, got {v!r}")
        metric = GATES[g][0]
        if metric not in provided:
            raise RecipeError(f"{where}: gate '{g}' needs the metric '{metric}', which {scope} does not measure "
                              f"(it measures: {', '.join(sorted(provided))})")
    return dict(gates)


def _check_eval(path: str, ev: dict) -> None:
    """The values the stages are measured with, checked as `rwkvtools eval` checks its options
    (a run found them only after measuring the source, or scored the whole text for tokens 0)."""
    from .tokenizer import TOKENIZERS, check_encoding
    if "tokens" in ev and ev["tokens"] < 2:
        raise RecipeError(f"{path}: eval: 'tokens' must be at least 2 (perplexity needs a prediction), got {ev['tokens']}")
    if "tokenizer" in ev and ev["tokenizer"] not in TOKENIZERS:
        raise RecipeError(f"{path}: eval: unknown tokenizer '{ev['tokenizer']}'; known: {', '.join(TOKENIZERS)}")
    if "encoding" in ev:
        try:
            check_encoding(ev["encoding"])
        except RwkvToolsError as e:
            raise RecipeError(f"{path}: eval: 'encoding' {str(e).split(': ', 1)[-1]}") from None


def load_recipe(path: str) -> Recipe:
    """Parse and validate a recipe file; every error names the step, the option and what is allowed."""
    try:
        return _load_recipe(path)
    except RecipeError as e:  # every message starts with the recipe's path
        if str(e).startswith(str(path)):
            raise
        raise RecipeError(f"{path}: {e}") from None


def _load_recipe(path: str) -> Recipe:
    try:
        if os.path.isfile(path) and os.path.getsize(path) > MAX_RECIPE_BYTES:
            raise RecipeError(f"{path}: {os.path.getsize(path):,} bytes is not a recipe (a recipe is a page of "
                              f"YAML; at most {MAX_RECIPE_BYTES:,} bytes are read)")
        with open(path, encoding="utf-8") as f:
            raw = yaml.load(f, Loader=_Loader)  # noqa: S506 (a SafeLoader)
        _count_values(raw, MAX_RECIPE_VALUES)
    except FileNotFoundError:
        raise RecipeError(f"{path}: no such recipe file") from None
    except IsADirectoryError:
        raise RecipeError(f"{path}: is a folder; give a recipe file (YAML)") from None
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path}: not a recipe: a recipe is UTF-8 YAML text ({e})") from None
    except OSError as e:
        raise RecipeError(f"{path}: cannot read ({e.strerror or e})") from None
    except yaml.YAMLError as e:  # PyYAML's message spans lines (marks, snippets): one line here
        raise RecipeError(f"{path}: not valid YAML ({' '.join(str(e).split())[:400]})") from None
    except RecursionError:
        raise RecipeError(f"{path}: not a recipe: its YAML is nested too deeply") from None
    except ValueError as e:  # a number of thousands of digits; an alias bomb (_count_values)
        raise RecipeError(f"{path}: not a recipe: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a mapping with keys {', '.join(sorted(TOP_KEYS))}")
    _names(path, raw, "top-level key")
    extra = set(raw) - TOP_KEYS
    if extra:
        raise RecipeError(f"{path}: unknown top-level key(s) {', '.join(sorted(extra))}; allowed: {', '.join(sorted(TOP_KEYS))}")
    base = os.path.dirname(os.path.abspath(path))
    ev = raw.get("eval") or {}
    if not isinstance(ev, dict):
        raise RecipeError(f"{path}: 'eval' must be a mapping with keys {', '.join(EVAL_KEYS)}")
    for k, v in ev.items():
        if k not in EVAL_KEYS:
            raise RecipeError(f"{path}: eval: unknown key '{k}'; allowed: {', '.join(EVAL_KEYS)}")
        if not isinstance(v, EVAL_KEYS[k]) or isinstance(v, bool):
            raise RecipeError(f"{path}: eval: '{k}' must be {EVAL_KEYS[k].__name__}, got {v!r}")
    _check_eval(path, ev)
    ev = dict(ev)
    if "text" in ev:
        ev["text"] = expand(ev["text"], base)
    steps_raw = raw.get("steps")
    if not isinstance(steps_raw, list) or not steps_raw:
        raise RecipeError(f"{path}: 'steps' must be a non-empty list")
    steps = []
    for i, s in enumerate(steps_raw, 1):
        where = f"{path}: step {i}"
        if not isinstance(s, dict):
            raise RecipeError(f"{where}: a step is a mapping like '- lowrank: {{rank: 0.32}}'")
        kinds = [k for k in s if k not in STEP_KEYS]
        if len(kinds) != 1:
            raise RecipeError(f"{where}: exactly one step kind expected (one of {', '.join(STEP_KINDS)}), found {kinds or 'none'}")
        kind = kinds[0]
        if kind not in STEP_KINDS:
            raise RecipeError(f"{where}: unknown step '{kind}'; known: {', '.join(STEP_KINDS)}")
        where = f"{path}: step {i} ({kind})"
        opts = s[kind] or {}
        if not isinstance(opts, dict):
            raise RecipeError(f"{where}: options must be a mapping of option name to value")
        cmd = _command(kind)
        _names(where, opts, "option")
        _one_spelling(where, opts)
        opts = dict(opts)
        for k, v in opts.items():
            _check_value(where, cmd, k, v)
            opts[k] = _expand_path_option(cmd, k, v, base)
        sweep = None
        if s.get("sweep") is not None:
            sw = s["sweep"]
            if not isinstance(sw, dict) or len(sw) != 1:
                raise RecipeError(f"{where}: sweep must name one option with a list of values, e.g. sweep: {{rank: [0.9, 0.5]}}")
            (sk, sv), = sw.items()
            _names(where + " sweep", sw, "option")
            if not isinstance(sv, list) or not sv:
                raise RecipeError(f"{where}: sweep '{sk}' needs a non-empty list of values")
            _one_spelling(where, opts, sweep=sk)
            for v in sv:
                _check_value(where + " sweep", cmd, sk, v)
            sweep = (sk, [_expand_path_option(cmd, sk, v, base) for v in sv])
        for v in (sweep[1] if sweep else [None]):
            _check_step(where if sweep is None else f"{where} sweep {sweep[0]}={v}", cmd, kind,
                        opts if sweep is None else {**opts, sweep[0]: v}, ev)
        provided = {"ppl_increase_pct", "size_reduction", *STEP_KINDS[kind][2]}
        if _option(opts, "no-validate") is True:  # the command's check, which measures the drift, is off
            provided.discard("logit_drift")
        gates = _check_gates(where, s.get("gates"), provided)
        steps.append(Step(i, kind, dict(opts), gates, sweep))
    overall = _check_gates(f"{path}: gates", raw.get("gates"), {"ppl_increase_pct", "size_reduction"},
                           "the recipe's overall result (the final file against the source)")
    model = raw.get("model")
    if model is not None and not isinstance(model, str):
        raise RecipeError(f"{path}: 'model' must be a path")
    for key in ("name", "description"):  # any scalar YAML reads (a date, yes/no) is text here; not a list or mapping
        if isinstance(raw.get(key), (list, dict)):
            raise RecipeError(f"{path}: '{key}' must be text, got {type(raw[key]).__name__}")
    unset = ""
    try:
        model = expand(model, base) if model else None
    except RecipeError as e:  # only an error when the run has no --model
        model, unset = None, str(e)
    return Recipe(path, str(raw.get("name") or os.path.splitext(os.path.basename(path))[0]),
                  str(raw.get("description") or ""), model, ev, overall, steps, raw, unset)


def input_files(recipe: Recipe, model: str | None = None) -> list[tuple[str, str]]:
    """(label, path) of every file a run reads: the source model (``model`` or the recipe's),
    the evaluation text and every path-valued step option (calib, text, teacher, eval-text,
    tokenizer-file), sweep values included."""
    out = []
    src = model or recipe.model
    if src:
        out.append(("source model", src))
    if recipe.eval.get("text"):
        out.append(("eval text", recipe.eval["text"]))
    for step in recipe.steps:
        cmd = _command(step.kind)
        named = list(step.options.items())
        if step.sweep:
            named += [(step.sweep[0], v) for v in step.sweep[1]]
        out += [(f"step {step.index} ({step.kind}) {k}", v) for k, v in named
                if isinstance(v, str) and _is_path_option(cmd, k)]
    return out


def check_inputs(recipe: Recipe, model: str | None = None) -> None:
    """The files a run reads (input_files) are there before it starts; one error lists every
    missing file. Then each step can read what the step before it writes (check_chain)."""
    src = recipe.source(model)
    missing = [f"{label} {p}" for label, p in input_files(recipe, src) if not os.path.exists(p)]
    if missing:
        raise RecipeError(f"{recipe.path}: not found: {'; '.join(missing)}")
    _check_eval_text(recipe, src)
    check_chain(recipe, src)


def _check_eval_text(recipe: Recipe, src: str | None) -> None:
    """The recipe's evaluation text scores the source model (read as every stage will be: the
    recipe's tokenizer, encoding and budget): a folder, an empty or binary text, a tokenizer that
    cannot be used or one whose ids the model does not have were found only when the run began."""
    from .io import is_onnx_file, read_checkpoint
    from .spec import detect
    from .transforms import prepare_for_model
    from .validate import text_tokens
    ev = recipe.eval
    if not src or is_onnx_file(src):
        return
    where = f"{recipe.path}: eval text {ev.get('text') or '(packaged held-out text)'}"
    try:
        vocab = detect(prepare_for_model(read_checkpoint(src)).tensors).vocab
        ids = text_tokens(ev.get("text"), vocab, "heldout", ev.get("tokenizer", "auto"), ev.get("tokens", 4096),
                          ev.get("encoding", "utf-8"))
    except RwkvToolsError as e:
        raise RecipeError(f"{where}: {e}") from None
    if len(ids) < 2:
        raise RecipeError(f"{where}: {len(ids)} token(s); perplexity needs at least 2")
    if max(ids) >= vocab:
        raise RecipeError(f"{where}: the {ev.get('tokenizer', 'auto')} tokenizer gives ids up to {max(ids)}, "
                          f"the model's vocabulary has {vocab}")


# ---------------------------------------------------------------------------- chaining steps
# What a stage's model is, as far as the next step's command cares: 'onnx' (an exported graph,
# read by eval only), 'quantized' (int8/int4 linears in .safetensors/.pth), 'lowrank' (factored
# linears), 'recursive' (layers sharing blocks). A GGUF or rwkv.cpp file reads back dense.
def _forms_of_file(path: str) -> set[str]:
    from .checkpoint import stored_forms
    from .io import is_onnx_file, read_checkpoint
    if is_onnx_file(path):
        return {"onnx"}
    return stored_forms(read_checkpoint(path).tensors)


def _option(opts: dict, name: str, default=None):
    return opts.get(name, opts.get(name.replace("-", "_"), default))


UNKNOWN = "unknown"   # the source's form, when `recipe check` has no model to read: no step is refused
# for what the source might lack (a heal of LoRA or low-rank factors), only for what earlier steps made


def _step_refusal(kind: str, opts: dict, forms: set[str]) -> str | None:
    """Why the step's command would refuse a model of these forms (the reason its own error
    gives), or None. tests/test_recipes.py runs every command on every form to hold this to them."""
    ext = _out_ext(kind, opts, "")
    if "onnx" in forms:
        return None if kind == "eval" else "its input is an .onnx file, which only eval reads"
    # only what the command refuses whatever the details (which linears a lowrank targeted, which
    # groups a recursive shared): a step the table lets through may still be refused when it runs
    merge = bool(_option(opts, "merge"))
    if kind == "lowrank" and "quantized" in forms:
        return "lowrank reads dense (or factored) linears, and its input is quantized"
    if kind == "recursive" and "recursive" in forms and not merge:
        return "its input is already recursive (--merge expands it)"
    if kind == "quantize":
        if forms & {"quantized", "recursive"}:
            return f"quantize needs a dense model, and its input is {_form_words(forms & {'quantized', 'recursive'})}"
        if "lowrank" in forms and ext in (".bin", ".gguf"):
            return ("rwkv.cpp and GGUF files hold dense matrices quantized in blocks, and its input is low-rank "
                    "(merge it first: a lowrank step with merge: true)")
    if kind == "heal" and "quantized" in forms:
        return "heal trains float tensors, and its input's linears are int8/int4 (heal before quantize)"
    if kind == "heal" and "recursive" in forms and ext not in (".safetensors", ".pth"):
        return ("a healed recursive checkpoint is written as .safetensors or .pth (expand it afterwards: "
                "a recursive step with merge: true)")
    if kind == "heal" and "lowrank" in forms and ext in (".bin", ""):
        return (f"{'rwkv.cpp' if ext == '.bin' else 'Hugging Face'} files hold dense matrices, and heal keeps its "
                "input's low-rank factors (write .safetensors, .pth or .gguf)")
    if kind == "heal" and not forms & {"lowrank", "recursive", UNKNOWN} and not set(
            str(_option(opts, "train", "auto")).split(",")) & {"all", "shared"}:
        return "heal trains LoRA or low-rank factors (or --train all), and its input has neither"
    if kind == "convert":
        to = {".bin": "rwkv.cpp", "": "Hugging Face", ".gguf": "GGUF"}.get(ext)
        dense_only = forms & ({"quantized", "lowrank", "recursive"} if to in ("rwkv.cpp", "Hugging Face")
                              else {"recursive"} if to == "GGUF" else set())
        if dense_only:
            return f"{to} files hold every layer's dense matrices, and its input is {_form_words(dense_only)}"
        if forms & {"quantized", "recursive"} and _option(opts, "to") == "rnn":
            return (f"the RNN form is written from dense or low-rank linears, and its input is "
                    f"{_form_words(forms & {'quantized', 'recursive'})}")
    return None


def _form_words(forms: set[str]) -> str:
    return " and ".join(sorted(forms))


def _forms_after(kind: str, opts: dict, forms: set[str]) -> set[str]:
    ext = _out_ext(kind, opts, "")
    merge = bool(_option(opts, "merge"))
    if kind == "eval":
        return forms
    if kind == "export-onnx":
        return {"onnx"}
    if ext in (".gguf", ".bin"):  # written dense (GGUF densifies; recursive only when merged); read back dense
        return forms - {"quantized", "lowrank", "recursive", UNKNOWN}
    if kind == "lowrank":
        return forms - {"lowrank"} if merge else forms | {"lowrank"}
    if kind == "recursive":
        return forms - {"recursive"} if merge else forms | {"recursive"}
    if kind == "quantize":
        return forms | {"quantized"}
    return forms


def check_chain(recipe: Recipe, model: str | None = None) -> None:
    """Each step can read what the step before it writes (a step after export-onnx, quantize
    after quantize, recursive after lowrank, ... are refused now, not after the earlier stages
    ran). Starts from the source model's form when it is there to read."""
    src = model or recipe.model
    forms = _forms_of_file(src) if src and os.path.exists(src) else {UNKNOWN}   # no model given: any form
    for step in recipe.steps:
        values = step.sweep[1] if step.sweep else [None]
        for v in values:
            opts = dict(step.options)
            if step.sweep:
                opts[step.sweep[0]] = v
            why = _step_refusal(step.kind, opts, forms)
            if why:
                where = f"step {step.index} ({step.kind}{f' {step.sweep[0]}={v}' if step.sweep else ''})"
                raise RecipeError(f"{recipe.path}: {where} cannot run: {why}")
        if step.kind != "eval":  # a sweep continues from its last value
            forms = _forms_after(step.kind, opts, forms)


# ------------------------------------------------------------------------------------ running
def _args_for(cmd, options: dict) -> list[str]:
    args = []
    for k, v in options.items():
        if k == "output" and cmd.name in OUTPUT_KINDS:   # the recipe's: DST's name carries it
            continue
        p = _param_for(cmd, k)
        flag = p.opts[0]
        if p.is_flag:
            if v:
                args.append(flag)
            elif p.secondary_opts:
                args.append(p.secondary_opts[0])
            continue
        for item in (v if (p.multiple and isinstance(v, list)) else [v]):
            args += [flag, str(item)]
    return args


def _has(cmd, name: str) -> bool:
    return _param_for(cmd, name) is not None


def _invoke(args: list[str]) -> tuple[int, str, str]:
    """Run the rwkvtools command with these arguments in this process; (exit code, stdout, stderr)."""
    import click

    from .cli import Stopped, main
    from .errors import Terminated
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main.main(args=args, prog_name="rwkvtools", standalone_mode=False)
        except Stopped as e:  # Ctrl-C or SIGTERM in the stage stops the whole recipe
            raise Terminated(e.signum) from None
        except click.ClickException as e:
            e.show()
            code = e.exit_code
        except click.exceptions.Exit as e:
            code = e.exit_code
        except click.Abort:  # Ctrl-C in click's own parsing
            raise KeyboardInterrupt from None
    return code, out.getvalue(), err.getvalue()


def _file_key(path: str) -> str:
    h = hashlib.sha256()
    from .io.paths import model_files
    paths = model_files(path)
    for p in paths:
        st = os.stat(p)
        h.update(f"{os.path.relpath(p, path) if p != path else ''}:{st.st_size}:{int(st.st_mtime_ns)}".encode())
    return h.hexdigest()


def _size(path: str) -> int:
    from .io.paths import disk_bytes
    return disk_bytes(path) or 0


def _params(path: str) -> int | None:
    from .io import is_onnx_file, read_checkpoint
    if is_onnx_file(path):
        return None
    return read_checkpoint(path).num_params()


def _out_ext(kind: str, options: dict, src: str) -> str:
    if kind in OUTPUT_KINDS and options.get("output") is not None:
        return OUTPUT_EXT[options["output"]]
    ext = STEP_KINDS[kind][1]
    if ext:
        return ext
    if kind == "convert":
        fmt = options.get("format")
        return {"pth": ".pth", "safetensors": ".safetensors", "rwkvcpp": ".bin", "gguf": ".gguf", "hf": ""}.get(
            fmt, ".safetensors")
    if kind == "quantize":
        scheme = str(options.get("scheme", "int8"))
        if scheme.endswith("_K"):
            return ".gguf"
        return ".bin" if scheme.upper().startswith("Q") else ".safetensors"
    return ".safetensors"


def _evaluate(path: str, ev: dict) -> dict:
    """Perplexity of a stage with the function behind `rwkvtools eval`."""
    from .evaluate import evaluate_file
    from .validate import packaged_text
    return evaluate_file(path, ev.get("text") or packaged_text("heldout"), tokenizer=ev.get("tokenizer", "auto"),
                         encoding=ev.get("encoding", "utf-8"), max_tokens=ev.get("tokens", 4096), progress=False)


def _gate(name: str, bound: float, metrics: dict) -> dict:
    metric, kind = GATES[name]
    v = metrics.get(metric)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return {"gate": name, "metric": metric, "bound": bound, "value": None, "passed": False,
                "detail": f"{metric} was not measured"}
    ok = v <= bound if kind == "max" else v >= bound
    op = "<=" if kind == "max" else ">="
    return {"gate": name, "metric": metric, "bound": bound, "value": v, "passed": ok,
            "detail": f"{metric} = {v:.4g} ({'ok' if ok else 'FAIL'}: must be {op} {bound:g})"}


def run(recipe: Recipe, out_dir: str, model: str | None = None, log=print, checked: bool = False) -> dict:
    """Run every step; returns the report (also written to out_dir). Never raises on a failed
    gate: report['passed'] says it. ``checked``: the caller ran check_inputs for this model (the
    command does, before --out is made), so the source and its text are not read twice for it."""
    src = recipe.source(model)
    if not src:
        raise RecipeError(f"{recipe.path}: no source model: set 'model' in the recipe or pass --model")
    if not checked:
        check_inputs(recipe, src)
    ev = recipe.eval
    t0 = time.time()
    base = {"stage": "source", "step": 0, "kind": "source", "options": {}, "path": os.path.abspath(src),
            "bytes": _size(src), "params": _params(src), "resumed": False}
    base.update(_measure(src, ev))
    created = not os.path.isdir(out_dir)
    os.makedirs(out_dir, exist_ok=True)  # once the source and the text are known to be readable
    try:
        return _run_steps(recipe, src, out_dir, base, ev, t0, log)
    except BaseException:  # Ctrl-C or an error before any stage finished: no empty folder left behind
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(out_dir)  # only succeeds while it is empty (finished stages are kept for resuming)
        raise


def _run_steps(recipe: Recipe, src: str, out_dir: str, base: dict, ev: dict, t0: float, log) -> dict:
    stages = []
    base["ppl_increase_pct"] = 0.0
    base["size_reduction"] = 0.0
    base["bits_per_weight"] = 8.0 * base["bytes"] / base["params"] if base["params"] else None
    stages.append(base)
    log(f"source: ppl {base['ppl']:.4f}, {base['bytes']:,} bytes")
    current = base
    not_run = []
    for step in recipe.steps:
        if current.get("failed"):  # no model to go on from: the later steps are listed, not run
            not_run.append(f"{step.index:02d}-{step.kind}")
            continue
        values = step.sweep[1] if step.sweep else [None]
        names = [_label_value(v) for v in values]
        if len(set(names)) < len(names):  # e.g. two calibration texts of the same file name
            names = [f"{n}-{i}" for i, n in enumerate(names, 1)]
        results = []
        for v, name in zip(values, names):
            opts = dict(step.options)
            label = f"{step.index:02d}-{step.kind}"
            if step.sweep:
                opts[step.sweep[0]] = v
                label += f"-{step.sweep[0]}-{name}"
            res = _run_stage(step, opts, label, current, out_dir, ev, log)
            results.append(res)
            stages.append(res)
        if step.kind != "eval":
            current = results[-1]  # a sweep continues from its last value
    if not_run:
        log(f"not run (stage {current['stage']} wrote no model to go on from): {', '.join(not_run)}")
    final = None if current.get("failed") else current
    stamped = final is not None and final is not base and _stamp_recipe(final["path"], recipe)
    if stamped:  # never the source model itself (a recipe of eval steps only); judged as it is now
        _restamped(final)
        log(f"{final['stage']}: the recipe stored in its manifest: {final['bytes']:,} bytes")
        if final.get("key"):
            from .io.atomic import write_json
            write_json(os.path.join(out_dir, final["stage"] + ".json"), {**final, "resumed": False})
    if final is None:
        overall = {"ppl_increase_pct": None, "size_reduction": None}
        overall_gates = [{"gate": g, "metric": GATES[g][0], "bound": b, "value": None, "passed": False,
                          "detail": f"{GATES[g][0]} not measured: stage {current['stage']} failed"}
                         for g, b in recipe.gates.items()]
    else:
        overall = {"ppl_increase_pct": 100.0 * (final["ppl"] / base["ppl"] - 1.0),
                   "size_reduction": 1.0 - final["bytes"] / base["bytes"]}
        overall_gates = [_gate(g, b, overall) for g, b in recipe.gates.items()]
    passed = all(g["passed"] for s in stages for g in s.get("gates", [])) and all(g["passed"] for g in overall_gates) \
        and not any(s.get("failed") for s in stages)
    report = {"recipe": recipe.name, "recipe_file": os.path.abspath(recipe.path), "source": os.path.abspath(src),
              "eval": ev, "stages": stages, "not_run": not_run, "overall": {**overall, "gates": overall_gates},
              "passed": passed, "final": final["path"] if final else None, "seconds": time.time() - t0}
    write_reports(report, out_dir)
    return report


def _label_value(v) -> str:
    """A sweep value as part of a stage's file name: a path by its base name, and nothing that
    would make a folder or a hidden name."""
    text = os.path.basename(str(v).rstrip("/\\")) or str(v)
    label = re.sub(r"[^A-Za-z0-9._+=-]", "_", text).lstrip(".") or "_"
    if len(label) > 40:  # a file name has at most 255 bytes: a long value is cut, its hash keeps it apart
        label = label[:31] + "-" + hashlib.sha256(str(v).encode()).hexdigest()[:8]
    return label


def _measure(path: str, ev: dict) -> dict:
    r = _evaluate(path, ev)
    return {"ppl": r["ppl"], "nll_per_token": r["nll_per_token"], "eval_tokens": r["tokens"]}


def _run_stage(step: Step, opts: dict, label: str, current: dict, out_dir: str, ev: dict, log) -> dict:
    cmd = _command(step.kind)
    src = current["path"]
    files = {k: _file_key(v) for k, v in opts.items() if isinstance(v, str) and _is_path_option(cmd, k)
             and os.path.exists(v)}
    if ev.get("text") and os.path.exists(ev["text"]):
        files["eval.text"] = _file_key(ev["text"])
    key = hashlib.sha256(json.dumps({"key": 2, "input": _file_key(src), "kind": step.kind, "options": opts, "eval": ev,
                                     "files": files}, sort_keys=True, default=str).encode()).hexdigest()
    meta_path = os.path.join(out_dir, label + ".json")
    stage = {"stage": label, "step": step.index, "kind": step.kind, "options": opts, "input": src}
    if os.path.exists(meta_path):
        try:
            with open(meta_path) as f:
                old = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            old = {}  # unreadable: the stage runs again and rewrites it
        if not isinstance(old, dict):
            old = {}
        if "ppl" in old and old["ppl"] is None:
            old["ppl"] = float("nan")  # records are strict JSON: a NaN perplexity was written as null
        if old.get("key") == key and (step.kind == "eval" or _output_intact(old, out_dir)):
            old["resumed"] = True
            old["gates"] = [_gate(g, b, old) for g, b in step.gates.items()]  # the gates as the recipe has them now
            log(f"{label}: up to date, skipped")
            return old
    report_path = os.path.join(out_dir, label + ".report.json")
    dst = src if step.kind == "eval" else os.path.join(out_dir, label + _out_ext(step.kind, opts, src))
    args = _stage_args(cmd, step.kind, opts, src, dst, report_path, ev,
                       teacher=current.get("teacher") or _root_of(current))
    if step.kind != "eval":  # an output or record left by an earlier run with other options is not this stage's
        _remove_stale(out_dir, [dst, meta_path, report_path])
    log(f"{label}: rwkvtools {' '.join(args)}")
    code, out, err = _invoke(args)
    stage["command"] = "rwkvtools " + " ".join(args)
    stage["exit_code"] = code
    cmd_report = None
    if code in (0, 1) and os.path.exists(report_path):
        with open(report_path) as f:
            cmd_report = json.load(f)
    elif out.strip().startswith("{"):
        with contextlib.suppress(json.JSONDecodeError):
            cmd_report = json.loads(out)
    produced = code == 0 and (step.kind == "eval" or os.path.exists(dst))
    if not produced:  # an error (exit 2) or the command's own gate (exit 1: it writes no DST)
        msg = (err or out).strip()
        detail = (f"exit code {code}: {msg[-300:]}" if code != 1 else
                  "exit code 1: the command's own gate failed, nothing written"
                  + (f" ({msg.splitlines()[-1].strip()[-300:]})" if msg else ""))
        stage.update({"path": None, "failed": True, "error": msg[-2000:], "ppl": float("nan"), "bytes": None,
                      "params": None, "command_report": cmd_report,
                      "gates": [{"gate": "command", "passed": False, "detail": detail}]})
        log(f"{label}: FAILED ({detail})")
        return stage
    stage["path"] = os.path.abspath(dst)
    stage["input_bytes"] = current["bytes"]
    stage["bytes"] = _size(dst)
    stage["params"] = _params(dst) if step.kind != "eval" else current.get("params")
    stage.update(_measure(dst, ev) if step.kind != "eval" else {"ppl": cmd_report["ppl"] if cmd_report else float("nan")})
    stage["ppl_increase_pct"] = 100.0 * (stage["ppl"] / current["ppl"] - 1.0)
    stage["size_reduction"] = 1.0 - stage["bytes"] / current["bytes"]
    val = (cmd_report or {}).get("validation") if isinstance(cmd_report, dict) else None
    if val and "logits_drift" in val:
        stage["logit_drift"] = val["logits_drift"]["max_abs"]
    stage["bits_per_weight"] = 8.0 * stage["bytes"] / stage["params"] if stage.get("params") else None
    stage["command_report"] = cmd_report
    stage["gates"] = [_gate(g, b, stage) for g, b in step.gates.items()]
    stage["key"] = key
    stage["resumed"] = False
    stage["root"] = _root_of(current)
    if step.kind != "eval":
        stage["output_key"] = _file_key(dst)   # a resumed run uses the output only while it is this file
    from .io.atomic import write_json
    write_json(meta_path, stage)  # atomically: a record cut short would break resuming
    verdict = "PASS" if all(g["passed"] for g in stage["gates"]) else "FAIL"
    log(f"{label}: ppl {stage['ppl']:.4f} ({stage['ppl_increase_pct']:+.2f}%), {stage['bytes']:,} bytes [{verdict}]")
    return stage


def _output_intact(record: dict, out_dir: str) -> bool:
    """A stage record's output can be reused: it lies directly in this --out (a record copied with
    its folder names the old folder's file) and is the file the stage wrote (same size and time:
    a file replaced or emptied since runs the stage again)."""
    path = record.get("path")
    if not isinstance(path, str) or not os.path.lexists(path):
        return False
    if os.path.dirname(os.path.realpath(path)) != os.path.realpath(out_dir):
        return False
    try:
        return record.get("output_key") == _file_key(path)
    except OSError:
        return False


def _restamped(stage: dict) -> None:
    """The final stage's figures and gates after the recipe was stamped into its file (the file
    grew by the stamp): size, size reduction, bits per weight, then its gates again."""
    stage["bytes"] = _size(stage["path"])
    if stage.get("input_bytes"):
        stage["size_reduction"] = 1.0 - stage["bytes"] / stage["input_bytes"]
    stage["bits_per_weight"] = 8.0 * stage["bytes"] / stage["params"] if stage.get("params") else None
    stage["gates"] = [_gate(g["gate"], g["bound"], stage) if g.get("gate") in GATES else g
                      for g in stage.get("gates", [])]
    if stage.get("key"):
        stage["output_key"] = _file_key(stage["path"])


def _remove_stale(out_dir: str, paths: list[str]) -> None:
    """Remove what an earlier run of this stage (other options or input) left under its names in
    --out, so that a stage that now fails leaves no model that looks like its output."""
    import shutil
    root = os.path.realpath(out_dir)
    for p in paths:
        if os.path.dirname(os.path.realpath(p)) != root or not os.path.lexists(p):
            continue  # only the stage's own names directly in --out
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
        else:
            os.remove(p)


def _stage_args(cmd, kind: str, opts: dict, src: str, dst: str, report_path: str, ev: dict, teacher: str) -> list[str]:
    """The command line of a stage: the step's options, and what the recipe supplies (the
    evaluation text and budget, --force, --report, heal's teacher) unless the step sets it."""
    if kind == "eval":
        args = [cmd.name, src, "--json", "--no-progress"]
        if "text" not in opts:  # the recipe's own text, else the packaged held-out text it measures on
            from .validate import packaged_text
            args += ["--text", ev.get("text") or packaged_text("heldout")]
        # measured as every stage is (the recipe's budget, tokenizer, encoding)
        supplied = (("max-tokens", ev.get("tokens", 4096)), ("tokenizer", ev.get("tokenizer")),
                    ("encoding", ev.get("encoding")))
    else:
        args = [cmd.name, src, dst]
        if _has(cmd, "force"):
            args.append("--force")
        if _has(cmd, "report"):
            args += ["--report", report_path]
        # the command's own check on the recipe's text, budget and encoding; heal's teacher
        supplied = (("eval-text", ev.get("text")), ("eval-tokens", ev.get("tokens")), ("encoding", ev.get("encoding")),
                    ("teacher", teacher if kind == "heal" else None))
    for opt, val in supplied:  # unless the step sets it
        if val is not None and _has(cmd, opt) and opt not in opts and opt.replace("-", "_") not in opts:
            args += [f"--{opt}", str(val)]
    return args + _args_for(cmd, opts)


def _check_step(where: str, cmd, kind: str, opts: dict, ev: dict) -> None:
    """What the step's command would refuse before reading any file, refused now: its command line
    as a run builds it, parsed by the command's own parser and checked by the command's own
    option check (e.g. quantize's --group-size with int8), with stand-in paths."""
    import click

    from .commands.common import OPTION_CHECKS, given_options
    src = "MODEL"
    dst = src if kind == "eval" else "STAGE" + _out_ext(kind, opts, src)
    args = _stage_args(cmd, kind, opts, src, dst, "STAGE.report.json", ev, teacher="TEACHER")
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # click's parser may print usage lines
            ctx = cmd.make_context(cmd.name, args[1:])
        check = OPTION_CHECKS.get(cmd.name)
        if check is not None:
            check(dst, ctx.params, given_options(ctx))
    except click.ClickException as e:
        raise RecipeError(f"{where}: {e.format_message()}") from None
    except RwkvToolsError as e:
        raise RecipeError(f"{where}: {e}") from None


def _root_of(stage: dict) -> str:
    return stage.get("root") or stage["path"]


def _stamp_recipe(path: str, recipe: Recipe) -> bool:
    """Store the applied recipe in the final model's manifest (safetensors outputs; the other
    formats hold no manifest, or, for GGUF and .onnx, one written by their own writer). True when
    the file changed (a file that holds this recipe already is left as it is, so that a resumed
    run does not touch it)."""
    if not path.endswith(".safetensors") or not os.path.exists(path):
        return False
    from .io.safetensors_io import read_safetensors, write_safetensors
    stamp = json.loads(json.dumps({"name": recipe.name, "file": os.path.basename(recipe.path),
                                   "spec": copy.deepcopy(recipe.raw)}, default=str))
    ck = read_safetensors(path)
    if ck.manifest.get("recipe") == stamp:
        return False
    ck = ck.materialize()
    ck.manifest["recipe"] = stamp
    write_safetensors(ck, path)
    return True


# ------------------------------------------------------------------------------------ reports
def markdown_table(report: dict) -> str:
    lines = [f"### Recipe `{report['recipe']}`: {'PASS' if report['passed'] else 'FAIL'}", "",
             "| stage | params | size (bytes) | bits/weight | ppl | Δppl vs input | gates |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for s in report["stages"]:
        gates = "; ".join(("✅ " if g["passed"] else "❌ ") + g["detail"] for g in s.get("gates", [])) or "—"
        params = f"{s['params']:,}" if s.get("params") else "—"
        size = f"{s['bytes']:,}" if s.get("bytes") is not None else "—"
        bpw = f"{s['bits_per_weight']:.2f}" if s.get("bits_per_weight") else "—"
        ppl = f"{s['ppl']:.4f}" if _number(s.get("ppl")) else "—"
        inc = f"{s['ppl_increase_pct']:+.2f}%" if _number(s.get("ppl_increase_pct")) else "—"
        lines.append(f"| {s['stage']}{' (resumed)' if s.get('resumed') else ''} | {params} | {size} | {bpw} | "
                     f"{ppl} | {inc} | {gates} |")
    for label in report.get("not_run", []):
        lines.append(f"| {label} | — | — | — | — | — | not run (no model from the failed stage) |")
    o = report["overall"]
    if _number(o["ppl_increase_pct"]):
        lines += ["", f"Overall: ppl {o['ppl_increase_pct']:+.2f}% vs source, "
                      f"size reduced by {100 * o['size_reduction']:.1f}%"]
    else:
        lines += ["", "Overall: not measured (a stage failed before the last step's model was made)"
                  if report.get("final") is None else "Overall: ppl not measured (not a number)"]
    for g in o["gates"]:
        lines.append(f"- {'✅' if g['passed'] else '❌'} {g['detail']}")
    return "\n".join(lines) + "\n"


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def write_reports(report: dict, out_dir: str) -> None:
    from .io.atomic import atomic_path, write_json
    write_json(os.path.join(out_dir, "report.json"), report)
    with atomic_path(os.path.join(out_dir, "report.md")) as tmp:
        with open(tmp, "w") as f:
            f.write(markdown_table(report))
    _plot(report, os.path.join(out_dir, "plot.png"))


def _plot(report: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from .io.atomic import atomic_path
    fig, ax = plt.subplots(figsize=(7, 4.5))
    pts = [(s["bytes"] / 1e6, s["ppl"], s["stage"]) for s in report["stages"]
           if isinstance(s.get("ppl"), float) and not math.isnan(s["ppl"]) and s["kind"] != "eval"]
    for x, y, label in pts:
        ax.scatter([x], [y])
        ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("size (MB)")
    ax.set_ylabel("perplexity (held-out)")
    ax.set_title(f"recipe {report['recipe']}: perplexity vs size")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)

"""`rwkvtools recipe run|check`: compression pipelines from YAML."""
from __future__ import annotations

import os
import sys

import click

from ..cli import GateFailed, emit_json, handle_errors, main


@main.group()
def recipe():
    """Run or check a compression recipe (recipes/*.yaml).

    \b
    Examples:
      rwkvtools recipe check recipes/int8.yaml
      rwkvtools recipe run recipes/lowrank-0.32-heal.yaml --out out/lowrank
      rwkvtools recipe run recipes/sweep-lowrank.yaml --model my.pth --out out/sweep --json
    """


@recipe.command()
@click.argument("recipe_file", type=click.Path())
@click.option("--model", default=None, type=click.Path(), help="Source model (overrides the recipe's 'model').")
def check(recipe_file, model):
    """Check a recipe before anything runs: the schema, every step's options as its command
    would check them (e.g. quantize's --group-size only with int4), and that the files it reads
    (source model, evaluation text, path options such as calib) exist.

    \b
    Examples:
      rwkvtools recipe check recipes/int8.yaml
      rwkvtools recipe check recipes/sweep-lowrank.yaml --model my.pth
    """
    handle_errors(_check)(recipe_file, model)


def _check(recipe_file, model):
    from ..recipes import check_inputs, load_recipe
    r = load_recipe(recipe_file)
    check_inputs(r, model)
    src = r.source(model)
    click.echo(f"{recipe_file}: ok ({len(r.steps)} steps: {', '.join(s.kind for s in r.steps)})"
               + ("" if src else "; no source model in the recipe: give one with --model when running it"))


@recipe.command()
@click.argument("recipe_file", type=click.Path())
@click.option("--model", default=None, type=click.Path(), help="Source model (overrides the recipe's 'model').")
@click.option("--out", "out_dir", required=True, type=click.Path(), help="Folder for artifacts and reports.")
@click.option("--json", "as_json", is_flag=True, help="Print report.json.")
@click.option("--summary", type=click.Path(), default=None,
              help="Append the markdown table to this file (e.g. $GITHUB_STEP_SUMMARY).")
def run(recipe_file, model, out_dir, as_json, summary):
    """Run every step of a recipe, write report.json, report.md and plot.png into --out.

    Stages whose output exists for the same inputs and options are skipped (resume). Exits 1
    when a gate fails, after writing the reports.

    \b
    Example:
      rwkvtools recipe run recipes/int8.yaml --out out/int8
    """
    handle_errors(_run)(recipe_file, model, out_dir, as_json, summary)


def _run(recipe_file, model, out_dir, as_json, summary):
    from ..recipes import check_inputs, load_recipe, markdown_table, run as run_recipe
    r = load_recipe(recipe_file)
    src = r.source(model)
    if src:
        check_inputs(r, src)  # before --out is made: a missing file is found now, not at its stage
    _guard(r, src, out_dir, summary)
    log = (lambda m: click.echo(m, err=True)) if as_json else click.echo
    report = run_recipe(r, out_dir, model=src, log=log, checked=bool(src))
    table = markdown_table(report)
    if summary:
        with open(summary, "a", encoding="utf-8") as f:
            f.write(table + "\n")
    if as_json:
        emit_json(report)
    else:
        click.echo("")
        click.echo(table)
        click.echo(f"reports: {out_dir}/report.json, report.md, plot.png")
    if not report["passed"]:
        failed = [s["stage"] for s in report["stages"] if s.get("failed")]
        what = f"stage {', '.join(failed)} failed" if failed else "a gate failed"
        raise GateFailed(f"recipe {r.name}: {what} (see {out_dir}/report.md)")
    sys.stdout.flush()


def _guard(r, model, out_dir, summary) -> None:
    """Before anything runs: --out is a folder that neither holds nor lies in any input (model,
    recipe, evaluation text, path options), and --summary is none of them."""
    from ..cli import UserError
    from ..errors import RwkvToolsError
    from ..io.paths import check_place, clash, within
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"--out {out_dir} is a file; give a folder for the artifacts and reports")
    if not str(out_dir).strip():
        raise UserError("--out is an empty path; give a folder for the artifacts and reports")
    try:  # places where files can be made (not under a file, not in /proc, not read-only)
        check_place(os.path.join(out_dir, "report.json"), "--out")
        if summary:  # an empty --summary (an unset $GITHUB_STEP_SUMMARY) writes no table, as before
            if os.path.isdir(summary):
                raise UserError(f"--summary {summary} is a folder; give a file to append the table to")
            check_place(summary, "--summary")
            parent = os.path.dirname(os.path.abspath(summary))
            if not os.path.isdir(parent):
                raise UserError(f"--summary {summary}: the folder {parent} does not exist")
            if within(summary, out_dir):  # the run writes (and replaces) the files there
                raise UserError(f"--summary {summary} is inside --out {out_dir}, where the run writes its models "
                                "and reports; give a file elsewhere")
            if os.path.exists(summary):
                try:  # opened to append, as at the end of the run (no byte is written now)
                    open(summary, "a").close()
                except OSError as e:
                    raise UserError(f"--summary {summary}: cannot append to it ({e.strerror or e})") from None
    except RwkvToolsError as e:
        raise UserError(str(e)) from None
    from ..recipes import input_files
    inputs = [(label, p) for label, p in [("recipe", r.path), *input_files(r, model)] if os.path.exists(p)]
    for label, p in inputs:  # the run writes and removes stage files and reports directly in --out
        why = clash(out_dir, p, label)
        if not why and os.path.realpath(os.path.dirname(os.path.abspath(p))) == os.path.realpath(out_dir):
            why = f"{out_dir} is the folder of the input {p} ({label})"
        if why:
            raise UserError(f"--out {why}; give another folder (the run writes and replaces files there)")
    for label, p in inputs:
        why = summary and clash(summary, p, label)
        if why:
            raise UserError(f"--summary {why}; give another file")

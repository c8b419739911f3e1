"""Recipes: schema errors are clear, gates fail with exit 1 and a full report, finished stages
are resumed, the report's figures equal running the commands by hand, and every shipped recipe
runs on the fixtures with its gates enforced."""
import json
import os
import pathlib
import re

import pytest
import torch
import yaml
from click.testing import CliRunner

from rwkvtools.cli import main
from rwkvtools.recipes import RecipeError, load_recipe
from conftest import DATA, REPO, fixture_path

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
runner = CliRunner()


def write(tmp_path, doc) -> str:
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(doc))
    return str(p)


def base(**kw):
    doc = {"name": "t", "model": fixture_path("tiny-rwkv-5v2-730K-FP32.bin"),
           "eval": {"text": str(DATA / "wikitext-2-test.txt"), "tokens": 1024},
           "steps": [{"quantize": {"scheme": "int8"}}]}
    doc.update(kw)
    return doc


def test_shipped_recipes_exist():
    names = {p.stem for p in RECIPES}
    assert {"lowrank-0.32-heal", "recursive-half-lora", "int8", "q5_1-rwkvcpp", "onnx-fp16", "sweep-lowrank",
            "q4_0-gptq-tuned"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_shipped_recipe_passes_check(path):
    res = runner.invoke(main, ["recipe", "check", str(path)])
    assert res.exit_code == 0, res.output


def test_path_options_of_steps_expand_like_the_model(tmp_path, monkeypatch):
    """${VAR:-default} and recipe-relative paths in path-valued step options (calib); other
    string options are left as written."""
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "cal.txt").write_text("calibration text")
    monkeypatch.setenv("RT_TEXTS", str(tmp_path / "texts"))
    doc = base(steps=[{"quantize": {"scheme": "Q4_0", "method": "gptq", "calib": "${RT_TEXTS}/cal.txt"}},
                      {"quantize": {"scheme": "int8", "method": "gptq", "calib": "texts/cal.txt"}},
                      {"quantize": {"scheme": "int8", "method": "gptq", "calib": "${RT_NOPE:-./texts}/cal.txt"}}])
    r = load_recipe(write(tmp_path, doc))
    want = str(tmp_path / "texts" / "cal.txt")
    assert [s.options["calib"] for s in r.steps] == [want, want, want]
    assert r.steps[0].options["scheme"] == "Q4_0"


@pytest.mark.parametrize("mutate,match", [
    (lambda d: d["steps"].append({"frobnicate": {}}), "unknown step 'frobnicate'.*known: convert"),
    (lambda d: d["steps"][0]["quantize"].update({"bogus-opt": 1}), "unknown option 'bogus-opt'.*allowed:.*scheme"),
    (lambda d: d["steps"][0]["quantize"].update({"scheme": "int3"}), "option 'scheme'.*int3"),
    (lambda d: d["steps"][0]["quantize"].update({"group-size": "big"}), "option 'group-size'"),
    (lambda d: d["steps"].append({"export-onnx": {}, "gates": {"max_logit_drift": 1.0}}),
     "gate 'max_logit_drift' needs the metric 'logit_drift'"),
    (lambda d: d["steps"][0].update({"gates": {"max_speed": 1}}), "unknown gate 'max_speed'"),
    (lambda d: d["steps"][0].update({"gates": {"max_ppl_increase": float("nan")}}),
     "gate 'max_ppl_increase' needs a finite number, got nan"),  # NaN would pass every model
    (lambda d: d.update({"gates": {"max_ppl_increase": float("inf")}}), "needs a finite number, got inf"),
    (lambda d: d.update({"colour": "blue"}), "unknown top-level key"),
    (lambda d: d["steps"][0].update({"sweep": {"scheme": "int8"}}), "non-empty list"),
    (lambda d: d["steps"][0]["quantize"].update({"clip": "yes"}), "option 'clip' is a flag: use true or false"),
    (lambda d: d["steps"][0].update({"lowrank": {"rank": 0.5}}), "exactly one step kind expected"),
    (lambda d: d["steps"][0].update({"sweep": {"group-size": [32, 64], "scheme": ["int8"]}}),
     "sweep must name one option"),
    (lambda d: d["eval"].update({"tokens": True}), "eval: 'tokens' must be int, got True"),
])
def test_schema_errors_are_clear(tmp_path, mutate, match):
    doc = base()
    mutate(doc)
    path = write(tmp_path, doc)
    with pytest.raises(RecipeError, match=match):
        load_recipe(path)
    res = runner.invoke(main, ["recipe", "check", path])
    assert res.exit_code == 2 and "error:" in res.output and "Traceback" not in res.output


def test_failing_gate_exits_1_with_full_report_and_resume(tmp_path):
    doc = base(gates={"min_size_reduction": 0.99})  # int8 cannot shrink a model by 99%
    path = write(tmp_path, doc)
    out = tmp_path / "out"
    res = runner.invoke(main, ["recipe", "run", path, "--out", str(out)])
    assert res.exit_code == 1, res.output
    rep = json.loads((out / "report.json").read_text())
    assert rep["passed"] is False
    assert [g["passed"] for g in rep["overall"]["gates"]] == [False]
    assert (out / "report.md").read_text().count("|") > 10
    assert (out / "plot.png").read_bytes()[:4] == b"\x89PNG"
    # second run: the finished stage is not recomputed
    res2 = runner.invoke(main, ["recipe", "run", path, "--out", str(out), "--json"])
    rep2 = json.loads(res2.stdout)
    assert rep2["stages"][1]["resumed"] is True
    assert rep2["stages"][1]["ppl"] == rep["stages"][1]["ppl"]


def test_report_figures_equal_commands_by_hand(tmp_path):
    path = write(tmp_path, base())
    out = tmp_path / "out"
    res = runner.invoke(main, ["recipe", "run", path, "--out", str(out)])
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "report.json").read_text())
    by_hand = tmp_path / "hand.safetensors"
    r = runner.invoke(main, ["quantize", fixture_path("tiny-rwkv-5v2-730K-FP32.bin"), str(by_hand),
                             "--scheme", "int8", "--no-validate"])
    assert r.exit_code == 0, r.output
    ev = runner.invoke(main, ["eval", str(by_hand), "--text", str(DATA / "wikitext-2-test.txt"),
                              "--max-tokens", "1024", "--json"])
    assert abs(json.loads(ev.output)["ppl"] - rep["stages"][1]["ppl"]) < 1e-9
    # the same tensors; the final model also carries the recipe in its metadata, and the report
    # gives the size of the file as it is on disk
    assert rep["stages"][1]["bytes"] == os.path.getsize(rep["stages"][1]["path"]) > os.path.getsize(by_hand)
    from rwkvtools.io.safetensors_io import read_safetensors
    a, b = read_safetensors(str(by_hand)), read_safetensors(rep["stages"][1]["path"])
    assert list(a.tensors) == list(b.tensors) and all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    # the step's own check measured on the recipe's text and token budget: the same perplexities
    # as the recipe's stages, and the recipe's logit_drift is the command's max |logit diff|
    val = rep["stages"][1]["command_report"]["validation"]
    assert val["eval_tokens"] == 1024
    assert abs(val["ppl_before"] / rep["stages"][0]["ppl"] - 1) < 1e-4
    assert abs(val["ppl_after"] / rep["stages"][1]["ppl"] - 1) < 1e-4
    drift = val["logits_drift"]
    assert drift["max_abs"] > drift["mean_abs"] > 0 and rep["stages"][1]["logit_drift"] == drift["max_abs"]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_shipped_recipe_runs_with_gates(tmp_path, path):
    """CI runs every shipped recipe on the fixtures, gates enforced."""
    out = tmp_path / "out"
    args = ["recipe", "run", str(path), "--out", str(out)]
    summary = os.environ.get("RWKVTOOLS_RECIPE_SUMMARY")
    if summary:
        args += ["--summary", summary]
    res = runner.invoke(main, args)
    assert res.exit_code == 0, res.output[-3000:]
    rep = json.loads((out / "report.json").read_text())
    assert rep["passed"] is True
    assert pathlib.Path(rep["final"]).exists()
    for s in rep["stages"]:
        if s["kind"] == "heal":   # distilled from the recipe's source model, not from the previous stage
            assert s["command_report"]["teacher"] == rep["source"]


def test_stage_record_cut_short_is_run_again(tmp_path):
    """A stage record left half-written (a run killed while writing it) does not break the next
    run: the stage is computed again and its record rewritten whole."""
    path = write(tmp_path, base())
    out = tmp_path / "out"
    assert runner.invoke(main, ["recipe", "run", path, "--out", str(out)]).exit_code == 0
    records = [p for p in out.glob("*.json") if p.name != "report.json" and not p.name.endswith(".report.json")]
    assert records
    for p in records:
        p.write_text(p.read_text()[:40])
    res = runner.invoke(main, ["recipe", "run", path, "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output[-2000:]
    rep = json.loads(res.stdout)
    assert [s["resumed"] for s in rep["stages"]] == [False] * len(rep["stages"])
    for p in records:
        assert json.loads(p.read_text())["resumed"] is False


def test_eval_step_without_a_recipe_text_scores_the_packaged_held_out_text(tmp_path):
    """With no eval.text the recipe measures on the packaged held-out text; an eval step then
    scores the same text (it used to stop at the eval command's missing --text)."""
    doc = base(eval={"tokens": 1024}, steps=[{"eval": {"max-tokens": 1024}}])
    res = runner.invoke(main, ["recipe", "run", write(tmp_path, doc), "--out", str(tmp_path / "out"), "--json"])
    assert res.exit_code == 0, res.output[-2000:]
    src, ev = json.loads(res.stdout)["stages"]
    assert ev["kind"] == "eval" and abs(ev["ppl"] - src["ppl"]) < 1e-9


def test_resume_only_when_options_and_output_are_unchanged(tmp_path):
    """A finished stage is reused only for the same input, options and eval text and while its
    output exists: other options, or a deleted output, run it again."""
    doc = base(steps=[{"quantize": {"scheme": "int4", "group-size": 32}}])
    out = tmp_path / "out"

    def stage():
        res = runner.invoke(main, ["recipe", "run", write(tmp_path, doc), "--out", str(out), "--json"])
        assert res.exit_code == 0, res.output[-2000:]
        return json.loads(res.stdout)["stages"][1]
    first = stage()
    assert first["resumed"] is False and stage()["resumed"] is True
    doc["steps"][0]["quantize"]["group-size"] = 64
    other = stage()
    assert other["resumed"] is False and other["options"]["group-size"] == 64
    assert other["bytes"] < first["bytes"]                   # half the int4 scales: really recomputed
    os.remove(other["path"])
    again = stage()
    assert again["resumed"] is False and os.path.exists(again["path"])


def test_a_sweep_continues_from_its_last_value(tmp_path):
    doc = base(steps=[{"quantize": {"scheme": "int4"}, "sweep": {"group-size": [32, 64]}},
                      {"eval": {"max-tokens": 1024}}])
    res = runner.invoke(main, ["recipe", "run", write(tmp_path, doc), "--out", str(tmp_path / "out"), "--json"])
    assert res.exit_code == 0, res.output[-2000:]
    rep = json.loads(res.stdout)
    src, g32, g64, ev = rep["stages"]
    assert (g32["options"]["group-size"], g64["options"]["group-size"]) == (32, 64)
    assert g32["input"] == g64["input"] == src["path"]       # every sweep value from the same input
    assert ev["input"] == g64["path"] and rep["final"] == g64["path"]
    from rwkvtools.io.safetensors_io import read_safetensors
    stamp = read_safetensors(rep["final"]).manifest["recipe"]          # the final model names its recipe
    assert stamp["name"] == "t" and stamp["spec"]["steps"] == doc["steps"]


@pytest.mark.parametrize("content,match", [
    (b"\xff\xfe\x00\x01" * 50, "not a recipe: a recipe is UTF-8 YAML text"),
    ("name: caf\u00e9\nsteps:\n  - quantize: {scheme: int8}\n".encode("latin-1"), "UTF-8 YAML text"),
    (None, "is a folder; give a recipe file"),
], ids=["binary", "latin-1", "folder"])
def test_unreadable_recipe_file_is_a_clear_error(tmp_path, content, match):
    """A recipe that is not UTF-8 text (e.g. a model given by mistake) or a folder was an internal
    error (UnicodeDecodeError / IsADirectoryError)."""
    p = tmp_path / "r.yaml"
    if content is None:
        p.mkdir()
    else:
        p.write_bytes(content)
    with pytest.raises(RecipeError, match=match):
        load_recipe(str(p))
    for args in (["recipe", "check", str(p)], ["recipe", "run", str(p), "--out", str(tmp_path / "out")]):
        res = runner.invoke(main, args)
        assert res.exit_code == 2 and "error:" in res.output and "internal error" not in res.output, res.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text,match", [
    ("1: 2\n", "top-level key 1 is not a name"),
    ("1: 2\ncolour: blue\n", "top-level key 1 is not a name"),
    ("", "option 1 is not a name"),
    ("", "sweep: option 1 is not a name"),
], ids=["top", "top-mixed", "option", "sweep"])
def test_keys_that_are_not_text_are_refused(tmp_path, text, match):
    """YAML keys read as numbers (1: 2) at the top, among a step's options or as the sweep's option
    were internal errors (TypeError joining/sorting the names, AttributeError on int.replace)."""
    steps = "steps:\n  - quantize: {scheme: int8}\n"
    if "sweep" in match:
        steps = "steps:\n  - quantize: {scheme: int8}\n    sweep: {1: [1, 2]}\n"
    elif "option" in match:
        steps = "steps:\n  - quantize: {scheme: int8, 1: 2}\n"
    p = tmp_path / "r.yaml"
    p.write_text(f"model: {fixture_path('tiny-rwkv-5v2-730K-FP32.bin')}\n" + steps + text)
    with pytest.raises(RecipeError, match=match):
        load_recipe(str(p))
    res = runner.invoke(main, ["recipe", "check", str(p)])
    assert res.exit_code == 2 and "error:" in res.output and "internal error" not in res.output, res.output


@pytest.mark.parametrize("value,match", [
    (None, "option 'calib-tokens' needs a value, not null"),
    (float("inf"), "option 'calib-tokens' = inf: .*not a valid integer"),
    (256.7, "option 'calib-tokens' = 256.7: .*not a valid integer"),
    (True, "option 'calib-tokens' needs a value, not true"),
], ids=["null", "inf", "float", "bool"])
def test_step_option_values_are_checked_as_the_command_gets_them(tmp_path, value, match):
    """calib-tokens: null or .inf was an internal error (TypeError / OverflowError in click's int
    type); 256.7 and true passed `recipe check` (click's int() took them) and the stage then failed
    on the command line it was given ('256.7', 'True'). Also as a sweep value."""
    doc = base(steps=[{"quantize": {"scheme": "int4", "method": "gptq", "calib-tokens": value}}])
    path = write(tmp_path, doc)
    with pytest.raises(RecipeError, match=match):
        load_recipe(path)
    res = runner.invoke(main, ["recipe", "check", path])
    assert res.exit_code == 2 and "error:" in res.output and "internal error" not in res.output, res.output
    doc = base(steps=[{"quantize": {"scheme": "int4", "method": "gptq"}, "sweep": {"calib-tokens": [256, value]}}])
    with pytest.raises(RecipeError, match=match.replace("option", "sweep: option")):
        load_recipe(write(tmp_path, doc))


@pytest.mark.parametrize("key,value,match", [
    ("tokens", 0, "eval: 'tokens' must be at least 2"),
    ("tokens", 1, "eval: 'tokens' must be at least 2"),
    ("tokens", -5, "eval: 'tokens' must be at least 2"),
    ("tokenizer", "bogus", "eval: unknown tokenizer 'bogus'; known: auto"),
    ("encoding", "bogus", "eval: 'encoding' unknown encoding: bogus"),
], ids=["tokens0", "tokens1", "tokens-5", "tokenizer", "encoding"])
def test_eval_values_are_checked_with_the_recipe(tmp_path, key, value, match):
    """recipe check passed them; recipe run then failed measuring the source ('perplexity needs at
    least 2 tokens, the text gives 0' for tokens 0; tokens -5 scored all but the last 5 tokens of
    the text, then every stage failed on --eval-tokens -5)."""
    doc = base()
    doc["eval"][key] = value
    path = write(tmp_path, doc)
    with pytest.raises(RecipeError, match=match):
        load_recipe(path)
    res = runner.invoke(main, ["recipe", "run", path, "--out", str(tmp_path / "out")])
    assert res.exit_code == 2 and "error:" in res.output and "internal error" not in res.output, res.output
    assert not (tmp_path / "out").exists()


def test_a_stage_whose_own_gate_fails_stops_the_pipeline_and_leaves_no_stale_model(tmp_path):
    """A step's command refusing by its own gate (exit 1, no DST written) was an internal error
    (the recipe measured a file that was never made); now the stage is failed in the reports, the
    later steps are listed as not run, and an output left by an earlier run with other options is
    not passed off as this stage's."""
    out = tmp_path / "out"
    steps = [{"lowrank": {"rank": 0.5, "max-ppl-increase": 1e6}}, {"eval": {}}, {"quantize": {"scheme": "int8"}}]
    res = runner.invoke(main, ["recipe", "run", write(tmp_path, base(steps=steps)), "--out", str(out)])
    assert res.exit_code == 0, res.output[-2000:]
    assert (out / "01-lowrank.safetensors").exists() and (out / "03-quantize.safetensors").exists()
    steps[0]["lowrank"]["max-ppl-increase"] = -50.0   # halving the channel-mix cannot halve the perplexity
    res = runner.invoke(main, ["recipe", "run", write(tmp_path, base(steps=steps, gates={"max_ppl_increase": 100.0})),
                               "--out", str(out), "--json"])
    assert res.exit_code == 1, res.output[-2000:]
    assert "internal error" not in res.output
    rep = json.loads(res.stdout)
    q = rep["stages"][1]
    assert q["failed"] is True and q["path"] is None and q["bytes"] is None and q["exit_code"] == 1
    assert "own gate failed" in q["gates"][0]["detail"] and "ppl_increase_pct" in q["gates"][0]["detail"]
    assert q["command_report"]["validation"]["passed"] is False          # the command's figures are kept
    assert [s["stage"] for s in rep["stages"]] == ["source", "01-lowrank"]
    assert rep["not_run"] == ["02-eval", "03-quantize"]
    assert rep["final"] is None and rep["passed"] is False
    assert rep["overall"]["ppl_increase_pct"] is None and not rep["overall"]["gates"][0]["passed"]
    assert not (out / "01-lowrank.safetensors").exists()                 # the earlier run's model is gone
    assert not (out / "01-lowrank.json").exists()
    md = (out / "report.md").read_text()
    assert "| 03-quantize | — | — | — | — | — | not run" in md and "nan" not in md
    assert "| 01-lowrank | — | — | — | — | — | ❌ exit code 1" in md


def test_a_stage_that_errors_does_not_cascade(tmp_path):
    """A step that fails with an error used to hand its never-written output to the next step,
    which failed in turn on a missing file; now the later steps are not run."""
    out = tmp_path / "out"
    (tmp_path / "empty.txt").write_bytes(b"")  # found by recipe check; the command refuses it when it runs
    steps = [{"quantize": {"scheme": "Q8_0"}}, {"convert": {}},
             {"lowrank": {"rank": 0.5, "calib": str(tmp_path / "empty.txt")}}, {"export-onnx": {}}]
    res = runner.invoke(main, ["recipe", "run", write(tmp_path, base(steps=steps)), "--out", str(out)])
    assert res.exit_code == 1 and "internal error" not in res.output, res.output[-2000:]
    assert "stage 03-lowrank failed" in res.output
    rep = json.loads((out / "report.json").read_text())
    assert [s["stage"] for s in rep["stages"]] == ["source", "01-quantize", "02-convert", "03-lowrank"]
    assert rep["not_run"] == ["04-export-onnx"]
    # the command's message, not a missing-file one
    assert "gives 0 tokens" in rep["stages"][3]["gates"][0]["detail"] and rep["stages"][3]["exit_code"] == 2
    assert not any(s.get("failed") for s in rep["stages"][:3])
    assert "Overall: not measured" in (out / "report.md").read_text()


def test_numbers_in_exponent_form_are_numbers(tmp_path):
    """YAML 1.1 (PyYAML's default) reads `1e-3` as text, so a gate written that way was refused
    ('needs a finite number, got '1e-3''); recipes read numbers as YAML 1.2 does."""
    p = tmp_path / "r.yaml"
    p.write_text(f"model: {fixture_path('tiny-rwkv-5v2-730K-FP32.bin')}\n"
                 "gates: {max_ppl_increase: 1e-3, min_size_reduction: .5E-1}\n"
                 "steps:\n  - lowrank: {rank: 5e-1, max-ppl-increase: 1.5e3}\n")
    r = load_recipe(str(p))
    assert r.gates == {"max_ppl_increase": 0.001, "min_size_reduction": 0.05}
    assert r.steps[0].options == {"rank": 0.5, "max-ppl-increase": 1500.0}
    p.write_text(p.read_text().replace("rank: 5e-1", "rank: 1e5x"))   # not a number: still text, refused
    with pytest.raises(RecipeError, match="rank"):
        load_recipe(str(p))


@pytest.mark.parametrize("steps,match", [
    ([{"quantize": {"scheme": "int8", "group-size": 32}}], r"step 1 \(quantize\): --group-size applies to --scheme int4"),
    ([{"quantize": {"scheme": "int4", "act-order": True}}], "--act-order applies to --method gptq"),
    ([{"export-onnx": {"chunk-len": 32}}], r"step 1 \(export-onnx\): --chunk-len applies to --mode sequence"),
    ([{"convert": {"format": "safetensors", "quant": "Q4_0"}}], "--quant applies to GGUF output"),
    ([{"lowrank": {"method": "svd"}, "sweep": {"rank": [0.5, 7.5]}}], r"sweep rank=7.5: rank 7.5 >= 1 is an absolute rank"),
    ([{"recursive": {"blocks": 0}}], "blocks must be a positive integer"),
    ([{"eval": {"max-tokens": 1}}], "--max-tokens must be at least 2"),
    ([{"quantize": {"scheme": "int8"}}, {"heal": {"tokens": 0}}], r"step 2 \(heal\):.*tokens"),
])
def test_check_refuses_what_the_steps_command_would_refuse(tmp_path, steps, match):
    """Options each valid alone but refused by the step's command (its own option check, run by
    `recipe check` on the command line a run would build) passed `recipe check` and failed only
    when the stage ran."""
    path = write(tmp_path, base(steps=steps))
    res = runner.invoke(main, ["recipe", "check", path])
    assert res.exit_code == 2 and "internal error" not in res.output, res.output
    assert re.search(match, res.output), res.output
    with pytest.raises(RecipeError, match=match):
        load_recipe(path)


def test_check_and_run_refuse_missing_inputs_before_any_work(tmp_path):
    """A missing calibration text (or evaluation text, or source model) passed `recipe check` and
    failed its stage after the source and earlier stages had been measured and run."""
    doc = base(steps=[{"quantize": {"scheme": "int8"}},
                      {"quantize": {"scheme": "Q4_0", "method": "gptq", "calib": "texts/nope.txt"}}])
    doc["eval"]["text"] = str(tmp_path / "gone.txt")
    path = write(tmp_path, doc)
    res = runner.invoke(main, ["recipe", "check", path])
    assert res.exit_code == 2, res.output
    assert f"eval text {tmp_path / 'gone.txt'}" in res.output
    assert f"step 2 (quantize) calib {tmp_path / 'texts' / 'nope.txt'}" in res.output   # relative to the recipe
    out = tmp_path / "out"
    res = runner.invoke(main, ["recipe", "run", path, "--out", str(out)])
    assert res.exit_code == 2 and "not found" in res.output and not out.exists(), res.output
    res = runner.invoke(main, ["recipe", "check", path, "--model", str(tmp_path / "m.pth")])
    assert f"source model {tmp_path / 'm.pth'}" in res.output
    # a sweep's path values: expanded like the step's own and checked too
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("calibration text")
    doc = base(steps=[{"quantize": {"scheme": "Q4_0", "method": "gptq"},
                       "sweep": {"calib": ["texts/a.txt", "texts/b.txt"]}}])
    path = write(tmp_path, doc)
    res = runner.invoke(main, ["recipe", "check", path])
    assert res.exit_code == 2 and f"calib {tmp_path / 'texts' / 'b.txt'}" in res.output, res.output
    assert str(tmp_path / "texts" / "a.txt") not in res.output
    r = load_recipe(path)
    assert r.steps[0].sweep == ("calib", [str(tmp_path / "texts" / "a.txt"), str(tmp_path / "texts" / "b.txt")])


def test_check_without_a_model_says_run_needs_one(tmp_path):
    doc = base()
    del doc["model"]
    res = runner.invoke(main, ["recipe", "check", write(tmp_path, doc)])
    assert res.exit_code == 0 and "--model" in res.output, res.output


def test_resume_judges_the_gates_the_recipe_has_now_and_the_text_it_reads_now(tmp_path):
    """A resumed stage kept the verdict of the gate it had when it ran (a gate tightened to fail
    still passed, exit 0); the resume key held the evaluation text's path, not its contents (an
    edited text left every stage measured on the old one); the final model, stamped with the
    recipe after its record was written, was reported at its size before the stamp."""
    text = tmp_path / "t.txt"
    text.write_text((DATA / "wikitext-2-test.txt").read_text()[:20000])
    doc = base(steps=[{"quantize": {"scheme": "int8"}, "gates": {"max_ppl_increase": 50.0}}])
    doc["eval"] = {"text": str(text), "tokens": 512}
    out = tmp_path / "out"
    res = runner.invoke(main, ["recipe", "run", write(tmp_path, doc), "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output[-2000:]
    st = json.loads(res.stdout)["stages"][1]
    assert st["bytes"] == os.path.getsize(st["path"])                 # after the stamp
    doc["steps"][0]["gates"] = {"max_ppl_increase": -50.0}             # int8 cannot halve the perplexity
    res = runner.invoke(main, ["recipe", "run", write(tmp_path, doc), "--out", str(out), "--json"])
    rep = json.loads(res.stdout)
    assert rep["stages"][1]["resumed"] is True and res.exit_code == 1
    assert rep["stages"][1]["gates"][0]["bound"] == -50.0 and not rep["stages"][1]["gates"][0]["passed"]
    del doc["steps"][0]["gates"]
    text.write_text(text.read_text()[::-1])                             # the same path, other contents
    res = runner.invoke(main, ["recipe", "run", write(tmp_path, doc), "--out", str(out), "--json"])
    rep = json.loads(res.stdout)
    assert res.exit_code == 0 and rep["stages"][1]["resumed"] is False, res.output[-2000:]
    assert abs(rep["stages"][1]["ppl_increase_pct"]) < 5               # measured against the new source ppl


def test_an_eval_step_measures_like_every_stage(tmp_path):
    """An eval step got only the recipe's text: not its token budget (it scored the whole text),
    encoding (a UTF-16 text read as UTF-8: ppl 33358 against the source's 2.78) or tokenizer."""
    doc = base(steps=[{"eval": {}}, {"eval": {"max-tokens": 256}}])
    doc["model"] = fixture_path("tiny-rwkv-6v0-3m-Q5_1.bin")
    doc["eval"] = {"text": str(DATA / "wikitext-2-test.txt"), "tokens": 512, "encoding": "utf-16le"}
    res = runner.invoke(main, ["recipe", "run", write(tmp_path, doc), "--out", str(tmp_path / "o"), "--json"])
    assert res.exit_code == 0, res.output[-2000:]
    rep = json.loads(res.stdout)
    src, same, fewer = rep["stages"]
    assert "--encoding utf-16le" in same["command"] and "--max-tokens 512" in same["command"]
    assert abs(same["ppl"] / src["ppl"] - 1) < 1e-6                    # the same measurement as the source's
    assert "--max-tokens 256" in fewer["command"] and "--max-tokens 512" not in fewer["command"]


def test_sizes_count_onnx_external_data(tmp_path):
    doc = base(steps=[{"export-onnx": {"external-data-threshold": 1000}}])
    out = tmp_path / "out"
    res = runner.invoke(main, ["recipe", "run", write(tmp_path, doc), "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output[-2000:]
    st = json.loads(res.stdout)["stages"][1]
    data = out / "01-export-onnx.onnx.data"
    assert data.exists() and st["bytes"] == os.path.getsize(out / "01-export-onnx.onnx") + os.path.getsize(data)


def test_sweep_of_paths_names_stages_by_file_name_and_bare_names_are_recipe_relative(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    for name in ("a.txt", "b.txt"):
        (tmp_path / "sub" / name).write_text("calibration text " * 200)
    doc = base(steps=[{"quantize": {"scheme": "Q4_0", "method": "gptq", "calib-tokens": 256},
                       "sweep": {"calib": ["a.txt", str(tmp_path / "sub" / "b.txt")]}}])
    p = tmp_path / "sub" / "r.yaml"
    p.write_text(yaml.safe_dump(doc))
    monkeypatch.chdir(tmp_path)                       # a.txt is beside the recipe, not in the current folder
    r = load_recipe(str(p))
    assert r.steps[0].sweep[1] == [str(tmp_path / "sub" / "a.txt"), str(tmp_path / "sub" / "b.txt")]
    out = tmp_path / "out"
    res = runner.invoke(main, ["recipe", "run", str(p), "--out", str(out)])
    assert res.exit_code == 0, res.output[-2000:]
    assert sorted(f for f in os.listdir(out) if f.endswith(".bin")) == ["01-quantize-calib-a.txt.bin",
                                                                       "01-quantize-calib-b.txt.bin"]
    assert all(not (out / d).is_dir() for d in os.listdir(out))


@pytest.mark.parametrize("step,match", [
    ({"convert": {"format": "rwkvcpp", "to": "parallel"}}, "always stores rwkv.cpp's own inference form"),
    ({"convert": {"format": "gguf", "rescale-every": 6}}, "--rescale-every applies to the RNN form"),
    ({"export-onnx": {"opset": 99}}, "opset 99 is not supported"),
])
def test_check_refuses_form_and_opset_options(tmp_path, step, match):
    res = runner.invoke(main, ["recipe", "check", write(tmp_path, base(steps=[step]))])
    assert res.exit_code == 2 and match in res.output, res.output


def test_summary_in_a_missing_folder_is_refused_before_running(tmp_path):
    out = tmp_path / "out"
    res = runner.invoke(main, ["recipe", "run", write(tmp_path, base()), "--out", str(out),
                               "--summary", str(tmp_path / "nodir" / "sum.md")])
    assert res.exit_code == 2 and "does not exist" in res.output and "internal error" not in res.output
    assert not out.exists()


# ------------------------------------------------------------------ chaining steps (recipe check)
CHAIN_FORMS = {  # a model of each form, made by the commands themselves from a dense one
    "dense": [],
    "quantized": [["quantize", "--scheme", "int8"]],
    "lowrank": [["lowrank", "--rank", "0.5", "--method", "svd"]],
    "recursive": [["recursive", "--blocks", "1", "--lora-rank", "2"]],
    "recursive-norms": [["recursive", "--blocks", "1", "--share", "norm"]],  # matrices stay per layer, dense
    "onnx": [["export-onnx"]],
}
CHAIN_STEPS = [  # (kind, options) as a recipe writes them
    ("convert", {}), ("convert", {"format": "rwkvcpp"}), ("convert", {"format": "gguf"}),
    ("convert", {"format": "hf"}), ("convert", {"to": "rnn"}),
    ("lowrank", {"rank": 0.5, "method": "svd"}),
    ("recursive", {"blocks": 1, "lora-rank": 2}), ("recursive", {"merge": True}),
    ("recursive", {"blocks": 1, "share": "norm"}), ("recursive", {"blocks": 1, "merge": True}),
    ("recursive", {"blocks": 1, "share": "att"}),
    ("quantize", {"scheme": "int8"}), ("quantize", {"scheme": "Q5_1"}), ("quantize", {"scheme": "Q4_K"}),
    ("quantize", {"scheme": "Q5_1", "output": "gguf"}), ("quantize", {"scheme": "int8", "output": "pth"}),
    ("lowrank", {"rank": 0.5, "method": "svd", "merge": True, "output": "rwkvcpp"}),
    ("recursive", {"merge": True, "output": "gguf"}), ("recursive", {"merge": True, "output": "rwkvcpp"}),
    ("heal", {"tokens": 64, "seq-len": 16, "batch-size": 1, "output": "rwkvcpp"}),
    ("heal", {"tokens": 64, "seq-len": 16, "batch-size": 1, "output": "gguf"}),
    ("heal", {"tokens": 64, "seq-len": 16, "batch-size": 1, "output": "hf"}),
    ("heal", {"tokens": 64, "seq-len": 16, "batch-size": 1}),
    ("heal", {"tokens": 64, "seq-len": 16, "batch-size": 1, "train": "all"}),
    ("export-onnx", {}), ("eval", {"max-tokens": 64}),
]


@pytest.fixture(scope="module")
def chain_models(tmp_path_factory):
    from rwkvtools.random_init import random_checkpoint
    from rwkvtools.io.writers import write_checkpoint
    d = tmp_path_factory.mktemp("chain")
    dense = str(d / "dense.safetensors")
    write_checkpoint(random_checkpoint("7", n_layer=2, n_embd=32, vocab=256, head_size=16, seed=5), dense)
    out = {"dense": dense}
    for form, cmds in CHAIN_FORMS.items():
        for c in cmds:
            dst = str(d / (form + (".onnx" if c[0] == "export-onnx" else ".safetensors")))
            r = runner.invoke(main, [c[0], dense, dst, *c[1:], "--no-validate"])
            assert r.exit_code == 0, r.output
            out[form] = dst
    return out


@pytest.mark.parametrize("form", list(CHAIN_FORMS))
def test_chain_rules_are_what_the_commands_do(chain_models, form, tmp_path):
    """recipe check's table of which step reads which stage (recipes._step_refusal) and what a
    step writes (_forms_after) against the commands themselves: every step of CHAIN_STEPS run,
    through the command line a recipe run builds, on a model of every form. A refusal the table
    predicts must be the command's (never refuse what runs: a recipe check that refused lowrank ->
    recursive --share att, which runs, was a regression); the table may let through what the
    command refuses on details it does not track (the command says so when the step runs)."""
    from rwkvtools import recipes as R
    src = chain_models[form]
    assert R._forms_of_file(src) == {"dense": set(), "recursive-norms": {"recursive"}}.get(form, {form})
    wrong = []
    for i, (kind, opts) in enumerate(CHAIN_STEPS):
        cmd = R._command(kind)
        dst = str(tmp_path / f"out{i}{R._out_ext(kind, opts, src)}")
        args = R._stage_args(cmd, kind, opts, src, dst, str(tmp_path / f"r{i}.json"),
                             {"tokens": 64}, teacher=chain_models["dense"])
        if kind != "eval":
            args.append("--no-validate")
        r = runner.invoke(main, args)
        why = R._step_refusal(kind, opts, R._forms_of_file(src))
        if why is None:
            if r.exit_code != 0:
                assert "Traceback" not in r.output and "internal error" not in r.output, r.output
                continue
            if kind != "eval" and R._forms_of_file(dst) != R._forms_after(kind, opts, R._forms_of_file(src)):
                wrong.append(f"{form} -> {kind} {opts}: wrote {R._forms_of_file(dst)}, the table says "
                             f"{R._forms_after(kind, opts, R._forms_of_file(src))}")
        elif r.exit_code == 0 or "Traceback" in r.output or os.path.exists(dst):
            wrong.append(f"{form} -> {kind} {opts}: the table refuses ({why}), the command: {r.exit_code} {r.output}")
    assert not wrong, "\n".join(wrong)


def test_recipe_check_refuses_a_step_that_cannot_read_the_last(tmp_path):
    src = fixture_path("tiny-rwkv-5v2-730K-FP32.bin")
    p = write(tmp_path, base(model=src, steps=[{"export-onnx": {}}, {"lowrank": {"rank": 0.5}}]))
    r = runner.invoke(main, ["recipe", "check", p])
    assert r.exit_code != 0 and "step 2 (lowrank) cannot run: its input is an .onnx file" in r.output, r.output
    p = write(tmp_path, base(model=src, steps=[{"quantize": {"scheme": "int8"}},
                                               {"quantize": {"scheme": "Q5_1"}, "sweep": None}]))
    r = runner.invoke(main, ["recipe", "run", p, "--out", str(tmp_path / "o")])
    assert r.exit_code != 0 and "step 2 (quantize) cannot run" in r.output and not (tmp_path / "o").exists(), r.output
    p = write(tmp_path, base(model=src, steps=[{"lowrank": {"rank": 0.5}, "sweep": {"merge": [False, True]}},
                                               {"quantize": {"scheme": "Q5_1"}}]))
    assert runner.invoke(main, ["recipe", "check", p]).exit_code == 0  # the sweep goes on from merge=True: dense
    # the source's own form counts: an int8 source cannot be quantized again
    q = str(tmp_path / "q.safetensors")
    assert runner.invoke(main, ["quantize", src, q, "--scheme", "int8", "--no-validate"]).exit_code == 0
    p = write(tmp_path, base(model=q, steps=[{"quantize": {"scheme": "int4"}}]))
    r = runner.invoke(main, ["recipe", "check", p])
    assert r.exit_code != 0 and "quantize needs a dense model, and its input is quantized" in r.output, r.output


@pytest.mark.parametrize("name", ["01-quantize.safetensors", "report.json", "m.pth"])
def test_run_refuses_an_out_folder_that_holds_an_input(tmp_path, name):
    """A model inside --out under a stage's name was deleted as a stale output (the stage then
    failed on the missing file); one named report.json was overwritten by the report."""
    out = tmp_path / "out"
    out.mkdir()
    model = out / name
    model.write_bytes(pathlib.Path(fixture_path("tiny-rwkv-5v2-730K-FP32.bin")).read_bytes())
    before = model.read_bytes()
    p = write(tmp_path, base(model=str(model)))
    r = runner.invoke(main, ["recipe", "run", p, "--out", str(out)])
    assert r.exit_code == 2 and "is the folder of the input" in r.output and "(source model)" in r.output, r.output
    assert model.read_bytes() == before and sorted(x.name for x in out.iterdir()) == [name]
    # an evaluation text (or calibration text) inside --out likewise
    text = out / "t.txt"
    text.write_text("hello world " * 50)
    p = write(tmp_path, base(eval={"text": str(text), "tokens": 64}))
    r = runner.invoke(main, ["recipe", "run", p, "--out", str(out)])
    assert r.exit_code == 2 and "(eval text)" in r.output, r.output


def test_name_and_description_are_text(tmp_path):
    """A list as the name showed up in report.md as its Python repr."""
    with pytest.raises(RecipeError, match="'name' must be text, got list"):
        load_recipe(write(tmp_path, base(name=["a", "b"])))
    with pytest.raises(RecipeError, match="'description' must be text, got dict"):
        load_recipe(write(tmp_path, base(description={"a": 1})))
    assert load_recipe(write(tmp_path, base(name="n", description="d"))).name == "n"
    p = tmp_path / "d.yaml"  # scalars YAML reads as a date or a boolean are text here
    doc = base()
    doc.pop("name")
    p.write_text(yaml.safe_dump(doc) + "name: 2024-05-01\n")
    assert load_recipe(str(p)).name == "2024-05-01"


def _run_json(p, out, code=0):
    r = runner.invoke(main, ["recipe", "run", p, "--out", str(out), "--json"])
    assert r.exit_code == code, r.output[-2000:]
    return json.loads(r.stdout)


def test_size_figures_and_gates_are_of_the_stamped_file(tmp_path):
    """The recipe is stamped into the final model after its figures were taken: with a long
    description the report said 52% smaller and passed the size gate, the file was 23% smaller,
    and a rerun of the same recipe failed the same gate."""
    src = fixture_path("tiny-rwkv-7v0-834K.pth")
    doc = base(model=src, description="x" * 1_500_000, eval={"tokens": 256},
               steps=[{"quantize": {"scheme": "int8", "no-validate": True}, "gates": {"min_size_reduction": 0.4}}],
               gates={"min_size_reduction": 0.4})
    p, out = write(tmp_path, doc), tmp_path / "out"
    first = _run_json(p, out, code=1)
    again = _run_json(p, out, code=1)
    final = out / "01-quantize.safetensors"
    size = final.stat().st_size
    for rep in (first, again):
        st = rep["stages"][1]
        assert st["bytes"] == size
        assert st["size_reduction"] == pytest.approx(1 - size / rep["stages"][0]["bytes"])
        assert rep["overall"]["size_reduction"] == pytest.approx(1 - size / os.path.getsize(src))
        assert rep["passed"] is False and st["gates"][0]["passed"] is False
    assert again["stages"][1]["resumed"] is True
    r = runner.invoke(main, ["recipe", "run", p, "--out", str(tmp_path / "out2")])
    assert f"01-quantize: the recipe stored in its manifest: {(tmp_path / 'out2' / '01-quantize.safetensors').stat().st_size:,} bytes" in r.output, r.output


def test_resume_runs_a_stage_again_when_its_output_was_replaced(tmp_path):
    """Resuming trusted whatever file sat at the stage's path: a plain fp32 copy of the source
    there was reported as the int8 stage (with the int8 record's size reduction), an emptied one
    failed every rerun."""
    doc = base(steps=[{"quantize": {"scheme": "int8", "no-validate": True}}], eval={"tokens": 256})
    p, out = write(tmp_path, doc), tmp_path / "out"
    first = _run_json(p, out)["stages"][1]
    stage = pathlib.Path(first["path"])
    for damage in ("another model", "emptied"):
        if damage == "another model":
            runner.invoke(main, ["convert", fixture_path("tiny-rwkv-5v2-730K-FP32.bin"), str(stage), "--force",
                                 "--no-validate"])
        else:
            stage.write_bytes(b"")
        st = _run_json(p, out)["stages"][1]
        assert st["resumed"] is False and st["bytes"] == first["bytes"] == stage.stat().st_size, damage


def test_a_copied_out_folder_never_writes_to_the_old_one(tmp_path):
    """Stage records held absolute paths: a run in a copy of --out resumed from, and restamped,
    the original folder's model, and named it as its final model."""
    import shutil
    doc = base(steps=[{"quantize": {"scheme": "int8", "no-validate": True}}], eval={"tokens": 256})
    p, a, b = write(tmp_path, doc), tmp_path / "a", tmp_path / "b"
    _run_json(p, a)
    shutil.copytree(a, b)
    a_model = (a / "01-quantize.safetensors").read_bytes()
    doc["description"] = "changed: the stamp changes"
    rep = _run_json(write(tmp_path, doc), b)
    assert (a / "01-quantize.safetensors").read_bytes() == a_model
    assert os.path.dirname(rep["final"]) == str(b) and rep["stages"][1]["resumed"] is False


def _alias_bomb(levels=9):
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, levels)]
    return "\n".join("  " + x for x in lines)


@pytest.mark.parametrize("where", ["eval text", "gate", "flag option"])
def test_yaml_alias_bomb_is_refused_at_once(tmp_path, where):
    """Nine levels of aliases (10^9 values in a few lines) reached the option checks, whose
    messages printed the value: 45-58 s and 2-2.7 GB, then 'out of memory'."""
    use = {"eval text": "eval: {text: *a8}\nsteps: [{quantize: {scheme: int8}}]",
           "gate": "steps: [{quantize: {scheme: int8}, gates: {max_ppl_increase: *a8}}]",
           "flag option": "steps: [{lowrank: {rank: 0.5, merge: *a8}}]"}[where]
    p = tmp_path / "bomb.yaml"
    p.write_text(f"name: t\nmodel: {fixture_path('tiny-rwkv-7v0-834K.pth')}\nanchors:\n{_alias_bomb()}\n{use}\n")
    with pytest.raises(RecipeError, match=r"expands to more than 100,000 values \(YAML aliases\)"):
        load_recipe(str(p))


@pytest.mark.parametrize("text,match", [
    ("name: t\nsteps: " + "[" * 10000 + "]" * 10000 + "\n", "nested too deeply"),
    ("name: t\neval: {tokens: " + "9" * 5000 + "}\nsteps: [{quantize: {scheme: int8}}]\n", "not a recipe: Exceeds"),
    ("name: t\nmodel: a\nmodel: b\nsteps: [{quantize: {scheme: int8}}]\n",
     "the key 'model' is given twice in one mapping \\(lines 2 and 3\\)"),
    ("name: t\nsteps: [{quantize: {scheme: int8}, gates: {max_ppl_increase: 1, max_ppl_increase: 2}}]\n",
     "the key 'max_ppl_increase' is given twice"),
    ("name: t\nsteps: [{quantize: {scheme: int4, method: gptq, calib-tokens: 100, calib_tokens: 200}}]\n",
     "option 'calib-tokens' is given twice \\('calib-tokens' and 'calib_tokens'\\)"),
    ("name: t\nsteps: [{quantize: {scheme: int4, group-size: 32}, sweep: {group_size: [32, 64]}}]\n",
     "option 'group_size' is both set on the step and swept"),
])
def test_yaml_that_was_an_internal_error_or_silently_misread_is_refused(tmp_path, text, match):
    """Deep nesting and a 5000-digit number were internal errors (RecursionError, ValueError); a
    key given twice kept the last one; an option in both spellings reached the command twice; a
    sweep silently overrode the step's value."""
    p = tmp_path / "r.yaml"
    p.write_text(text)
    with pytest.raises(RecipeError, match=match):
        load_recipe(str(p))


def test_yaml_errors_are_one_line_and_large_files_are_refused_unread(tmp_path):
    p = tmp_path / "multi.yaml"
    p.write_text("name: t\n---\nname: u\n")
    r = runner.invoke(main, ["recipe", "check", str(p)])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and r.output.startswith("error:"), r.output
    big = tmp_path / "big.yaml"
    with open(big, "w") as f:
        f.truncate(500 << 20)   # sparse: nothing is read
    with pytest.raises(RecipeError, match="524,288,000 bytes is not a recipe"):
        load_recipe(str(big))


def test_integers_are_yaml_1_2(tmp_path):
    """`tokens: 010000` was the octal 4096 (YAML 1.1); `1:08:16` (base 60) too. YAML 1.2 reads
    010000 as ten thousand and the others as text (refused where a number is needed)."""
    p = tmp_path / "n.yaml"
    p.write_text(pathlib.Path(write(tmp_path, base())).read_text().replace("tokens: 1024", "tokens: 010000"))
    assert load_recipe(str(p)).eval["tokens"] == 10000
    p.write_text(pathlib.Path(write(tmp_path, base())).read_text().replace("tokens: 1024", "tokens: 1:08:16"))
    with pytest.raises(RecipeError, match="eval: 'tokens' must be int, got '1:08:16'"):
        load_recipe(str(p))
    from rwkvtools.recipes import _Loader
    assert yaml.load("[0o17, 0x1F, -3, +4, 1e-3, .inf]", Loader=_Loader) == [15, 31, -3, 4, 0.001, float("inf")]


def test_relative_paths_are_the_recipes_and_unset_variables_are_refused(tmp_path, monkeypatch):
    """A relative path the recipe's folder lacks was looked up in the current folder (so a recipe
    meant something else depending on where it ran); an unset ${VAR} became '' (no evaluation
    text: the packaged one was scored without a word). A variable from the shell is the user's
    path, relative to where the command runs."""
    (tmp_path / "r").mkdir()
    (tmp_path / "cwd.txt").write_text("hello world " * 20)
    monkeypatch.chdir(tmp_path)
    doc = base(eval={"text": "cwd.txt", "tokens": 64})
    p = tmp_path / "r" / "rel.yaml"
    p.write_text(yaml.safe_dump(doc))
    r = runner.invoke(main, ["recipe", "check", str(p)])
    assert r.exit_code == 2 and f"not found: eval text {tmp_path / 'r' / 'cwd.txt'}" in r.output, r.output
    doc["eval"]["text"] = "${RT_TEXT}"
    p.write_text(yaml.safe_dump(doc))
    monkeypatch.delenv("RT_TEXT", raising=False)
    with pytest.raises(RecipeError, match=r"rel.yaml: '\$\{RT_TEXT\}': the environment variable RT_TEXT is not set"):
        load_recipe(str(p))
    monkeypatch.setenv("RT_TEXT", "cwd.txt")
    assert load_recipe(str(p)).eval["text"] == "cwd.txt"
    r = runner.invoke(main, ["recipe", "check", str(p)])
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("ev,match", [
    ({"text": str(DATA)}, "is a folder"),
    ({"text": "EMPTY"}, "0 token\\(s\\); perplexity needs at least 2"),
    ({"text": "BINARY"}, "not UTF-8 text"),
    ({"tokenizer": "neox"}, "20B_tokenizer.json"),
    ({"tokenizer": "world"}, "outside the model's vocab 256"),
])
def test_check_refuses_an_evaluation_text_the_run_cannot_score(tmp_path, ev, match):
    """`recipe check` said ok; `run` failed when it measured the source."""
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "bin.txt").write_bytes(bytes(range(128, 256)) * 20)
    ev = {k: {"EMPTY": str(tmp_path / "empty.txt"), "BINARY": str(tmp_path / "bin.txt")}.get(v, v) for k, v in ev.items()}
    p = write(tmp_path, base(eval={**ev, "tokens": 256}))
    r = runner.invoke(main, ["recipe", "check", p])
    assert r.exit_code == 2 and r.output.startswith("error:") and "internal error" not in r.output, r.output
    assert re.search(match, r.output), r.output


def test_gates_a_step_can_measure(tmp_path):
    """max_logit_drift on a step with no-validate passed check and failed every run ('was not
    measured'); on convert, which measures it, check refused it."""
    doc = base(steps=[{"quantize": {"scheme": "int8", "no-validate": True}, "gates": {"max_logit_drift": 100}}])
    with pytest.raises(RecipeError, match="gate 'max_logit_drift' needs the metric 'logit_drift', which this step"):
        load_recipe(write(tmp_path, doc))
    # a recipe-wide gate is not a step's: its message says what it is measured on
    doc = base(gates={"max_logit_drift": 3})
    with pytest.raises(RecipeError, match=r"gates: gate 'max_logit_drift' needs the metric 'logit_drift', which the "
                                          r"recipe's overall result \(the final file against the source\) does not"):
        load_recipe(write(tmp_path, doc))
    doc = base(eval={"tokens": 256}, steps=[{"convert": {}, "gates": {"max_logit_drift": 1e-6}}])
    rep = _run_json(write(tmp_path, doc), tmp_path / "out")
    assert rep["stages"][1]["logit_drift"] == 0 and rep["stages"][1]["gates"][0]["passed"] is True


def test_long_sweep_values_make_short_distinct_stage_names():
    """A sweep value of 300 characters became a 300-character file name: an internal error
    (File name too long) when the stage ran."""
    from rwkvtools.recipes import _label_value
    a, b = _label_value("a" * 300), _label_value("a" * 299 + "b")
    assert len(a) <= 40 and len(b) <= 40 and a != b and a.startswith("a" * 31)
    assert _label_value("0.32") == "0.32" and _label_value("/x/cal.txt") == "cal.txt"


def test_check_without_a_model_refuses_only_what_the_steps_make(tmp_path):
    """A recipe without a model (given by --model at run time) whose step is a heal of low-rank
    factors was refused by `recipe check` as if the source were dense; it passes with a
    low-rank --model, so check must not assume what the source lacks."""
    doc = {"name": "t", "steps": [{"heal": {"train": "lowrank"}}]}
    p = write(tmp_path, doc)
    r = runner.invoke(main, ["recipe", "check", p])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["recipe", "check", p, "--model", fixture_path("tiny-rwkv-5v2-730K-FP32.bin")])
    assert r.exit_code == 2 and "heal trains LoRA or low-rank factors" in r.output, r.output
    doc["steps"] = [{"quantize": {"scheme": "int8"}}, {"heal": {"train": "lowrank"}}]   # what a step made still counts
    r = runner.invoke(main, ["recipe", "check", write(tmp_path, doc)])
    assert r.exit_code == 2 and "heal trains float tensors" in r.output, r.output


def test_underscored_integers_and_an_unset_model_overridden_by_model(tmp_path, monkeypatch):
    """`tokens: 1_024` (a YAML 1.1 digit group) became text and was refused; `model: ${VAR}` with
    VAR unset was refused even when --model gave the source."""
    p = tmp_path / "u.yaml"
    p.write_text(pathlib.Path(write(tmp_path, base())).read_text().replace("tokens: 1024", "tokens: 1_024"))
    assert load_recipe(str(p)).eval["tokens"] == 1024
    monkeypatch.delenv("RT_MODEL", raising=False)
    q = write(tmp_path, base(model="${RT_MODEL}"))
    r = runner.invoke(main, ["recipe", "check", q, "--model", fixture_path("tiny-rwkv-5v2-730K-FP32.bin")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["recipe", "check", q])
    assert r.exit_code == 2 and "RT_MODEL is not set" in r.output and "or pass --model" in r.output, r.output


def test_step_output_chooses_the_stage_files_format(tmp_path):
    """Q4_0..Q8_0 go to rwkv.cpp's .bin by default; 'output: gguf' writes GGUF (the recipe could
    not: it read a 'format' option quantize does not have). Checked like any option."""
    src = fixture_path("tiny-rwkv-7v0-834K.pth")
    p = write(tmp_path, base(model=src, eval={"tokens": 256},
                             steps=[{"quantize": {"scheme": "Q5_1", "output": "gguf", "no-validate": True}},
                                    {"quantize": {"scheme": "Q5_1", "no-validate": True}}]))
    out = tmp_path / "o"
    r = runner.invoke(main, ["recipe", "run", p, "--out", str(out)])
    assert r.exit_code == 0, r.output[-2000:]
    from rwkvtools.io import sniff
    assert sniff(str(out / "01-quantize.gguf")) == "gguf" and sniff(str(out / "02-quantize.bin")) == "rwkvcpp"
    for step, match in (({"quantize": {"scheme": "Q5_1", "output": "onnx"}}, "option 'output' .* is one of"),
                        ({"quantize": {"scheme": "Q5_1", "output": ["gguf"]}}, "option 'output' .* is one of"),
                        ({"quantize": {"scheme": "Q5_1", "output": {"a": 1}}}, "option 'output' .* is one of"),
                        ({"convert": {"output": "gguf"}}, "unknown option 'output' for 'convert'"),
                        ({"quantize": {"scheme": "Q4_K", "output": "rwkvcpp"}}, r"\.gguf")):
        with pytest.raises(RecipeError, match=match):
            load_recipe(write(tmp_path, base(model=src, steps=[step])))

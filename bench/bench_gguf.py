"""GGUF quality benchmark: file size and perplexity of our GGUF files (f16, Q8_0, Q4_0, Q4_K; RTN
and GPTQ) against llama.cpp's own quantizer at the same settings, evaluated by llama.cpp itself
(llama-cpp-python) and by rwkvtools on the dequantized file.

    python bench/bench_gguf.py                       # v7 fixture (needs ../shared)
    python bench/bench_gguf.py --models fixture,0.1b # + a 0.1B-shaped random v7 (World vocab)

Prints one table per model and, with --json, one JSON object. Not a test.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys
import time

import torch

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from rwkvtools.io import read_checkpoint  # noqa: E402
from rwkvtools.io.gguf_io import write_gguf  # noqa: E402

SHARED = pathlib.Path(os.environ.get("RWKVTOOLS_SHARED", REPO.parent / "shared"))


def our_ppl(path, tokens):
    from rwkvtools.model import build_model
    from rwkvtools.validate import perplexity
    with torch.no_grad():
        return perplexity(build_model(read_checkpoint(str(path))), tokens, chunk_len=1024, progress=False).ppl


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="fixture", help="comma list: fixture, 0.1b")
    ap.add_argument("--tokens", type=int, default=8192, help="evaluation tokens (fixture; 0.1b uses --tokens-01b)")
    ap.add_argument("--tokens-01b", type=int, default=1024)
    ap.add_argument("--calib-tokens", type=int, default=2048, help="GPTQ calibration tokens")
    ap.add_argument("--calib", default=None, help="GPTQ calibration text (default: the packaged calib text)")
    ap.add_argument("--gptq-types", default="Q8_0,Q4_0,Q4_K", help="comma list of types to GPTQ")
    ap.add_argument("--baselines", default="f32,f16,rtn,llamacpp",
                    help="comma list of the non-GPTQ rows to make: f32, f16, rtn, llamacpp (f32 is always written)")
    ap.add_argument("--out", default="/tmp/bench_gguf")
    ap.add_argument("--no-gptq", action="store_true")
    ap.add_argument("--no-ours-eval", action="store_true", help="skip rwkvtools' own evaluation of each file")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    import llamacpp_runner as lc
    have_lc = lc.available()
    results = {}
    for model in args.models.split(","):
        results[model] = run_model(model.strip(), args, lc if have_lc else None)
    if args.json:
        print(json.dumps(results, indent=2))


def model_and_tokens(model, args):
    if model == "fixture":
        ck = read_checkpoint(str(SHARED / "fixtures" / "tiny-rwkv-7v0-834K.pth"))
        toks = list((SHARED / "data" / "wikitext-2-test.txt").read_bytes()[:args.tokens])
        return ck, toks, "f32", "wikitext-2-test bytes [0, %d)" % args.tokens
    if model == "0.1b":
        from rwkvtools.random_init import random_checkpoint
        from rwkvtools.tokenizer import Tokenizer
        ck = random_checkpoint("7", n_layer=12, n_embd=768, vocab=65536, head_size=64, seed=0)
        text = (SHARED / "data" / "wikitext-2-test.txt").read_text(encoding="utf-8")[:40000]
        toks = Tokenizer("world", 65536).encode(text)[:args.tokens_01b]
        return ck, toks, "f16", f"wikitext-2-test, first {len(toks)} World tokens"
    raise SystemExit(f"unknown model {model}")


def run_model(model, args, lc):
    ck, toks, eh, what = model_and_tokens(model, args)
    d = pathlib.Path(args.out) / model
    d.mkdir(parents=True, exist_ok=True)
    EH = eh.upper()
    rows = []

    def add(name, path, producer, method, note=""):
        row = {"variant": name, "producer": producer, "method": method, "bytes": os.path.getsize(path), "note": note}
        t0 = time.time()
        if lc is not None:
            nl = lc.nll(str(path), toks, threads=args.threads)
            row["ppl_llamacpp"] = float(math.exp(nl.mean()))
        if not args.no_ours_eval:
            row["ppl_rwkvtools"] = float(our_ppl(path, toks))
        row["eval_s"] = round(time.time() - t0, 1)
        rows.append(row)
        print(f"  {name:<34} {producer:<10} {method:<5} {row['bytes']:>12,}  "
              f"llama.cpp {row.get('ppl_llamacpp', float('nan')):>12.6f}  rwkvtools {row.get('ppl_rwkvtools', float('nan')):>12.6f}"
              f"  {note}", flush=True)

    print(f"\n== {model}: {ck.num_params():,} parameters; text: {what}; embedding/head kept {EH}; "
          f"llama.cpp {'available' if lc else 'NOT available (rwkvtools eval only)'}")
    f32 = d / "f32.gguf"
    write_gguf(ck, str(f32), dtype="f32")
    base = set(args.baselines.split(","))
    if "f32" in base:
        add("f32", f32, "rwkvtools", "-")
    if "f16" in base:
        f16 = d / "f16.gguf"
        write_gguf(ck, str(f16), dtype="f16")
        add("f16", f16, "rwkvtools", "-")
    for q in (("Q8_0", "Q4_0", "Q4_K") if "rtn" in base else ()):
        p = d / f"ours-{q}-rtn.gguf"
        rep = write_gguf(ck, str(p), quant=q, embed_type=eh, head_type=eh)
        fb = f"{len(rep['fallbacks'])} demoted to {sorted({f['written'] for f in rep['fallbacks']})}" if rep["fallbacks"] else ""
        add(f"{q} emb/head {EH}", p, "rwkvtools", "rtn", fb)
    if not args.no_gptq:
        from rwkvtools.transforms.quantize import QuantizeConfig, QuantizeError, calibration_tokens, quantize
        calib = calibration_tokens(args.calib, ck.shape("emb.weight")[0], args.calib_tokens)
        for q in args.gptq_types.split(","):
            try:
                cfg = QuantizeConfig(scheme=q, method="gptq", calib_tokens=args.calib_tokens, target="gguf")
            except QuantizeError as e:
                print(f"  {q} gptq: not available ({e})")
                continue
            t0 = time.time()
            qck = quantize(ck, cfg, calib)
            p = d / f"ours-{q}-gptq.gguf"
            write_gguf(qck, str(p), embed_type=eh, head_type=eh, dtype="f32")
            add(f"{q} emb/head {EH}", p, "rwkvtools", "gptq", f"GPTQ {time.time() - t0:.0f}s on {len(calib)} calib tokens")
    if lc is not None and "llamacpp" in base:
        for ft in ("Q8_0", "Q4_0", "Q4_K_M"):
            p = d / f"llamacpp-{ft}-alike.gguf"
            lc.quantize(str(f32), str(p), ft, embed=EH, output=EH, threads=args.threads)
            add(f"{ft} emb/head {EH}", p, "llama.cpp", "rtn", "llama_model_quantize, same emb/head")
            if ft == "Q4_0":
                p = d / f"llamacpp-{ft}-default.gguf"
                lc.quantize(str(f32), str(p), ft, threads=args.threads)
                add(f"{ft} llama.cpp defaults", p, "llama.cpp", "rtn", "emb/head quantized by llama.cpp's rules")
    return {"parameters": ck.num_params(), "text": what, "tokens": len(toks), "rows": rows}


if __name__ == "__main__":
    main()

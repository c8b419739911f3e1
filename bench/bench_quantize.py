"""Benchmark of `rwkvtools quantize` (issue 7): quality, memory/speed, ONNX per-token latency.

    python bench/bench_quantize.py quality [--eval-bytes 8192] [--calib-bytes 8192] [--slices 8]
                                           [--tune-steps 200] [--tune-bytes 262144] [--only Q4_0[:tune]]
    python bench/bench_quantize.py memory  [--tokens 2048] [--repeats 2]
    python bench/bench_quantize.py onnx    [--steps 64]
    python bench/bench_quantize.py all

quality: the trained v5.2 fixture (tiny-rwkv-5v2-730K-FP32.bin), perplexity on the first 8192
bytes of wikitext-2-test, every scheme x {rtn, gptq} (gptq calibrated on the first 8192 bytes of
wikitext-2-valid), bits per weight of the quantized matrices and the size of the written file,
beside rwkv.cpp's own files measured by rwkv.cpp (numbers from the issue); rows with scale tuning
(--tune-steps, on the first --tune-bytes of wikitext-2-valid); --slices N adds the mean increase
over the first N slices of --eval-bytes of the test text (the goal is on the first).

memory: a random RWKV-7 of the 0.1B shape (12 layers, dim 768, vocab 65536): bytes the model's
block matrices occupy in memory (embedding and head counted apart), peak RSS and tokens/s of
`perplexity` (chunks of 1024) for fp32, int8 and int4, each in its own process.

onnx: the same model, int4 (g64; also with the head in int4) exported as an ONNX step graph and
run token by token in onnxruntime (CPU), against ChatRWKV's fp32 token loop (rwkv 0.8.32).
Needs ../shared (quality), onnxruntime and ChatRWKV's package (onnx)."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
SHARED = os.environ.get("RWKVTOOLS_SHARED", os.path.join(os.path.dirname(ROOT), "shared"))

# rwkv.cpp's perplexity of its own files on the first 8192 bytes of wikitext-2-test (issue 7)
RWKVCPP = {"FP32": 10.9991, "Q8_0": 11.0027, "Q5_1": 11.1461, "Q5_0": 11.0857, "Q4_0": 11.1183, "Q4_1": 11.5566}


# ------------------------------------------------------------------------------------- quality
def quality(args):
    from rwkvtools.io import read_checkpoint
    from rwkvtools.model import build_model
    from rwkvtools.transforms.quantize import QuantizeConfig, quantize, write_quantized
    from rwkvtools.validate import perplexity
    fx = os.path.join(SHARED, "fixtures", "tiny-rwkv-5v2-730K-FP32.bin")
    test = open(os.path.join(SHARED, "data", "wikitext-2-test.txt"), "rb").read()
    ev = list(test[:args.eval_bytes])
    # more slices of the test text (the goal is on the first): how much of a difference is luck
    slices = [list(test[i * args.eval_bytes:(i + 1) * args.eval_bytes]) for i in range(1, args.slices)]
    valid = open(os.path.join(SHARED, "data", "wikitext-2-valid.txt"), "rb").read()
    cal = list(valid[:max(args.calib_bytes, args.tune_bytes)])   # gptq: the first calib-bytes; tuning: all
    src = read_checkpoint(fx).materialize()
    m0 = build_model(src)
    p0 = perplexity(m0, ev).ppl
    s0 = [perplexity(m0, x).ppl for x in slices]
    tmp = tempfile.mkdtemp(prefix="rwkvq-")
    rows = [("fp32 (source)", "-", None, p0, os.path.getsize(fx), RWKVCPP["FP32"], None, 0.0)]
    variants = [("int8", {}), ("int4", {"group_size": 32}), ("int4", {"group_size": 64}),
                ("Q4_0", {}), ("Q4_1", {}), ("Q5_0", {}), ("Q5_1", {}), ("Q8_0", {})]
    extra = [("int4", {"group_size": 64, "clip": True}, "rtn"),
             ("int4", {"group_size": 64, "clip": True}, "gptq"),
             ("int4", {"group_size": 64, "act_order": True}, "gptq"),
             ("int4", {"group_size": 64, "act_order": True, "clip": True}, "gptq"),
             ("Q4_0", {"clip": True}, "gptq"), ("Q4_0", {"act_order": True}, "gptq")]
    if args.tune_steps:
        tune = {"tune_steps": args.tune_steps, "tune_tokens": args.tune_bytes}
        extra += [("Q4_0", dict(tune), "gptq"), ("Q4_0", dict(tune), "rtn"),
                  ("int4", {"group_size": 64, **tune}, "gptq"), ("Q5_0", dict(tune), "gptq")]
    runs = [(s, o, m) for s, o in variants for m in ("rtn", "gptq")] + extra
    if args.only:
        runs = [r for r in runs if r[0] == args.only.split(":")[0] and (":" not in args.only or
                                                                         r[1].get("tune_steps"))]
    print(f"v5.2 fixture: fp32 ppl {p0:.4f} on {len(ev)} bytes of wikitext-2-test; gptq calibrated on the first "
          f"{args.calib_bytes} bytes of wikitext-2-valid" + (f", scale tuning on its first {args.tune_bytes}"
                                                             if args.tune_steps else ""), flush=True)
    for scheme, opts, method in runs:
        cfg = QuantizeConfig(scheme, method=method, calib_tokens=args.calib_bytes, **opts)
        t0 = time.perf_counter()
        q = quantize(src, cfg, cal if (method == "gptq" or cfg.tuning) else None)
        dt = time.perf_counter() - t0
        ext = ".bin" if cfg.is_ggml else ".safetensors"
        path = os.path.join(tmp, f"q{ext}")
        write_quantized(q, path)
        size = os.path.getsize(path)
        m = build_model(read_checkpoint(path))
        p = perplexity(m, ev).ppl
        more = [100 * (perplexity(m, x).ppl / b - 1) for x, b in zip(slices, s0)]
        label = scheme + (f" g{cfg.group_size}" if scheme == "int4" else "") + \
            "".join(f" +{k}" for k in ("act_order", "clip") if opts.get(k)) + (" +tune" if cfg.tuning else "")
        ref = RWKVCPP.get(scheme) if method == "rtn" and not opts else None
        inc = 100 * (p / p0 - 1)
        mean = (inc + sum(more)) / (1 + len(more))
        rows.append((label, method, q.manifest["quantized"]["bits_per_weight"], p, size, ref, dt, mean))
        tl = q.manifest["quantized"].get("tuning")
        tinfo = (f"  held-out KL {tl['heldout_kl_before']:.4f} -> {tl['heldout_kl_after']:.4f}"
                 f"{'' if tl['kept'] else ' (not kept)'}") if tl else ""
        print(f"  {label:22s} {method:4s} ppl {p:.4f} ({inc:+.3f}%)" +
              (f"  mean over {1 + len(more)} slices {mean:+.3f}%" if more else "") + f"  {dt:.1f} s{tinfo}", flush=True)
    print()
    ms = f" mean increase, {args.slices} slices |" if slices else ""
    print(f"| scheme | method | bits/weight (quantized matrices) | file bytes | ppl | increase |{ms} rwkv.cpp ppl (its increase) |")
    print("| --- | --- | --- | --- | --- | --- | --- |" + (" --- |" if slices else ""))
    for label, method, bpw, p, size, ref, _, mean in rows:
        refs = f"{ref:.4f} ({100 * (ref / RWKVCPP['FP32'] - 1):+.3f}%)" if ref else ""
        mcol = f" {mean:+.3f}% |" if slices else ""
        print(f"| {label} | {method} | {'' if bpw is None else f'{bpw:.3f}'} | {size:,} | {p:.4f} | "
              f"{100 * (p / p0 - 1):+.3f}% |{mcol} {refs} |")
    q40 = 100 * (RWKVCPP["Q4_0"] / RWKVCPP["FP32"] - 1)
    best4 = min((r for r in rows if r[2] is not None and r[2] <= 4.5), key=lambda r: r[3])
    i8 = [r for r in rows if r[0] == "int8"]
    print()
    print(f"goal 4-bit <= 4.5 bpw loses <= half of rwkv.cpp Q4_0 ({q40 / 2:.3f}%): best {best4[0]} {best4[1]} "
          f"{100 * (best4[3] / p0 - 1):+.3f}% -> {'met' if 100 * (best4[3] / p0 - 1) <= q40 / 2 else 'NOT met'}")
    print("goal int8 loses <= 0.05%: " + ", ".join(f"{r[1]} {100 * (r[3] / p0 - 1):+.3f}%" for r in i8) + " -> "
          + ("met" if all(100 * (r[3] / p0 - 1) <= 0.05 for r in i8) else "NOT met"))


# -------------------------------------------------------------------------------------- memory
CHILD = r"""
import json, os, sys, time, torch
sys.path.insert(0, sys.argv[4])
torch.set_num_threads(int(sys.argv[5]))
from rwkvtools import load
from rwkvtools.validate import perplexity
def status(key):  # VmHWM, not ru_maxrss: ru_maxrss keeps the forking parent's peak across exec
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
def rss():
    return status("VmRSS")
base = rss()
m = load(sys.argv[1])
built = rss()
blocks = sum(t.numel() * t.element_size() for b in m.blocks for mod in b.modules() if hasattr(mod, "prefix")
             for t in list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False)))
toks = torch.randint(0, 65536, (int(sys.argv[2]),), generator=torch.Generator().manual_seed(0)).tolist()
best = 0.0
for _ in range(int(sys.argv[3])):
    r = perplexity(m, toks, chunk_len=1024, progress=False)
    best = max(best, r.tokens_per_s)
print(json.dumps({"rss_before_load": base, "rss_after_build": built, "peak_rss": status("VmHWM"),
                  "block_linear_bytes": blocks, "tokens_per_s": best}))
"""


def _model_0p1b(tmp):
    from rwkvtools.io.pth import write_pth
    from rwkvtools.random_init import random_checkpoint
    ck = random_checkpoint("7", 12, 768, 65536, 64, seed=0)
    pth = os.path.join(tmp, "rwkv7-0.1b.pth")
    write_pth(ck, pth)
    return ck, pth


def memory(args, tmp=None, ck=None):
    from rwkvtools.io.writers import write_checkpoint
    from rwkvtools.transforms.quantize import QuantizeConfig, quantize, write_quantized
    tmp = tmp or tempfile.mkdtemp(prefix="rwkvq-")
    if ck is None:
        ck, _ = _model_0p1b(tmp)
    files = {"fp32": os.path.join(tmp, "fp32.safetensors")}
    write_checkpoint(ck, files["fp32"])
    for s in ("int8", "int4"):
        files[s] = os.path.join(tmp, f"{s}.safetensors")
        write_quantized(quantize(ck, QuantizeConfig(s, group_size=64)), files[s])
    res = {k: [] for k in files}
    for _ in range(args.repeats):           # interleaved runs: the machine is shared
        for k, f in files.items():
            r = subprocess.run([sys.executable, "-c", CHILD, f, str(args.tokens), "1", ROOT, str(args.threads)],
                               capture_output=True, text=True, check=True)
            res[k].append(json.loads(r.stdout.strip().splitlines()[-1]))
    print(f"RWKV-7 0.1B shape (L=12, C=768, F=3072, V=65536), eval of {args.tokens} tokens in chunks of 1024, "
          f"torch threads {args.threads}, {args.repeats} interleaved runs per model (best tokens/s, max peak RSS)")
    fp = res["fp32"][0]["block_linear_bytes"]
    print("| model | file bytes | block matrices in memory | vs fp32 | peak RSS | tokens/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for k, rs in res.items():
        b = rs[0]["block_linear_bytes"]
        print(f"| {k} | {os.path.getsize(files[k]):,} | {b / 1e6:.1f} MB | {b / fp:.3f}x | "
              f"{max(r['peak_rss'] for r in rs) / 1e6:.0f} MB | {max(r['tokens_per_s'] for r in rs):.1f} |")
    t = {k: max(r["tokens_per_s"] for r in rs) for k, rs in res.items()}
    r8 = res["int8"][0]["block_linear_bytes"] / fp
    r4 = res["int4"][0]["block_linear_bytes"] / fp
    print(f"goal int8 <= 0.27x: {r8:.3f}x {'met' if r8 <= 0.27 else 'NOT met'}; int4 <= 0.16x: {r4:.3f}x "
          f"{'met' if r4 <= 0.16 else 'NOT met'}; int8 eval no slower than fp32: {t['int8']:.1f} vs {t['fp32']:.1f} "
          f"tokens/s {'met' if t['int8'] >= t['fp32'] else 'NOT met'}")
    return tmp, ck


# ---------------------------------------------------------------------------------------- onnx
CR_LOOP = r"""
import os, sys, time, json
os.environ["RWKV_V7_ON"] = "1"; os.environ.setdefault("RWKV_JIT_ON", "1"); os.environ.setdefault("RWKV_CUDA_ON", "0")
import torch
torch.set_num_threads(int(sys.argv[3]))
from rwkv.model import RWKV
path, n = sys.argv[1], int(sys.argv[2])
m = RWKV(model=path[:-4], strategy="cpu fp32")
toks = torch.randint(0, 65536, (n + 4,), generator=torch.Generator().manual_seed(0)).tolist()
st = None
for x in toks[:4]:
    o, st = m.forward([x], st)
t = time.perf_counter()
for x in toks[4:]:
    o, st = m.forward([x], st)
print(json.dumps({"ms_per_token": 1000 * (time.perf_counter() - t) / n}))
"""

ORT_LOOP = r"""
import json, sys, time
import numpy as np, onnxruntime as ort
so = ort.SessionOptions(); so.intra_op_num_threads = int(sys.argv[3])
s = ort.InferenceSession(sys.argv[1], so, providers=["CPUExecutionProvider"])
n = int(sys.argv[2])
feeds = {i.name: np.zeros([1 if d in ("batch",) else d for d in i.shape], np.float32) for i in s.get_inputs() if i.name != "tokens"}
names = [o.name for o in s.get_outputs()]
rng = np.random.default_rng(0)
toks = rng.integers(0, 65536, n + 4)
def step(t):
    global feeds
    out = dict(zip(names, s.run(None, {"tokens": np.array([[t]], np.int64), **feeds})))
    feeds = {k.replace("state_out_", "state_in_"): v for k, v in out.items() if k.startswith("state_out_")}
for t in toks[:4]:
    step(t)
t0 = time.perf_counter()
for t in toks[4:]:
    step(t)
print(json.dumps({"ms_per_token": 1000 * (time.perf_counter() - t0) / n}))
"""


def onnx_latency(args, tmp=None, ck=None):
    from rwkvtools.export import export_onnx
    from rwkvtools.transforms.quantize import QuantizeConfig, quantize
    tmp = tmp or tempfile.mkdtemp(prefix="rwkvq-")
    if ck is None:
        ck, pth = _model_0p1b(tmp)
    else:
        pth = os.path.join(tmp, "rwkv7-0.1b.pth")
        if not os.path.exists(pth):
            from rwkvtools.io.pth import write_pth
            write_pth(ck, pth)
    graphs = {}
    for label, opts, acc in (("int4 g64 (head fp32)", {}, "0"), ("int4 g64 + head int4", {"include": ("head.weight",)}, "0"),
                             ("int4 g64 + head int4, accuracy_level 4", {"include": ("head.weight",)}, "4")):
        q = quantize(ck, QuantizeConfig("int4", group_size=64, **opts))
        path = os.path.join(tmp, f"q{len(graphs)}.onnx")
        os.environ["RWKVTOOLS_MATMULNBITS_ACCURACY"] = acc   # 4: int8 activations (not exact)
        try:
            rep = export_onnx(q, path, mode="step", validate=args.validate and acc == "0", progress=False)
        finally:
            os.environ.pop("RWKVTOOLS_MATMULNBITS_ACCURACY", None)
        graphs[label] = (path, rep["bytes"])
        del q
    fp = os.path.join(tmp, "fp32.onnx")
    rep = export_onnx(ck, fp, mode="step", validate=False, progress=False)
    graphs["fp32 ONNX (reference)"] = (fp, rep["bytes"])
    res = {k: [] for k in graphs}
    res["ChatRWKV fp32 token loop"] = []
    for _ in range(args.repeats):
        for k, (path, _) in graphs.items():
            r = subprocess.run([sys.executable, "-c", ORT_LOOP, path, str(args.steps), str(args.threads)],
                               capture_output=True, text=True, check=True)
            res[k].append(json.loads(r.stdout.strip().splitlines()[-1])["ms_per_token"])
        r = subprocess.run([sys.executable, "-c", CR_LOOP, pth, str(args.steps), str(args.threads)],
                           capture_output=True, text=True)
        if r.returncode == 0:
            res["ChatRWKV fp32 token loop"].append(json.loads(r.stdout.strip().splitlines()[-1])["ms_per_token"])
        else:
            print("ChatRWKV failed:", r.stderr[-800:], file=sys.stderr)
    cr = min(res["ChatRWKV fp32 token loop"]) if res["ChatRWKV fp32 token loop"] else None
    print(f"per-token step latency, batch 1, {args.steps} tokens after 4 warm-up, threads {args.threads}, "
          f"{args.repeats} interleaved runs (best)")
    print("| runtime | model bytes | ms/token | vs ChatRWKV fp32 |")
    print("| --- | --- | --- | --- |")
    for k, v in res.items():
        if not v:
            continue
        b = graphs[k][1] if k in graphs else os.path.getsize(pth)
        print(f"| {k} | {b:,} | {min(v):.2f} | {'' if cr is None else f'{min(v) / cr:.2f}x'} |")
    if cr:
        r = min(res["int4 g64 (head fp32)"]) / cr
        r2 = min(res["int4 g64 + head int4"]) / cr
        r3 = min(res["int4 g64 + head int4, accuracy_level 4"]) / cr
        print(f"goal int4 ONNX <= 0.5x ChatRWKV's per-token time: default {r:.2f}x "
              f"{'met' if r <= 0.5 else 'NOT met'}; with head int4 {r2:.2f}x {'met' if r2 <= 0.5 else 'NOT met'}; "
              f"+ accuracy_level 4 {r3:.2f}x {'met' if r3 <= 0.5 else 'NOT met'}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("part", choices=["quality", "memory", "onnx", "all"])
    ap.add_argument("--eval-bytes", type=int, default=8192)
    ap.add_argument("--calib-bytes", type=int, default=8192)
    ap.add_argument("--tune-steps", type=int, default=200, help="quality: rows with --tune-steps (0: none)")
    ap.add_argument("--tune-bytes", type=int, default=262144, help="quality: calibration bytes for tuning")
    ap.add_argument("--slices", type=int, default=1, help="quality: also the mean over this many test slices")
    ap.add_argument("--only", default=None, help="quality: one scheme (e.g. Q4_0), or Q4_0:tune for its tuned rows")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--validate", action="store_true", help="onnx: validate each export in onnxruntime")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.part in ("quality", "all"):
        quality(args)
    tmp, ck = None, None
    if args.part in ("memory", "all"):
        tmp, ck = memory(args)
    if args.part in ("onnx", "all"):
        onnx_latency(args, tmp, ck)


if __name__ == "__main__":
    main()

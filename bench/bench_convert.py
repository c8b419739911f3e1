"""Convert benchmark: a 1.5B-shaped random RWKV-7 (24 layers, n_embd 2048, vocab 65536, made by
`rwkvtools init`) .pth -> .safetensors -> RNN-form .safetensors. Each step runs in its own
process; prints wall time and peak RSS (ru_maxrss of the child) against the input size.
Goal: peak RSS <= 1.5x the model's size.

usage: python bench/bench_convert.py [--workdir /tmp/rwkv-bench] [--layers 24 --dim 2048 --vocab 65536]
                                    [--keep] [--extra]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def run_step(cmd: list[str]) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    # a fresh child per step: ru_maxrss of RUSAGE_CHILDREN is the max over children, so run each
    # step through a tiny wrapper that reports its own peak
    wrapper = ("import resource,subprocess,sys,json;"
               "r=subprocess.run(sys.argv[1:]);"
               "print(json.dumps({'rc':r.returncode,'maxrss_kb':resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))")
    out = subprocess.run([sys.executable, "-c", wrapper] + cmd, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    del before
    last = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else "{}"
    info = json.loads(last)
    if info.get("rc") != 0:
        sys.stderr.write(out.stdout + out.stderr)
        raise SystemExit(f"step failed: {' '.join(cmd)}")
    return {"seconds": dt, "peak_rss_bytes": info["maxrss_kb"] * 1024}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/rwkv-bench")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=65536)
    ap.add_argument("--keep", action="store_true", help="keep the files")
    ap.add_argument("--extra", action="store_true",
                    help="also: RNN safetensors -> rwkv.cpp FP16 .bin, and .pth -> Hugging Face folder")
    a = ap.parse_args()
    os.makedirs(a.workdir, exist_ok=True)
    pth = os.path.join(a.workdir, "rwkv7.pth")
    st = os.path.join(a.workdir, "rwkv7.safetensors")
    rnn = os.path.join(a.workdir, "rwkv7-rnn.safetensors")
    exe = [sys.executable, "-c", "import sys; from rwkvtools.cli import main; sys.argv[0] = 'rwkvtools'; main()"]
    if not os.path.exists(pth):
        r = run_step(exe + ["init", pth, "--version", "7", "--layers", str(a.layers), "--dim", str(a.dim),
                            "--vocab", str(a.vocab), "--force"])
        print(f"init        {r['seconds']:8.1f} s   peak RSS {r['peak_rss_bytes'] / 2**30:6.2f} GiB")
    size = os.path.getsize(pth)
    print(f"model       {size / 2**30:.2f} GiB ({size:,} bytes), v7 L={a.layers} C={a.dim} V={a.vocab}")
    rows = []
    steps = [("pth -> safetensors", pth, st, []), ("safetensors -> rnn", st, rnn, ["--to", "rnn"])]
    cpp, hf = os.path.join(a.workdir, "rwkv7-FP16.bin"), os.path.join(a.workdir, "rwkv7-hf")
    if a.extra:
        steps += [("rnn -> rwkv.cpp FP16", rnn, cpp, ["--dtype", "fp16"]), ("pth -> hf folder", pth, hf, [])]
    for name, src, dst, extra in steps:
        r = run_step(exe + ["convert", src, dst, "--force", "--no-validate", "--no-progress"] + extra)
        ratio = r["peak_rss_bytes"] / size
        rows.append((name, r, ratio))
        print(f"{name:22s} {r['seconds']:8.1f} s   peak RSS {r['peak_rss_bytes'] / 2**30:6.2f} GiB = {ratio:.2f}x model"
              f"   {'goal met' if ratio <= 1.5 else 'GOAL MISSED'} (<= 1.5x)")
    if not a.keep:
        import shutil
        for p in (pth, st, rnn, cpp, hf):
            if os.path.isdir(p):
                shutil.rmtree(p)
            elif os.path.exists(p):
                os.unlink(p)


if __name__ == "__main__":
    main()

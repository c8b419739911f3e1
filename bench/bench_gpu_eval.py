"""Benchmark (needs a CUDA GPU): perplexity-eval throughput of RWKV-7 models with rwkvtools' CUDA
WKV kernels, side by side in one run with

* the same rwkvtools model with the chunked PyTorch WKV (``ops.set_backend("chunked")``),
* the same rwkvtools model with flash-linear-attention's chunked RWKV-7 kernel
  (``fla.ops.rwkv7.chunk_rwkv7``; entry skipped when ``fla`` is not installed),
* ChatRWKV's ``rwkv`` package (0.8.32) CUDA path (``RWKV_CUDA_ON=1``, strategy ``cuda <dtype>``,
  sequence forward with ``full_output=True``), in a subprocess,

on random-weight models shaped like RWKV-7 0.1B (L=12, C=768) and 1.5B (L=24, C=2048), vocab
65536, head size 64. Every entry scores the same token ids the same way (state carried across
chunks of ``--chunk-len`` tokens, NLL of every next token) and prints tokens/s and its ppl (the
ppl column must agree between entries: it is the correctness check of the comparison).

    python bench/bench_gpu_eval.py                       # 0.1b and 1.5b, 16384 tokens, fp16
    python bench/bench_gpu_eval.py --shapes 0.1b --tokens 4096 --dtype bf16
    python bench/bench_gpu_eval.py --device cpu --shapes tiny --tokens 256   # smoke test, no GPU

Extra packages (benchmark only): ``pip install flash-linear-attention rwkv==0.8.32 ninja``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

SHAPES = {  # name: (layers, n_embd, vocab)
    "tiny": (2, 128, 256),
    "0.1b": (12, 768, 65536),
    "1.5b": (24, 2048, 65536),
}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

CR_SCRIPT = r"""
import json, math, os, sys, time
os.environ["RWKV_V7_ON"] = "1"; os.environ["RWKV_CUDA_ON"] = "1"; os.environ.setdefault("RWKV_JIT_ON", "1")
import torch
from rwkv.model import RWKV
path, dtype, toks_path, chunk = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
toks = json.load(open(toks_path))
m = RWKV(model=path[:-4], strategy=f"cuda {dtype}")
def score(ids):
    st, nll = None, 0.0
    for s in range(0, len(ids) - 1, chunk):
        x = ids[s:s + chunk + 1]
        out, st = m.forward(x[:-1], st, full_output=True)
        out = out.float().view(len(x) - 1, -1)
        nll += torch.nn.functional.cross_entropy(out, torch.tensor(x[1:], device=out.device), reduction="sum").item()
    return nll
score(toks[:min(len(toks), 2 * chunk)])           # warm-up (kernel build, allocator)
torch.cuda.synchronize(); t = time.perf_counter()
nll = score(toks)
torch.cuda.synchronize(); dt = time.perf_counter() - t
print(json.dumps({"tokens_per_s": len(toks) / dt, "ppl": math.exp(nll / (len(toks) - 1))}))
"""


def fla_wkv7():
    """ops.wkv7 contract on top of fla's chunk_rwkv7 (FLA keeps the state key-major)."""
    from fla.ops.rwkv7 import chunk_rwkv7

    def wkv7(r, g, k, v, a, b, S):
        dt = r.dtype
        o, S_out = chunk_rwkv7(r, g.to(dt), k.to(dt), v.to(dt), a.to(dt), b.to(dt), scale=1.0,
                               initial_state=S.transpose(-1, -2).float().contiguous(), output_final_state=True)
        return o, S_out.transpose(-1, -2)

    return wkv7


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_ours(model, ids, chunk_len, device, backend, wkv7=None) -> dict:
    from rwkvtools import ops
    from rwkvtools.validate import perplexity
    saved = ops.wkv7
    ops.set_backend(backend)  # None: the automatic choice (CUDA kernels for T > 1 on a GPU)
    if wkv7 is not None:
        ops.wkv7 = wkv7
    try:
        perplexity(model, ids[:min(len(ids), 2 * chunk_len)], chunk_len=chunk_len, progress=False)  # warm-up
        sync(device)
        t = time.perf_counter()
        res = perplexity(model, ids, chunk_len=chunk_len, progress=False)
        sync(device)
        dt = time.perf_counter() - t
    finally:
        ops.wkv7 = saved
        ops.set_backend(None)
    return {"tokens_per_s": len(ids) / dt, "ppl": res.ppl, "backend": res.backend}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="0.1b,1.5b", help="comma list of " + ", ".join(SHAPES))
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--chunk-len", type=int, default=1024)
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp16")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--no-chatrwkv", action="store_true")
    ap.add_argument("--no-fla", action="store_true")
    args = ap.parse_args()
    from rwkvtools.io.pth import write_pth
    from rwkvtools.model import build_model
    from rwkvtools.ops import cuda
    from rwkvtools.random_init import random_checkpoint

    gpu = args.device.startswith("cuda")
    if gpu and not torch.cuda.is_available():
        sys.exit("bench_gpu_eval: no CUDA device (use --device cpu --shapes tiny for a smoke test)")
    dev = "cuda" if gpu else "cpu"
    print(f"device: {torch.cuda.get_device_name() if gpu else 'cpu'}; torch {torch.__version__}; dtype {args.dtype}; "
          f"{args.tokens} tokens, chunk {args.chunk_len}")
    if gpu:
        print(f"rwkvtools CUDA kernels: {'ready' if cuda.available() else 'unavailable: ' + str(cuda.build_error())}")
    tmp = tempfile.mkdtemp(prefix="rwkvgpubench-")
    rows = []
    for shape in args.shapes.split(","):
        L, C, V = SHAPES[shape]
        ck = random_checkpoint("7", L, C, V, 64, seed=0)
        ids = torch.randint(0, V, (args.tokens,), generator=torch.Generator().manual_seed(1)).tolist()
        model = build_model(ck, device=dev, dtype=DTYPES[args.dtype])
        entries = []  # (name, forced backend or None for the automatic choice, wkv7 override)
        if gpu:
            entries.append(("rwkvtools-cuda", None, None))
        entries.append(("rwkvtools-chunked", "chunked", None))
        if gpu and not args.no_fla:
            entries.append(("rwkvtools+fla-chunk", "chunked", "fla"))
        res = {}
        for name, backend, override in entries:
            try:
                res[name] = time_ours(model, ids, args.chunk_len, dev, backend,
                                      fla_wkv7() if override == "fla" else None)
            except Exception as e:  # report and go on with the other entries
                res[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
        del model
        if gpu and not args.no_chatrwkv:
            pth = os.path.join(tmp, f"rwkv7-{shape}.pth")
            write_pth(ck, pth)
            toks = os.path.join(tmp, "toks.json")
            json.dump(ids, open(toks, "w"))
            r = subprocess.run([sys.executable, "-c", CR_SCRIPT, pth, args.dtype, toks, str(args.chunk_len)],
                               capture_output=True, text=True)
            res["chatrwkv-cuda"] = (json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0
                                    else {"error": (r.stderr.strip().splitlines() or ["?"])[-1][:300]})
        if gpu:
            torch.cuda.empty_cache()
        for name, r in res.items():
            rows.append((shape, name, r))
            if "error" in r:
                print(f"{shape:5s} {name:20s} failed: {r['error']}")
            else:
                print(f"{shape:5s} {name:20s} {r['tokens_per_s']:10.1f} tokens/s   ppl {r['ppl']:.4f}")
        ok = {n: r for n, r in res.items() if "error" not in r}
        if "rwkvtools-cuda" in ok and len(ok) > 1:
            others = {n: r["tokens_per_s"] for n, r in ok.items() if n != "rwkvtools-cuda"}
            best = max(others, key=others.get)
            ratio = ok["rwkvtools-cuda"]["tokens_per_s"] / others[best]
            print(f"{shape:5s} rwkvtools-cuda / fastest other ({best}): {ratio:.2f}x "
                  f"-> goal (>= 1.0x) {'met' if ratio >= 1.0 else 'NOT met'}")
        ppls = [r["ppl"] for r in ok.values()]
        if len(ppls) > 1 and max(ppls) - min(ppls) > 1e-2 * min(ppls) and math.isfinite(min(ppls)):
            print(f"{shape:5s} warning: ppl differs by more than 1% between entries")
    print(json.dumps([{"shape": s, "entry": n, **r} for s, n, r in rows]))


if __name__ == "__main__":
    main()

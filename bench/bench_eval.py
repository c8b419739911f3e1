"""Benchmark: tokens/s of `rwkvtools eval` against ChatRWKV's `rwkv` package on the same
0.1B-shaped random v7 model (12 layers, dim 768, vocab 65536) on CPU, side by side in one run,
and against the machine's fp32 matmul roofline at the model's shapes.

    python bench/bench_eval.py [--tokens 4096] [--chunk-len 1024] [--cr-loop-tokens 64]

Needs ChatRWKV's package for the comparison (pip install rwkv==0.8.32; benchmark only)."""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

CR_SCRIPT = r"""
import os, sys, time, json
os.environ["RWKV_V7_ON"] = "1"; os.environ.setdefault("RWKV_JIT_ON", "1"); os.environ.setdefault("RWKV_CUDA_ON", "0")
import torch
from rwkv.model import RWKV
path, n_loop, n_seq = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
m = RWKV(model=path[:-4], strategy="cpu fp32")
toks = torch.randint(0, 65536, (max(n_loop, n_seq),), generator=torch.Generator().manual_seed(0)).tolist()
m.forward(toks[:4], None)
t = time.perf_counter(); st = None
for x in toks[:n_loop]:
    o, st = m.forward([x], st)
loop = n_loop / (time.perf_counter() - t)
t = time.perf_counter()
o, st = m.forward(toks[:n_seq], None, full_output=True)
seq = n_seq / (time.perf_counter() - t)
print(json.dumps({"loop_tokens_per_s": loop, "seq_tokens_per_s": seq}))
"""


def matmul_gflops(rows: int, shapes, reps: int = 3) -> float:
    """Sustained fp32 GFLOP/s of the model's own matmuls: every linear of one forward over
    ``rows`` tokens, in model order, timed as a whole (median of ``reps``)."""
    mats = [(torch.randn(n, k), count) for (n, k), count in shapes]
    acts = {k: torch.randn(rows, k) for (n, k), _ in shapes}
    flop = sum(2.0 * rows * w.shape[0] * w.shape[1] * c for w, c in mats)

    def one_pass():
        for w, c in mats:
            for _ in range(c):
                torch.nn.functional.linear(acts[w.shape[1]], w)

    one_pass()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        one_pass()
        times.append(time.perf_counter() - t)
    times.sort()
    return flop / times[len(times) // 2] / 1e9


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--chunk-len", type=int, default=1024)
    ap.add_argument("--cr-loop-tokens", type=int, default=64)
    ap.add_argument("--cr-seq-tokens", type=int, default=1024)
    ap.add_argument("--no-chatrwkv", action="store_true")
    args = ap.parse_args()
    from rwkvtools.io.pth import write_pth
    from rwkvtools.random_init import random_checkpoint

    L, C, V, F = 12, 768, 65536, 3072
    tmp = tempfile.mkdtemp(prefix="rwkvbench-")
    pth = os.path.join(tmp, "rwkv7-0.1b.pth")
    ck = random_checkpoint("7", L, C, V, 64, seed=0)
    write_pth(ck, pth)
    lin = sum(v.numel() for k, v in ck.tensors.items() if v.dim() == 2 and k != "emb.weight")
    flop_per_token = 2.0 * lin
    text = os.path.join(tmp, "text.txt")
    g = torch.Generator().manual_seed(1)
    # random printable text; the World tokenizer turns it into roughly one token per 1-3 chars
    chars = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,;:!?0123456789\n"
    idx = torch.randint(0, len(chars), (args.tokens * 3,), generator=g).tolist()
    open(text, "w").write("".join(chars[i] for i in idx))

    shapes = [((C, C), 4 * L), ((F, C), L), ((C, F), L), ((V, C), 1)]
    gflops = matmul_gflops(args.chunk_len, shapes)
    roof = gflops * 1e9 / flop_per_token

    cmd = [sys.executable, "-m", "rwkvtools.cli", "eval", pth, "--text", text, "--tokenizer", "world",
           "--max-tokens", str(args.tokens), "--chunk-len", str(args.chunk_len), "--json", "--no-progress"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    ours = json.loads(out.stdout)
    cr = None
    if not args.no_chatrwkv:
        r = subprocess.run([sys.executable, "-c", CR_SCRIPT, pth, str(args.cr_loop_tokens), str(args.cr_seq_tokens)],
                           capture_output=True, text=True)
        if r.returncode == 0:
            cr = json.loads(r.stdout.strip().splitlines()[-1])
        else:
            print("ChatRWKV run failed:", r.stderr[-1500:], file=sys.stderr)
    ours_tps = ours["tokens_per_s"]
    print(f"model: random RWKV-7 0.1B shape (L={L}, C={C}, V={V}), {ck.num_params() / 1e6:.1f}M params, "
          f"{flop_per_token / 1e6:.0f} MFLOP/token in matmuls; torch threads {torch.get_num_threads()}")
    print(f"fp32 matmul at the model's shapes (rows={args.chunk_len}): {gflops:.1f} GFLOP/s "
          f"-> roofline {roof:.1f} tokens/s")
    print(f"rwkvtools eval ({args.tokens} tokens, chunk {args.chunk_len}, backend {ours['backend']}): "
          f"{ours_tps:.1f} tokens/s = {100 * ours_tps / roof:.1f}% of roofline; peak RSS {peak_mb:.0f} MB "
          f"(ppl {ours['ppl']:.1f})")
    if cr:
        print(f"ChatRWKV rwkv 0.8.32 token loop ({args.cr_loop_tokens} tokens): {cr['loop_tokens_per_s']:.1f} tokens/s"
              f" -> rwkvtools is {ours_tps / cr['loop_tokens_per_s']:.1f}x")
        print(f"ChatRWKV sequence forward full_output=True ({args.cr_seq_tokens} tokens): "
              f"{cr['seq_tokens_per_s']:.1f} tokens/s -> rwkvtools is {ours_tps / cr['seq_tokens_per_s']:.2f}x")
    _ = before


if __name__ == "__main__":
    main()

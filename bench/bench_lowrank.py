"""Benchmark for `rwkvtools lowrank` (issue 5).

1. Quality: perplexity of the trained v5.2 fixture on wikitext-2-test (first 8192 bytes) after
   factoring its FFN at R in {0.9, 0.7, 0.5, 0.32}: svd vs whiten, uniform vs energy allocation
   (calibration: the packaged calibration text, 8192 tokens).
2. Speed: channel-mix (FFN) forward, dense vs factored at R=0.32, of the 12 layers of a
   0.1B-shaped model (C=768, F=3072; v7 key/value and v5.2 key/value/receptance) for T=1 and
   T=1024 on CPU, median of alternating repeats. Goal: >= 2x faster than dense at both.

    python bench/bench_lowrank.py [--threads 1] [--skip-quality] [--skip-speed] [--eval-bytes 8192]

Needs ../shared (fixtures and data) for the quality table.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
SHARED = os.environ.get("RWKVTOOLS_SHARED", os.path.join(os.path.dirname(os.path.dirname(HERE)), "shared"))

from rwkvtools.model import build_model  # noqa: E402
from rwkvtools.random_init import random_checkpoint  # noqa: E402
from rwkvtools.transforms.lowrank import LowRankConfig, calibration_tokens, lowrank  # noqa: E402
from rwkvtools.validate import perplexity  # noqa: E402


def quality(eval_bytes: int, calib_tokens: int, ranks, damp: float | None) -> None:
    from rwkvtools.io import read_checkpoint
    path = os.path.join(SHARED, "fixtures", "tiny-rwkv-5v2-730K-FP32.bin")
    text = os.path.join(SHARED, "data", "wikitext-2-test.txt")
    ck = read_checkpoint(path).materialize()
    with open(text, "rb") as f:
        ev = list(f.read()[:eval_bytes])
    cal = calibration_tokens(None, 256, calib_tokens)
    base = perplexity(build_model(ck), ev).ppl
    print(f"quality: {os.path.basename(path)}, FFN (key, value, receptance) of 12 layers; ppl on the first "
          f"{eval_bytes} bytes of wikitext-2-test; calibration: packaged calib.txt, {len(cal)} tokens")
    print(f"dense ppl {base:.4f}")
    print("| R | kept FFN params | svd uniform | svd energy | whiten uniform | whiten energy |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in ranks:
        cells, share = [], None
        for method in ("svd", "whiten"):
            for alloc in ("uniform", "energy"):
                kw = {} if damp is None or method == "svd" else {"damp": damp}
                t = time.perf_counter()
                out = lowrank(ck, LowRankConfig(rank=r, method=method, alloc=alloc, **kw), cal)
                dt = time.perf_counter() - t
                p = out.history[-1]["plan"]
                share = p["params_after"] / p["params_before"]
                ppl = perplexity(build_model(out), ev).ppl
                cells.append(f"{ppl:.3f} (+{100 * (ppl / base - 1):.1f}%)")
                print(f"  R={r} {method} {alloc}: ppl {ppl:.4f}, kept energy mean {p['kept_energy_mean']:.4f}, "
                      f"transform {dt:.2f} s", file=sys.stderr)
        print(f"| {r} | {100 * share:.1f}% | " + " | ".join(cells) + " |", flush=True)


def _time_pair(fa, fb, reps: int, warmup: int = 2) -> tuple[float, float]:
    """Median seconds of fa and fb, timed alternately so that machine noise hits both alike."""
    for _ in range(warmup):
        fa()
        fb()
    ta, tb = [], []
    for _ in range(reps):
        t = time.perf_counter()
        fa()
        ta.append(time.perf_counter() - t)
        t = time.perf_counter()
        fb()
        tb.append(time.perf_counter() - t)
    return statistics.median(ta), statistics.median(tb)


@torch.inference_mode()
def speed(rank: float, reps_t1: int, reps_seq: int, seq: int, layers: int) -> None:
    print(f"speed: the channel-mix (FFN) forward of all {layers} layers of a 0.1B-shaped model, one after "
          f"another (weights do not stay in cache), fp32, torch threads {torch.get_num_threads()}, median of "
          f"alternating repeats; R={rank} (plain SVD of random weights: timing does not depend on the values)")
    print("| FFN | T | dense ms | factored ms | speed-up | params (FLOP) share |")
    print("| --- | --- | --- | --- | --- | --- |")
    for version, label in (("7", "v7 key+value"), ("5.2", "v5.2 key+value+receptance")):
        ck = random_checkpoint(version, n_layer=layers, n_embd=768, vocab=256, head_size=64, ffn_dim=3072, seed=0)
        fac = lowrank(ck, LowRankConfig(rank=rank, method="svd"))
        share = fac.manifest["lowrank"]["params_after"] / fac.manifest["lowrank"]["params_before"]
        d_ffn = [b.ffn for b in build_model(ck).blocks]
        f_ffn = [b.ffn for b in build_model(fac).blocks]
        del ck, fac
        g = torch.Generator().manual_seed(0)
        for T, reps in ((1, reps_t1), (seq, reps_seq)):
            x = torch.randn(1, T, 768, generator=g)
            prev = torch.randn(1, 768, generator=g)
            err = max(float((d(x, prev)[0] - f(x, prev)[0]).abs().max()) for d, f in zip(d_ffn, f_ffn))
            assert err == err  # finite; R < 1 changes the outputs by design

            def run(ffns):
                for f in ffns:
                    f(x, prev)
            td, tf = _time_pair(lambda: run(d_ffn), lambda: run(f_ffn), reps)
            print(f"| {label}, C=768 F=3072, {layers} layers | {T} | {1e3 * td:.2f} | {1e3 * tf:.2f} | "
                  f"{td / tf:.2f}x | {100 * share:.1f}% |", flush=True)
        del d_ffn, f_ffn


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--eval-bytes", type=int, default=8192)
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--ranks", default="0.9,0.7,0.5,0.32")
    ap.add_argument("--damp", type=float, default=None, help="whitening damp (default: the library's)")
    ap.add_argument("--speed-rank", type=float, default=0.32)
    ap.add_argument("--reps-t1", type=int, default=100)
    ap.add_argument("--reps-seq", type=int, default=7)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if not a.skip_quality:
        quality(a.eval_bytes, a.calib_tokens, [float(r) for r in a.ranks.split(",")], a.damp)
    if not a.skip_speed:
        speed(a.speed_rank, a.reps_t1, a.reps_seq, a.seq, a.layers)


if __name__ == "__main__":
    main()

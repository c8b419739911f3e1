"""Quality of recursive RWKV and of healing on the v5.2 fixture (12 layers, n_embd 64).

For K in --blocks x LoRA rank in --ranks x init in --inits: collapse the fixture (cycle order,
LoRA by --lora-method, whitened by default on the first 8192 tokens of the healing text), measure
held-out perplexity, heal by distillation from the original on a fixed token budget, measure
again. Rank 0 has no LoRA, so its healing trains the shared block matrices (--train shared);
ranks > 0 train only the LoRA factors (the default). Then the same for `lowrank --rank 0.32`
(whitened, FFN, calibrated on the same text), healed with --train lowrank.

Texts (the fixture's own domain; the files are disjoint): healing and calibration on
wikitext-2-valid, held-out perplexity on the first --eval-tokens of wikitext-2-test; a second
held-out figure on the packaged Tiny Shakespeare slice (another domain). "recovered" is the share
of the lost log-perplexity that healing gave back on wikitext-2-test:
(log ppl_before - log ppl_after) / (log ppl_before - log ppl_teacher).

Usage:
  python bench/bench_recursive.py                         # the full grid (about 30 min on 1 busy core)
  python bench/bench_recursive.py --blocks 6 --ranks 32 --inits stepwise --no-lowrank
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.environ.get("RWKVTOOLS_SHARED", os.path.join(HERE, "..", "..", "shared"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(SHARED, "fixtures", "tiny-rwkv-5v2-730K-FP32.bin"))
    ap.add_argument("--blocks", default="6,4,3")
    ap.add_argument("--ranks", default="0,8,16,32")
    ap.add_argument("--inits", default="stepwise,average")
    ap.add_argument("--lora-method", default="whiten", choices=["svd", "whiten"])
    ap.add_argument("--train-text", default=os.path.join(SHARED, "data", "wikitext-2-valid.txt"))
    ap.add_argument("--eval-text", default=os.path.join(SHARED, "data", "wikitext-2-test.txt"))
    ap.add_argument("--tokens", type=int, default=32768, help="healing budget per setting (tokens)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--no-lowrank", action="store_true")
    ap.add_argument("--lowrank-rank", type=float, default=0.32)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core machine)")
    ap.add_argument("--json", default=None, help="also write every row to this JSON file")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from rwkvtools.io import read_checkpoint
    from rwkvtools.model import build_model
    from rwkvtools.transforms.heal import HealConfig, heal
    from rwkvtools.transforms.lowrank import LowRankConfig, lowrank
    from rwkvtools.transforms.recursive import RecursiveConfig, recursive
    from rwkvtools.validate import perplexity, text_tokens

    teacher = read_checkpoint(a.model)
    tmodel = build_model(teacher)
    train = text_tokens(a.train_text, 256)
    calib = train[:8192]
    ev = text_tokens(a.eval_text, 256, max_tokens=a.eval_tokens)
    shk = text_tokens(None, 256, "heldout", max_tokens=a.eval_tokens)
    ppl_t = perplexity(tmodel, ev).ppl
    ppl_ts = perplexity(tmodel, shk).ppl
    n_orig = teacher.num_params()
    print(f"model {os.path.basename(a.model)}: {n_orig:,} params; teacher ppl {ppl_t:.4f} on {len(ev)} tokens of "
          f"{os.path.basename(a.eval_text)}, {ppl_ts:.4f} on Tiny Shakespeare (held-out slice); healing: {a.tokens} "
          f"tokens of {os.path.basename(a.train_text)}, seq {a.seq_len} x batch {a.batch_size}, lr {a.lr}, KL only; "
          f"LoRA {a.lora_method}; torch threads {a.threads}", flush=True)
    print("| setting | unique params | ppl before | ppl after (vs original) | recovered | Shakespeare before -> after | "
          "heal s | tok/s |")
    print("|" + "---|" * 8, flush=True)
    rows = []

    def run(label, student, train_group, unique):
        s0 = perplexity(build_model(student), shk).ppl
        cfg = HealConfig(tokens=a.tokens, seq_len=a.seq_len, batch_size=a.batch_size, lr=a.lr, train=train_group,
                         device="cpu")
        out, rep = heal(student, teacher, train, cfg, eval_tokens=ev, progress=False)
        s1 = perplexity(build_model(out), shk).ppl
        row = {"setting": label, "unique_params": unique, "params_pct": 100.0 * unique / n_orig,
               "ppl_teacher": rep["ppl_teacher"], "ppl_before": rep["ppl_before"], "ppl_after": rep["ppl_after"],
               "recovered": rep["recovered"], "kl_before": rep["kl_before"], "kl_after": rep["kl_after"],
               "shakespeare_teacher": ppl_ts, "shakespeare_before": s0, "shakespeare_after": s1, "train": train_group,
               "heal_tokens": rep["tokens_trained"], "heal_seconds": rep["seconds"],
               "tokens_per_s": rep["tokens_per_s"], "trained_params": rep["trained_params"]}
        rows.append(row)
        print(f"| {label} | {unique:,} ({row['params_pct']:.1f}%) | {row['ppl_before']:.3f} | {row['ppl_after']:.3f} "
              f"({100 * (row['ppl_after'] / rep['ppl_teacher'] - 1):+.1f}%) | {100 * row['recovered']:.1f}% | "
              f"{s0:.2f} -> {s1:.2f} | {rep['seconds']:.0f} | {rep['tokens_per_s']:.0f} |", flush=True)

    t0 = time.perf_counter()
    for k in (int(x) for x in a.blocks.split(",")):
        for r in (int(x) for x in a.ranks.split(",")):
            for init in a.inits.split(","):
                s = recursive(teacher, RecursiveConfig(blocks=k, lora_rank=r, init=init, lora_method=a.lora_method),
                              calib)
                run(f"K={k} r={r} {init}", s, "lora" if r > 0 else "shared", s.manifest["recursive"]["unique_params"])
    if not a.no_lowrank:
        s = lowrank(teacher, LowRankConfig(rank=a.lowrank_rank), calib)
        run(f"lowrank --rank {a.lowrank_rank}", s, "lowrank", s.num_params())
    total = time.perf_counter() - t0

    worst = min(rows, key=lambda r: r["recovered"])
    k6 = [r for r in rows if r["setting"].startswith("K=6 ")]
    best6 = min(k6, key=lambda r: r["ppl_after"]) if k6 else None
    print(f"\ntotal {total / 60:.1f} min; healing {sum(r['heal_tokens'] for r in rows):,} tokens in "
          f"{sum(r['heal_seconds'] for r in rows) / 60:.1f} min")
    print(f"goal 1 (recover >= 50% of the lost log-ppl at every setting): worst {worst['setting']} "
          f"{100 * worst['recovered']:.1f}% -> {'MET' if worst['recovered'] >= 0.5 else 'NOT MET'}")
    if best6:
        gap = 100 * (best6["ppl_after"] / best6["ppl_teacher"] - 1)
        print(f"goal 2 (best K=6 within 5% of the original ppl): {best6['setting']} {best6['ppl_after']:.4f} vs "
              f"{best6['ppl_teacher']:.4f} ({gap:+.2f}%) -> {'MET' if gap <= 5 else 'NOT MET'}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "teacher_ppl": ppl_t, "teacher_shakespeare_ppl": ppl_ts, "rows": rows,
                       "total_seconds": total}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: the exported ONNX graphs in onnxruntime (CPU) against the torch reference model and
ChatRWKV's `rwkv` package on the same 0.1B-shaped random v7 model (12 layers, dim 768, vocab
65536), side by side in one run.

* per-token latency of one fp32 step (batch 1): onnxruntime step graph, torch step, ChatRWKV;
  and the memory-bandwidth bound of a step: every weight read once (all matrices except the
  embedding table, of which one row is read) / the measured read bandwidth;
* prefill tokens/s: onnxruntime sequence graph (logits of every position, and logits='last')
  against ChatRWKV's sequence forward (full_output=False and True).

    python bench/bench_onnx.py [--steps 48] [--prefill 1024] [--threads 2]

Needs ChatRWKV's package for the comparison (pip install rwkv==0.8.32; benchmark only)."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

PRODUCT_OPS = ("MatMul", "MatMulNBits", "Conv")

CR_SCRIPT = r"""
import os, sys, time, json, statistics
os.environ["RWKV_V7_ON"] = "1"; os.environ.setdefault("RWKV_JIT_ON", "1"); os.environ.setdefault("RWKV_CUDA_ON", "0")
import torch
torch.set_num_threads(int(sys.argv[4]))
from rwkv.model import RWKV
path, n_steps, n_seq = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
m = RWKV(model=path[:-4], strategy="cpu fp32")
toks = torch.randint(0, 65536, (max(n_steps, n_seq) + 8,), generator=torch.Generator().manual_seed(0)).tolist()
st = None
for x in toks[:4]:
    o, st = m.forward([x], st)
ts = []
for x in toks[:n_steps]:
    t = time.perf_counter(); o, st = m.forward([x], st); ts.append(time.perf_counter() - t)
res = {"step_ms": 1000 * statistics.median(ts), "step_ms_min": 1000 * min(ts)}
for full in (False, True):
    best = 1e9
    for _ in range(2):
        t = time.perf_counter(); o, s2 = m.forward(toks[:n_seq], None, full_output=full); best = min(best, time.perf_counter() - t)
    res["seq_tokens_per_s_full" if full else "seq_tokens_per_s"] = n_seq / best
print(json.dumps(res))
"""


def read_bandwidth_gbs(threads: int, mib: int = 1024, reps: int = 5) -> dict:
    """Read bandwidth: torch.sum over a buffer far larger than the caches (best of ``reps``)."""
    n0 = torch.get_num_threads()
    torch.set_num_threads(threads)
    buf = torch.ones(mib * 1024 * 1024 // 4)
    best = 1e9
    for _ in range(reps):
        t = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t)
    torch.set_num_threads(n0)
    return {"gbs": buf.numel() * 4 / best / 1e9, "mib": mib}


def floor_session(path: str, threads: int, ort):
    """An onnxruntime session that runs only the products of the exported step graph at
    ``path``: its MatMul and Conv nodes whose weight is an initializer (every weight matrix the
    step reads, the LoRA products stacked as the graph writes them), each against an input of the
    shape it has in the step (shape inference, batch 1), nothing else. Its time is what
    onnxruntime's own product kernels need to read the step's weights."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    m = onnx.shape_inference.infer_shapes(onnx.load(path))
    inits = {t.name: t for t in m.graph.initializer}
    shapes = {v.name: [d.dim_value or 1 for d in v.type.tensor_type.shape.dim]
              for v in list(m.graph.value_info) + list(m.graph.input)}
    nodes, weights, ins = [], [], {}
    for n in m.graph.node:
        if n.op_type in ("MatMul", "Conv") and len(n.input) > 1 and n.input[1] in inits:   # fp32 graphs
            x = f"in{len(nodes)}"
            ins[x] = shapes[n.input[0]]
            nodes.append(helper.make_node(n.op_type, [x, n.input[1]], [f"y{len(nodes)}"]))
            weights.append(inits[n.input[1]])
    g = helper.make_graph(nodes, "product_floor",
                          [helper.make_tensor_value_info(x, TensorProto.FLOAT, shp) for x, shp in ins.items()],
                          [helper.make_tensor_value_info(nd.output[0], TensorProto.FLOAT, None) for nd in nodes],
                          weights)
    fm = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    sess = ort.InferenceSession(fm.SerializeToString(), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feed = {x: rng.standard_normal(shp, dtype=np.float32) for x, shp in ins.items()}
    return sess, feed, [torch.from_numpy(numpy_helper.to_array(w).copy()) for w in weights]


def skeleton_session(path: str, threads: int, ort):
    """An onnxruntime session of the step graph at ``path`` without its weight products: every
    MatMul/Conv whose weight is an initializer becomes a ReduceMean of its input expanded to the
    product's output shape (no weight read), everything else (norms, token shift, LoRA
    activations, the state update, dispatch, the state and logits in and out) stays. Its time is
    what the step spends besides streaming the weights."""
    import onnx
    from onnx import helper, numpy_helper
    m = onnx.load(path)
    inits = {t.name for t in m.graph.initializer}
    inferred = onnx.shape_inference.infer_shapes(m)
    shapes = {v.name: [d.dim_value or 1 for d in v.type.tensor_type.shape.dim]
              for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    nodes = []
    for i, n in enumerate(m.graph.node):
        if n.op_type in ("MatMul", "Conv") and len(n.input) > 1 and n.input[1] in inits:
            shp = shapes[n.output[0]]
            axis = 1 if n.op_type == "Conv" else len(shp) - 1
            nodes += [helper.make_node("ReduceMean", [n.input[0]], [f"skel_mean{i}"], axes=[axis], keepdims=1),
                      helper.make_node("Constant", [], [f"skel_shape{i}"],
                                       value=numpy_helper.from_array(np.array(shp, np.int64))),
                      helper.make_node("Expand", [f"skel_mean{i}", f"skel_shape{i}"], [n.output[0]])]
        else:
            nodes.append(n)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    used = {x for n in m.graph.node for x in n.input}
    kept = [t for t in m.graph.initializer if t.name in used]
    del m.graph.initializer[:]
    m.graph.initializer.extend(kept)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


def sum_each(mats: list) -> None:
    """The simplest reader of the same bytes in the same pieces: torch.sum of each matrix in turn."""
    for w in mats:
        w.sum()


def zero_states(sess) -> dict:
    """The empty state of a session's inputs (batch 1): every state_in_* tensor zero."""
    return {i.name: np.zeros([1 if d == "batch" else d for d in i.shape], np.float32)
            for i in sess.get_inputs() if i.name.startswith("state_in_")}


def next_states(sess, outs: list) -> dict:
    """The state_out_* of a call, named as the next call's state_in_* (no copies)."""
    return {o.name.replace("state_out_", "state_in_"): v for o, v in zip(sess.get_outputs(), outs)
            if o.name.startswith("state_out_")}


def median_step_ms(fn, n: int, warm: int = 4) -> tuple[float, float]:
    for i in range(warm):
        fn(i)
    ts = []
    for i in range(n):
        t = time.perf_counter()
        fn(warm + i)
        ts.append(time.perf_counter() - t)
    return 1000 * statistics.median(ts), 1000 * min(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=48, help="tokens timed per step measurement")
    ap.add_argument("--prefill", type=int, default=1024, help="prompt length for prefill")
    ap.add_argument("--threads", type=int, default=2, help="threads for every runtime")
    ap.add_argument("--chunk-len", type=int, default=16)
    ap.add_argument("--no-chatrwkv", action="store_true")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=9, help="interleaved bandwidth/step rounds")
    ap.add_argument("--parallel-executor", action="store_true",
                    help="also time the conv step graph under onnxruntime's parallel executor (1 intra-op and "
                         "2 inter-op threads: independent nodes, e.g. a layer's r/k/v products, run side by side) "
                         "in every round")
    args = ap.parse_args()
    import onnxruntime as ort

    from rwkvtools.export.onnx import export_onnx
    from rwkvtools.io.pth import write_pth
    from rwkvtools.model import build_model
    from rwkvtools.random_init import random_checkpoint
    torch.set_num_threads(args.threads)

    L, C, V = args.layers, 768, 65536
    tmp = tempfile.mkdtemp(prefix="rwkvbench-onnx-")
    ck = random_checkpoint("7", L, C, V, 64, seed=0)
    pth = os.path.join(tmp, "rwkv7-0.1b.pth")
    write_pth(ck, pth)
    params = ck.num_params()
    # bytes one step must read: every tensor once, the embedding table only one row
    step_bytes = sum(v.numel() * 4 for k, v in ck.tensors.items() if k != "emb.weight") + C * 4
    paths = {}
    t0 = time.perf_counter()
    for name, kw in (("step", {"mode": "step"}), ("step_conv", {"mode": "step", "linear_op": "conv"}),
                     ("seq", {"mode": "sequence", "chunk_len": args.chunk_len}),
                     ("seq_last", {"mode": "sequence", "chunk_len": args.chunk_len, "logits": "last"})):
        paths[name] = os.path.join(tmp, f"{name}.onnx")
        export_onnx(ck, paths[name], validate=False, progress=False, **kw)
    export_s = time.perf_counter() - t0

    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.log_severity_level = 3
    sess = {k: ort.InferenceSession(p, so, providers=["CPUExecutionProvider"]) for k, p in paths.items()}
    model = build_model(ck)
    toks = torch.randint(0, V, (1, max(args.steps, args.prefill) + 16), generator=torch.Generator().manual_seed(0))
    tnp = toks.numpy()

    # --- correctness spot check: 8 steps of the step graph against the torch model
    diffs = {}
    for g in ("step", "step_conv"):
        state = zero_states(sess[g])
        ref_st, diff = None, 0.0
        with torch.inference_mode():
            for t in range(8):
                out = sess[g].run(None, {"tokens": tnp[:, t:t + 1], **state})
                state = next_states(sess[g], out)
                lr, ref_st = model(toks[:, t:t + 1], ref_st)
                diff = max(diff, float(np.abs(out[0] - lr.numpy()).max()))
        diffs[g] = diff
    diff = max(diffs.values())

    bw0 = read_bandwidth_gbs(args.threads)

    # --- step latency
    def stepper_for(session):
        st = {"s": None}

        def step(i):
            s = st["s"] or zero_states(session)
            out = session.run(None, {"tokens": tnp[:, i:i + 1], **s})
            st["s"] = next_states(session, out)
        return step

    def stepper(graph):
        return stepper_for(sess[graph])
    ort_step, conv_step = stepper("step"), stepper("step_conv")
    ort_ms, ort_min = median_step_ms(ort_step, args.steps)
    conv_ms, conv_min = median_step_ms(conv_step, args.steps)

    def torch_step(i, _st={"s": None}):
        with torch.inference_mode():
            _, _st["s"] = model(toks[:, i:i + 1], _st["s"])
    torch_ms, torch_min = median_step_ms(torch_step, args.steps)

    # --- the bound and the step in the same minutes: this machine's bandwidth drifts by 20% or
    # more between minutes, so rounds alternate bandwidth, the step graphs and their products
    # alone, and the ratio is taken within each round (median over rounds).
    floor_sess, floor_feed, _ = floor_session(paths["step"], args.threads, ort)
    cfloor_sess, cfloor_feed, cmats = floor_session(paths["step_conv"], args.threads, ort)
    skel_step = stepper_for(skeleton_session(paths["step_conv"], args.threads, ort))
    par_step = None
    if args.parallel_executor:
        so_par = ort.SessionOptions()
        so_par.log_severity_level = 3
        so_par.execution_mode = ort.ExecutionMode.ORT_PARALLEL
        so_par.intra_op_num_threads, so_par.inter_op_num_threads = 1, args.threads
        par_step = stepper_for(ort.InferenceSession(paths["step_conv"], so_par, providers=["CPUExecutionProvider"]))
    rounds = []
    for _ in range(args.rounds):
        bw_r = read_bandwidth_gbs(args.threads, reps=3)["gbs"]
        st_r, _ = median_step_ms(ort_step, max(8, args.steps // 3), warm=1)
        cv_r, _ = median_step_ms(conv_step, max(8, args.steps // 3), warm=1)
        fl_r, _ = median_step_ms(lambda i: floor_sess.run(None, floor_feed), max(8, args.steps // 3), warm=1)
        cf_r, _ = median_step_ms(lambda i: cfloor_sess.run(None, cfloor_feed), max(8, args.steps // 3), warm=1)
        sm_r, _ = median_step_ms(lambda i: sum_each(cmats), max(8, args.steps // 3), warm=1)
        sk_r, _ = median_step_ms(skel_step, max(8, args.steps // 3), warm=1)
        b_r = step_bytes / (bw_r * 1e9) * 1000
        rounds.append({"gbs": bw_r, "bound_ms": b_r, "step_ms": st_r, "conv_step_ms": cv_r, "matmul_floor_ms": fl_r,
                       "conv_floor_ms": cf_r, "sum_each_ms": sm_r, "step_x_bound": st_r / b_r,
                       "conv_x_bound": cv_r / b_r, "floor_x_bound": fl_r / b_r, "conv_floor_x_bound": cf_r / b_r,
                       "sum_each_x_bound": sm_r / b_r, "skeleton_ms": sk_r, "skeleton_x_bound": sk_r / b_r})
        if par_step is not None:
            pe_r, _ = median_step_ms(par_step, max(8, args.steps // 3), warm=1)
            rounds[-1].update(parallel_conv_step_ms=pe_r, parallel_conv_x_bound=pe_r / b_r)
    r_step = statistics.median(r["step_x_bound"] for r in rounds)
    r_conv = statistics.median(r["conv_x_bound"] for r in rounds)
    r_floor = statistics.median(r["floor_x_bound"] for r in rounds)
    r_cfloor = statistics.median(r["conv_floor_x_bound"] for r in rounds)
    r_sum = statistics.median(r["sum_each_x_bound"] for r in rounds)
    r_skel = statistics.median(r["skeleton_x_bound"] for r in rounds)
    r_skel_ms = statistics.median(r["skeleton_ms"] for r in rounds)

    # --- prefill
    P = args.prefill
    zero = zero_states(sess["seq"])
    pre = {}
    for k in ("seq", "seq_last"):
        best = 1e9
        for _ in range(2):
            t = time.perf_counter()
            sess[k].run(None, {"tokens": tnp[:, :P], **zero})
            best = min(best, time.perf_counter() - t)
        pre[k] = P / best
    with torch.inference_mode():
        best = 1e9
        for _ in range(2):
            t = time.perf_counter()
            model(toks[:, :P])
            best = min(best, time.perf_counter() - t)
    pre["torch"] = P / best

    # where the step graphs' time goes (onnxruntime profiler, 8 runs): the products (MatMul / Conv
    # kernels, LoRAs included) against every other kernel; the profiler adds ~5 us per node
    prof = {}
    for gname in ("step", "step_conv"):
        so_p = ort.SessionOptions()
        so_p.intra_op_num_threads = args.threads
        so_p.log_severity_level = 3
        so_p.enable_profiling = True
        so_p.profile_file_prefix = os.path.join(tmp, f"prof_{gname}")
        sp = ort.InferenceSession(paths[gname], so_p, providers=["CPUExecutionProvider"])
        feeds = {"tokens": tnp[:, :1], **zero}
        for _ in range(8):
            sp.run(None, feeds)
        ev = json.load(open(sp.end_profiling()))
        kern = [e for e in ev if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
        prod = sum(e["dur"] for e in kern if e["args"].get("op_name") in PRODUCT_OPS) / 8000
        prof[gname] = {"products_ms": prod, "other_ms": sum(e["dur"] for e in kern) / 8000 - prod,
                       "nodes": len({e["name"] for e in kern})}
    del sp

    bw1 = read_bandwidth_gbs(args.threads)
    # the bound: the median over the interleaved rounds (single best-of readings were seen to
    # jump by 50% on this machine, which would make any ratio meaningless)
    bw = {"gbs": statistics.median(r["gbs"] for r in rounds), "mib": bw0["mib"]}
    bound_ms = step_bytes / (bw["gbs"] * 1e9) * 1000

    cr = None
    if not args.no_chatrwkv:
        r = subprocess.run([sys.executable, "-c", CR_SCRIPT, pth, str(args.steps), str(P), str(args.threads)],
                           capture_output=True, text=True)
        if r.returncode == 0:
            cr = json.loads(r.stdout.strip().splitlines()[-1])
        else:
            print("ChatRWKV run failed:", r.stderr[-1500:], file=sys.stderr)

    print(f"model: random RWKV-7 0.1B shape (L={L}, C={C}, V={V}), {params / 1e6:.1f}M params; "
          f"threads {args.threads}; onnxruntime {ort.__version__}, torch {torch.__version__}")
    print(f"export (4 graphs, no validation): {export_s:.1f} s; step graphs vs torch, 8 steps: max |logit diff| "
          f"{diffs['step']:.2e} (MatMul), {diffs['step_conv']:.2e} (--linear-op conv)")
    print(f"read bandwidth (torch.sum over {bw['mib']} MiB; median of the {args.rounds} interleaved rounds below, "
          f"best-of-5 before/after the timings: {bw0['gbs']:.2f} / {bw1['gbs']:.2f}): {bw['gbs']:.2f} GB/s; "
          f"one step reads {step_bytes / 1e6:.0f} MB -> bound {bound_ms:.1f} ms/token")
    print("per-token latency, batch 1, fp32 (median / min over %d steps):" % args.steps)
    print(f"  onnxruntime step graph : {ort_ms:7.1f} / {ort_min:6.1f} ms  = {ort_ms / bound_ms:.2f}x bound")
    print(f"  the same, --linear-op conv: {conv_ms:7.1f} / {conv_min:6.1f} ms  = {conv_ms / bound_ms:.2f}x bound")
    print(f"  torch reference step   : {torch_ms:7.1f} / {torch_min:6.1f} ms  = {torch_ms / bound_ms:.2f}x bound")
    for gname, label in (("step", "step graph"), ("step_conv", "conv step graph")):
        pr = prof[gname]
        print(f"  onnxruntime profile of the {label} ({pr['nodes']} nodes after onnxruntime's optimiser): "
              f"product kernels {pr['products_ms']:.1f} ms ({step_bytes / 1e6 / pr['products_ms']:.2f} GB/s), "
              f"all other kernels {pr['other_ms']:.1f} ms")
    print(f"  interleaved rounds ({args.rounds}; bandwidth / step graph / conv step graph / the products of each "
          "graph alone / torch.sum of each of the conv graph's product weights in turn / the conv step graph without "
          "its weight products, in the same minute):")
    for r in rounds:
        print(f"    {r['gbs']:5.1f} GB/s bound {r['bound_ms']:5.1f} ms | step {r['step_ms']:5.1f} ms = "
              f"{r['step_x_bound']:.2f}x | conv {r['conv_step_ms']:5.1f} ms = {r['conv_x_bound']:.2f}x | "
              f"MatMul-only {r['matmul_floor_ms']:5.1f} ms = {r['floor_x_bound']:.2f}x | "
              f"Conv-only {r['conv_floor_ms']:5.1f} ms = {r['conv_floor_x_bound']:.2f}x | "
              f"sum each {r['sum_each_ms']:5.1f} ms = {r['sum_each_x_bound']:.2f}x | "
              f"skeleton {r['skeleton_ms']:4.1f} ms = {r['skeleton_x_bound']:.2f}x"
              + (f" | parallel executor {r['parallel_conv_step_ms']:5.1f} ms = {r['parallel_conv_x_bound']:.2f}x"
                 if par_step is not None else ""))
    print(f"  median over rounds: step graph {r_step:.2f}x bound, with --linear-op conv {r_conv:.2f}x; "
          f"their products alone {r_floor:.2f}x (MatMul graph), {r_cfloor:.2f}x (conv graph); torch.sum of the same "
          f"weights matrix by matrix {r_sum:.2f}x")
    print(f"  the conv step graph without its weight products (skeleton): {r_skel_ms:.1f} ms = {r_skel:.2f}x bound; "
          f"products alone + skeleton = {r_cfloor + r_skel:.2f}x against the whole conv step graph's {r_conv:.2f}x")
    if par_step is not None:
        r_par = statistics.median(r["parallel_conv_x_bound"] for r in rounds)
        print(f"  the conv step graph under onnxruntime's parallel executor (1 intra-op x {args.threads} inter-op "
              f"threads): {r_par:.2f}x bound against {r_conv:.2f}x sequential")
    if cr:
        print(f"  ChatRWKV rwkv 0.8.32   : {cr['step_ms']:7.1f} / {cr['step_ms_min']:6.1f} ms  = "
              f"{cr['step_ms'] / bound_ms:.2f}x bound; onnxruntime is {cr['step_ms'] / ort_ms:.2f}x ChatRWKV's speed "
              f"({cr['step_ms'] / conv_ms:.2f}x with --linear-op conv)")
    print(f"prefill of {P} tokens, batch 1, fp32 (best of 2):")
    print(f"  onnxruntime sequence graph, all logits : {pre['seq']:7.1f} tokens/s (chunk {args.chunk_len})")
    print(f"  onnxruntime sequence graph, last logits: {pre['seq_last']:7.1f} tokens/s")
    print(f"  torch reference (chunked), all logits  : {pre['torch']:7.1f} tokens/s")
    if cr:
        print(f"  ChatRWKV forward, last logits          : {cr['seq_tokens_per_s']:7.1f} tokens/s -> onnxruntime "
              f"(last) is {pre['seq_last'] / cr['seq_tokens_per_s']:.2f}x")
        print(f"  ChatRWKV forward, full_output=True     : {cr['seq_tokens_per_s_full']:7.1f} tokens/s -> onnxruntime "
              f"(all) is {pre['seq'] / cr['seq_tokens_per_s_full']:.2f}x")
    summary = {"bound_ms": bound_ms, "gbs": bw["gbs"], "ort_step_ms": ort_ms, "ort_conv_step_ms": conv_ms,
               "conv_step_x_bound_median": r_conv, "torch_step_ms": torch_ms,
               "profile": prof,
               "chatrwkv": cr, "prefill": pre, "step_logit_diff": diff,
               "rounds": rounds, "step_x_bound_median": r_step, "matmul_floor_x_bound_median": r_floor,
               "conv_floor_x_bound_median": r_cfloor, "sum_each_x_bound_median": r_sum,
               "skeleton_x_bound_median": r_skel, "skeleton_ms_median": r_skel_ms,
               "parallel_conv_x_bound_median": r_par if par_step is not None else None}
    print("json:", json.dumps(summary))
    import shutil
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

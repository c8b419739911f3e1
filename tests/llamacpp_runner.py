"""Run llama.cpp itself (through llama-cpp-python, a test-only dependency) in a subprocess, so
that an abort inside llama.cpp (GGML_ASSERT) fails one test instead of killing pytest.

Library use (from tests and bench/bench_gguf.py):
    available()                                -> bool
    logits(gguf, tokens)                       -> np.ndarray (T, V) float32, one batch per n_batch
    nll(gguf, tokens)                          -> np.ndarray (T-1,) negative log-likelihoods
    quantize(src, dst, ftype, embed=, output=) -> llama.cpp's own quantizer (llama_model_quantize)
    tokenize(gguf, data: bytes)                -> token ids from llama.cpp's tokenizer (vocab only)
    ggml_quantize(qtype, rows)                 -> bytes from ggml's own quantize_chunk (no imatrix)
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

GGML_TYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q2_K": 10, "Q3_K": 11,
             "Q4_K": 12, "Q5_K": 13, "Q6_K": 14, "BF16": 30}
LLAMA_FTYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q4_K_S": 14,
               "Q4_K_M": 15, "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18, "BF16": 32}


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def _run(args: list[str], timeout: int = 900) -> str:
    # passive OpenMP waiting: ggml's worker threads otherwise spin, which on a busy machine costs
    # far more than the work itself
    env = dict(os.environ, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "passive"))
    r = subprocess.run([sys.executable, os.path.abspath(__file__), *args], capture_output=True, text=True,
                       timeout=timeout, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"llama.cpp subprocess {args[0]} failed (exit {r.returncode}): "
                           f"{(r.stderr or r.stdout)[-3000:]}")
    return r.stdout


def logits(path: str, tokens, n_batch: int = 512, threads: int = 2) -> np.ndarray:
    with tempfile.TemporaryDirectory() as d:
        with open(f"{d}/t.json", "w") as f:
            json.dump([int(t) for t in tokens], f)
        _run(["logits", str(path), f"{d}/t.json", f"{d}/out.npy", str(n_batch), str(threads)])
        return np.load(f"{d}/out.npy")


def logits_many(paths: list[str], tokens, n_batch: int = 512, threads: int = 2) -> list[np.ndarray]:
    """Logits of several GGUF files for the same tokens, in one subprocess (one start-up)."""
    with tempfile.TemporaryDirectory() as d:
        with open(f"{d}/t.json", "w") as f:
            json.dump([int(t) for t in tokens], f)
        outs = [f"{d}/out{i}.npy" for i in range(len(paths))]
        _run(["logits_many", f"{d}/t.json", str(n_batch), str(threads), *[x for p, o in zip(paths, outs) for x in (str(p), o)]])
        return [np.load(o) for o in outs]


def nll(path: str, tokens, n_batch: int = 512, threads: int = 2) -> np.ndarray:
    with tempfile.TemporaryDirectory() as d:
        with open(f"{d}/t.json", "w") as f:
            json.dump([int(t) for t in tokens], f)
        _run(["nll", str(path), f"{d}/t.json", f"{d}/out.npy", str(n_batch), str(threads)])
        return np.load(f"{d}/out.npy")


def quantize(src: str, dst: str, ftype: str, embed: str | None = None, output: str | None = None,
             threads: int = 2, pure: bool = False) -> None:
    """llama.cpp's quantizer; ``pure`` gives every quantizable tensor the ftype's base type (no mix)."""
    _run(["quantize", str(src), str(dst), ftype, embed or "-", output or "-", str(threads), str(int(pure))])


def tokenize(path: str, data: bytes) -> list[int]:
    with tempfile.TemporaryDirectory() as d:
        with open(f"{d}/in.bin", "wb") as f:
            f.write(data)
        return json.loads(_run(["tokenize", str(path), f"{d}/in.bin"]).strip().splitlines()[-1])


def ggml_quantize(qtype: str, rows: np.ndarray) -> np.ndarray:
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    with tempfile.TemporaryDirectory() as d:
        np.save(f"{d}/x.npy", rows)
        _run(["ggml_quantize", qtype, f"{d}/x.npy", f"{d}/out.npy"])
        return np.load(f"{d}/out.npy")


# ------------------------------------------------------------------------------ child side
def _llama(path, n_ctx, n_batch, threads, **kw):
    from llama_cpp import Llama
    return Llama(model_path=path, n_ctx=max(8, n_ctx), n_batch=n_batch, n_ubatch=n_batch, n_threads=threads,
                 n_threads_batch=threads, logits_all=True, verbose=False, **kw)


def _child(argv):
    cmd = argv[0]
    if cmd in ("logits", "nll"):
        path, tok_file, out, n_batch, threads = argv[1], argv[2], argv[3], int(argv[4]), int(argv[5])
        toks = json.load(open(tok_file))
        llm = _llama(path, len(toks), min(n_batch, max(1, len(toks))), threads)
        llm.eval(toks)
        sc = np.asarray(llm.scores[:len(toks)], dtype=np.float32)
        if cmd == "logits":
            np.save(out, sc)
        else:
            x = sc[:-1].astype(np.float64)
            m = x.max(axis=1, keepdims=True)
            lse = (m + np.log(np.exp(x - m).sum(axis=1, keepdims=True)))[:, 0]
            tgt = np.asarray(toks[1:])
            np.save(out, lse - x[np.arange(len(tgt)), tgt])
        return
    if cmd == "logits_many":
        tok_file, n_batch, threads = argv[1], int(argv[2]), int(argv[3])
        toks = json.load(open(tok_file))
        rest = argv[4:]
        for path, out in zip(rest[0::2], rest[1::2]):
            llm = _llama(path, len(toks), min(n_batch, max(1, len(toks))), threads)
            llm.eval(toks)
            np.save(out, np.asarray(llm.scores[:len(toks)], dtype=np.float32))
            llm.close()
        return
    if cmd == "quantize":
        import ctypes
        import llama_cpp
        src, dst, ftype, embed, output, threads, pure = argv[1:8]
        p = llama_cpp.llama_model_quantize_default_params()
        p.nthread = int(threads)
        p.pure = bool(int(pure))
        p.ftype = LLAMA_FTYPE[ftype]
        if embed != "-":
            p.token_embedding_type = GGML_TYPE[embed]
        if output != "-":
            p.output_tensor_type = GGML_TYPE[output]
        rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(p))
        if rc != 0:
            raise SystemExit(f"llama_model_quantize returned {rc}")
        return
    if cmd == "tokenize":
        path, data = argv[1], open(argv[2], "rb").read()
        from llama_cpp import Llama
        llm = Llama(model_path=path, vocab_only=True, verbose=False)
        print(json.dumps(llm.tokenize(data, add_bos=False, special=False)))
        return
    if cmd == "ggml_quantize":
        import ctypes
        import llama_cpp
        qtype, xin, out = argv[1:4]
        libdir = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
        name = next(n for n in sorted(os.listdir(libdir)) if n.startswith("libggml-base"))
        lib = ctypes.CDLL(os.path.join(libdir, name))
        f = lib.ggml_quantize_chunk
        f.restype = ctypes.c_size_t
        f.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                      ctypes.c_int64, ctypes.c_void_p]
        lib.ggml_row_size.restype = ctypes.c_size_t
        lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
        x = np.ascontiguousarray(np.load(xin), dtype=np.float32)
        rows, n = x.shape
        t = GGML_TYPE[qtype]
        buf = np.zeros(rows * lib.ggml_row_size(t, n), np.uint8)
        f(t, x.ctypes.data, buf.ctypes.data, 0, rows, n, None)
        np.save(out, buf)
        return
    raise SystemExit(f"unknown command {cmd}")


if __name__ == "__main__":
    _child(sys.argv[1:])

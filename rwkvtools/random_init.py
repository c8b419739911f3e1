"""Random checkpoints of every version with the real key names and shapes, initialised like the
official trainers (RWKV-LM: v4neo for v4, RWKV-v5 x052/x060 for v5/v6, RWKV-v7 train_temp for v7).

``init="trainer"`` reproduces the trainers' scheme, which zero-initialises several matrices
(output projections, FFN value, LoRA down-projections). ``init="random"`` (default) keeps the
same scales but gives those matrices small random values, so that every path of a model is
exercised (tests, benchmarks, compression experiments)."""
from __future__ import annotations

import math
import os

import torch

from .checkpoint import Checkpoint, default_manifest
from .errors import RwkvToolsError

VERSIONS = ("4", "5.0", "5.1", "5.2", "6", "7")


def _lora_dim(c: int, factor: float, mult: int = 32) -> int:
    return max(32, int(round(factor * math.sqrt(c) / mult) * mult))


def _check_size(n_layer: int, n_embd: int, vocab: int, ffn_dim: int) -> None:
    """Refuse, before anything is allocated, a model whose fp32 tensors alone (a lower bound: the
    embedding, head, four time-mix and two channel-mix matrices per layer) exceed this machine's
    memory; such sizes failed deep in the allocator or ran for hours layer by layer."""
    params = 2 * vocab * n_embd + n_layer * (4 * n_embd * n_embd + 2 * n_embd * ffn_dim)
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        mem = 1 << 50
    if 4 * params > mem:
        raise RwkvToolsError(f"--layers {n_layer} --dim {n_embd} --vocab {vocab} --ffn-dim {ffn_dim}: at least "
                             f"{params:,} parameters ({4 * params / 2**30:,.0f} GiB in fp32), more than this "
                             f"machine's memory ({mem / 2**30:,.0f} GiB)")


def random_checkpoint(version: str = "7", n_layer: int = 2, n_embd: int = 64, vocab: int = 256,
                      head_size: int = 16, ffn_dim: int | None = None, seed: int = 0,
                      init: str = "random", dtype=torch.float32) -> Checkpoint:
    version = {"5": "5.2", "6.0": "6", "7.0": "7", "4.0": "4"}.get(str(version), str(version))
    if version not in VERSIONS:
        raise RwkvToolsError(f"unknown version '{version}'; known: {', '.join(VERSIONS)}")
    if init not in ("random", "trainer"):
        raise RwkvToolsError("init must be 'random' or 'trainer'")
    if n_layer < 1 or n_embd < 1 or vocab < 1:
        raise RwkvToolsError("layers, dim and vocab must be positive")
    if version != "4" and head_size < 1:
        raise RwkvToolsError(f"--head-size must be positive (got {head_size})")
    if ffn_dim is not None and ffn_dim < 1:
        raise RwkvToolsError(f"--ffn-dim must be positive (got {ffn_dim})")
    _check_size(n_layer, n_embd, vocab, ffn_dim or 4 * n_embd)
    C = n_embd
    if version != "4" and C % head_size:
        raise RwkvToolsError(f"--dim {C} is not a multiple of --head-size {head_size}")
    H = C // head_size if version != "4" else 1
    N = head_size
    if ffn_dim is None:
        ffn_dim = 4 * C if version in ("4", "7") else int(3.5 * C) // 32 * 32 or 4 * C
    F_ = ffn_dim
    g = torch.Generator().manual_seed(seed)
    rnd = init == "random"

    def U(*shape, scale=1.0):
        return (torch.rand(*shape, generator=g) * 2 - 1) * scale

    def Nrm(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    def ortho(rows, cols, gain=1.0):
        a = torch.randn(max(rows, cols), min(rows, cols), generator=g)
        q, _ = torch.linalg.qr(a)
        q = q[:, :min(rows, cols)]
        w = q if rows >= cols else q.t()
        return w[:rows, :cols].contiguous() * gain

    def zero_or_small(*shape, scale):
        return U(*shape, scale=scale) if rnd else torch.zeros(*shape)

    t: dict[str, torch.Tensor] = {}
    t["emb.weight"] = U(vocab, C, scale=1e-4) if not rnd else U(vocab, C, scale=0.5)
    t["blocks.0.ln0.weight"] = torch.ones(C) + (Nrm(C, scale=0.05) if rnd else 0)
    t["blocks.0.ln0.bias"] = Nrm(C, scale=0.05) if rnd else torch.zeros(C)
    ddd = torch.arange(C, dtype=torch.float32) / C
    sc = 1 / math.sqrt(C)
    for i in range(n_layer):
        p = f"blocks.{i}."
        r0 = i / max(n_layer - 1, 1)
        r1 = 1.0 - i / n_layer
        for ln in ("ln1", "ln2"):
            t[p + f"{ln}.weight"] = torch.ones(C) + (Nrm(C, scale=0.05) if rnd else 0)
            t[p + f"{ln}.bias"] = Nrm(C, scale=0.05) if rnd else torch.zeros(C)
        a = p + "att."
        f = p + "ffn."
        if version == "7":
            for name, e in (("x_r", 0.2), ("x_w", 0.9), ("x_k", 0.7), ("x_v", 0.7), ("x_a", 0.9), ("x_g", 0.2)):
                t[a + name] = (1.0 - torch.pow(ddd, e * r1)).reshape(1, 1, C)
            n = torch.arange(C, dtype=torch.float32)
            decay_speed = -7 + 5 * (n / max(C - 1, 1)) ** (0.85 + 1.0 * r0 ** 0.5)
            t[a + "w0"] = (decay_speed + 0.5).reshape(1, 1, C)
            dw, da, dv, dg = _lora_dim(C, 2.5), _lora_dim(C, 2.5), _lora_dim(C, 1.7), _lora_dim(C, 5)
            t[a + "w1"] = zero_or_small(C, dw, scale=0.1)
            t[a + "w2"] = ortho(dw, C, 0.1)
            t[a + "a0"] = torch.zeros(1, 1, C) + (Nrm(1, 1, C, scale=0.3) if rnd else 0)
            t[a + "a1"] = zero_or_small(C, da, scale=0.1)
            t[a + "a2"] = ortho(da, C, 0.1)
            if i > 0:
                t[a + "v0"] = torch.ones(1, 1, C) + (Nrm(1, 1, C, scale=0.3) if rnd else 0)
                t[a + "v1"] = zero_or_small(C, dv, scale=0.1)
                t[a + "v2"] = ortho(dv, C, 0.1)
            t[a + "g1"] = zero_or_small(C, dg, scale=0.1)
            t[a + "g2"] = ortho(dg, C, 0.1)
            t[a + "k_k"] = torch.full((1, 1, C), 0.85)
            t[a + "k_a"] = torch.ones(1, 1, C)
            t[a + "r_k"] = torch.full((H, N), -0.04) + (Nrm(H, N, scale=0.1) if rnd else 0)
            t[a + "receptance.weight"] = U(C, C, scale=0.5 * sc)
            t[a + "key.weight"] = U(C, C, scale=0.05 * sc) if not rnd else U(C, C, scale=0.5 * sc)
            t[a + "value.weight"] = U(C, C, scale=0.5 * sc)
            t[a + "output.weight"] = zero_or_small(C, C, scale=0.5 * sc)
            t[a + "ln_x.weight"] = torch.full((C,), ((1 + i) / n_layer) ** 0.7)
            t[a + "ln_x.bias"] = torch.zeros(C)
            t[f + "x_k"] = (1.0 - torch.pow(ddd, r1 ** 4)).reshape(1, 1, C)
            t[f + "key.weight"] = ortho(F_, C, math.sqrt(F_ / C) * 0.5 if rnd else 1.0)
            t[f + "value.weight"] = zero_or_small(C, F_, scale=0.5 / math.sqrt(F_))
            continue
        # v4 / v5 / v6 share the trainers' decay/bonus curves
        hh = torch.arange(C, dtype=torch.float32)
        decay_speed = -6 + 5 * (hh / max(C - 1, 1)) ** (0.7 + 1.3 * r0)
        zigzag = torch.tensor([(j + 1) % 3 - 1 for j in range(C)], dtype=torch.float32) * 0.1
        if version == "6":
            t[a + "time_maa_x"] = (1.0 - torch.pow(ddd, r1)).reshape(1, 1, C)
            for c, e in (("w", 1.0), ("k", 1.0), ("v", 1.0), ("r", 0.5), ("g", 0.5)):
                base = torch.pow(ddd, r1) if c != "v" else torch.pow(ddd, r1) + 0.3 * r0
                t[a + f"time_maa_{c}"] = (1.0 - torch.pow(ddd, e * r1) if c != "v" else 1.0 - base).reshape(1, 1, C)
            dm, dd = 32, 64
            t[a + "time_maa_w1"] = zero_or_small(C, 5 * dm, scale=0.1)
            t[a + "time_maa_w2"] = U(5, dm, C, scale=0.01)
            t[a + "time_decay"] = decay_speed.reshape(1, 1, C)
            t[a + "time_decay_w1"] = zero_or_small(C, dd, scale=0.1)
            t[a + "time_decay_w2"] = U(dd, C, scale=0.01)
            t[a + "time_faaaa"] = (r0 * (1 - hh / max(C - 1, 1)) + zigzag).reshape(H, N)
        else:
            t[a + "time_mix_k"] = torch.pow(ddd, r1).reshape(1, 1, C)
            t[a + "time_mix_v"] = (torch.pow(ddd, r1) + 0.3 * r0).reshape(1, 1, C)
            t[a + "time_mix_r"] = torch.pow(ddd, 0.5 * r1).reshape(1, 1, C)
            if version == "4":
                t[a + "time_decay"] = decay_speed
                t[a + "time_first"] = torch.ones(C) * math.log(0.3) + zigzag
            else:
                if version in ("5.1", "5.2"):
                    t[a + "time_mix_g"] = torch.pow(ddd, 0.5 * r1).reshape(1, 1, C)
                if version == "5.2":
                    t[a + "time_decay"] = decay_speed.reshape(H, N)
                    t[a + "time_faaaa"] = (r0 * (1 - hh / max(C - 1, 1)) + zigzag).reshape(H, N)
                else:
                    t[a + "time_decay"] = decay_speed.reshape(H, N).mean(1)
                    t[a + "time_first"] = torch.full((H,), math.log(0.3)) + Nrm(H, scale=0.1)
        A = C
        t[a + "receptance.weight"] = U(A, C, scale=0.5 * sc)
        t[a + "key.weight"] = U(A, C, scale=0.5 * sc)
        t[a + "value.weight"] = U(A, C, scale=0.5 * sc)
        t[a + "output.weight"] = zero_or_small(C, A, scale=0.5 * sc)
        if version in ("5.1", "5.2", "6"):
            t[a + "gate.weight"] = U(A, C, scale=0.5 * sc)
        if version != "4":
            t[a + "ln_x.weight"] = torch.ones(A) + (Nrm(A, scale=0.05) if rnd else 0)
            t[a + "ln_x.bias"] = torch.zeros(A)
        if version == "6":
            t[f + "time_maa_k"] = (1.0 - torch.pow(ddd, r1)).reshape(1, 1, C)
            t[f + "time_maa_r"] = (1.0 - torch.pow(ddd, r1)).reshape(1, 1, C)
        else:
            t[f + "time_mix_k"] = torch.pow(ddd, r1).reshape(1, 1, C)
            t[f + "time_mix_r"] = torch.pow(ddd, r1).reshape(1, 1, C)
        t[f + "key.weight"] = U(F_, C, scale=sc) if rnd else ortho(F_, C, 1.0)
        t[f + "receptance.weight"] = zero_or_small(C, C, scale=0.5 * sc)
        t[f + "value.weight"] = zero_or_small(C, F_, scale=0.5 / math.sqrt(F_))
    t["ln_out.weight"] = torch.ones(C) + (Nrm(C, scale=0.05) if rnd else 0)
    t["ln_out.bias"] = Nrm(C, scale=0.05) if rnd else torch.zeros(C)
    t["head.weight"] = ortho(vocab, C, 0.5 * math.sqrt(vocab / C) if vocab > C else 0.5)
    t = {k: v.to(dtype).contiguous() for k, v in t.items()}
    man = default_manifest()
    man["history"].append({"transform": "init", "options": {"version": version, "n_layer": n_layer, "n_embd": C,
                                                            "vocab": vocab, "head_size": head_size,
                                                            "ffn_dim": F_, "seed": seed, "init": init}})
    return Checkpoint(t, man)

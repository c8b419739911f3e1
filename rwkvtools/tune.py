"""End-to-end tuning of quantization scales by distillation (``quantize --tune-steps N``).

After rounding (rtn or GPTQ) every quantized matrix is ``W = L * s + m``: integer levels ``L``,
one scale ``s`` per group (per row for int8) and, for the asymmetric ggml formats Q4_1/Q5_1, one
offset ``m`` per group. The levels stay as they are; the scales (and offsets) are trained jointly,
through the whole model, to minimise the KL divergence from the original model's next-token
distribution to the quantized model's, on sequences drawn from the calibration text:

    s = s0 * exp(t),  m = m0 + s0 * u,  t = u = 0 at the start,  Adam on (t, u).

The objective is the original model's own predictions (distillation), not the text's next
tokens: the tuning recovers what rounding lost and does not fit the model to the calibration
text. The last eighth of the calibration sequences is held out: the tuned scales are kept only
if they lower the KL on it (else the rounded scales stay and the report says so). Scales are
stored in their file precision afterwards (fp16 for the ggml formats and int4, fp32 for int8),
so a ggml file is still read by rwkv.cpp / llama.cpp as it is (only the block scales change).

The idea is the step-size training of end-to-end quantization-aware methods (e.g. EfficientQAT's
E2E-QP), with a distillation loss; GPTQ's levels are its starting point.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import RwkvToolsError
from .io import ggml_quants
from .progress import progress_bar

TUNABLE = ("int8", "int4") + tuple(ggml_quants.BLOCK_TYPES)


@dataclass
class TensorScales:
    """One quantized matrix as levels and scales, in the layout its groups run along (the file
    layout for ggml: rows of ``shape[1]`` values, groups of ``group`` columns)."""
    levels: torch.Tensor            # (R, K) float32 integers (signed: the offset is folded in)
    scale: torch.Tensor             # (R, K // group) float32
    offset: torch.Tensor | None     # (R, K // group) float32, Q4_1/Q5_1 only
    group: int
    transposed: bool                # the model's matrix is levels' transpose
    storage: torch.dtype = torch.float16   # precision the file keeps scales (and offsets) in

    def to(self, device) -> "TensorScales":
        mv = (lambda t: None if t is None else t.to(device))
        return TensorScales(mv(self.levels), mv(self.scale), mv(self.offset), self.group, self.transposed, self.storage)

    def weight(self, scale: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
        R, K = self.levels.shape
        w = self.levels.reshape(R, K // self.group, self.group) * scale.unsqueeze(-1)
        if offset is not None:
            w = w + offset.unsqueeze(-1)
        w = w.reshape(R, K)
        return w.t() if self.transposed else w


class _TunedLinear(nn.Module):
    """A linear whose weight is levels x trained scales."""

    def __init__(self, ts: TensorScales):
        super().__init__()
        self.ts = ts
        self.t = nn.Parameter(torch.zeros_like(ts.scale))
        self.u = nn.Parameter(torch.zeros_like(ts.offset)) if ts.offset is not None else None
        self.fixed = None   # (scale, offset) in storage precision, once training is over

    def scales(self):
        if self.fixed is not None:
            return self.fixed
        s = self.ts.scale * torch.exp(self.t)
        m = None if self.u is None else self.ts.offset + self.ts.scale * self.u
        return s, m

    def freeze(self):
        """Round the trained scales to the file's precision and use those from now on."""
        with torch.no_grad():
            self.fixed = tuple(None if v is None else v.to(self.ts.storage).float() for v in self.scales())

    @property
    def weight(self):
        return self.ts.weight(*self.scales())

    def dense_weight(self):
        return self.weight

    @property
    def out_features(self):
        return self.weight.shape[0]

    def forward(self, x):
        return F.linear(x, self.weight)


# ------------------------------------------------------------------------------------ scales
def ggml_scales(qtype: str, blocks: np.ndarray, deq_file: torch.Tensor) -> TensorScales:
    """Levels and per-block d (and m) of a ggml 32-block matrix from its bytes and its dequantized
    values (file layout (R, K))."""
    R, K = deq_file.shape
    nbytes = ggml_quants.block_bytes(qtype)
    raw = np.asarray(blocks, dtype=np.uint8).reshape(-1, nbytes)
    d = torch.from_numpy(raw[:, 0:2].copy().view(np.float16).astype(np.float32)).reshape(R, K // 32)
    m = None
    if qtype in ("Q4_1", "Q5_1"):
        m = torch.from_numpy(raw[:, 2:4].copy().view(np.float16).astype(np.float32)).reshape(R, K // 32)
    w = deq_file.float().reshape(R, K // 32, 32)
    base = w if m is None else w - m.unsqueeze(-1)
    safe = torch.where(d == 0, torch.ones_like(d), d).unsqueeze(-1)
    lev = torch.where(d.unsqueeze(-1) == 0, torch.zeros_like(w), torch.round(base / safe))
    return TensorScales(lev.reshape(R, K), d, m, 32, False)


def int_scales(scheme: str, q: torch.Tensor, params: list) -> TensorScales:
    """Levels and scales of an int8 (per row) / int4 (per group, integer zero point folded into the
    levels) matrix in rwkvtools' format."""
    if scheme == "int8":
        return TensorScales(q.float(), params[0][0].float().reshape(-1, 1), None, q.shape[1], False, torch.float32)
    g = q.shape[1] // len(params)
    z = torch.stack([p[1] for p in params], dim=1).float()
    s = torch.stack([p[0] for p in params], dim=1).float()
    R, K = q.shape
    lev = q.float().reshape(R, K // g, g) - z.unsqueeze(-1)
    return TensorScales(lev.reshape(R, K), s, None, g, False)


# ------------------------------------------------------------------------------------ tuning
def _sequences(tokens, seq: int) -> torch.Tensor:
    t = torch.as_tensor(tokens, dtype=torch.long).flatten()
    n = t.numel() // seq
    return t[:n * seq].reshape(n, seq)


def _kl(teacher, student, x: torch.Tensor, with_grad: bool) -> torch.Tensor:
    """Mean per-token KL(teacher || student) over the sequences ``x`` (each from the empty state)."""
    from .transforms.heal import distill_kl
    with torch.no_grad():
        lt = teacher(x)[0]
    with torch.enable_grad() if with_grad else torch.no_grad():
        ls = student(x)[0]
        return distill_kl(ls.reshape(-1, ls.shape[-1]), lt.reshape(-1, lt.shape[-1]))


def _mean_kl(teacher, student, seqs: torch.Tensor, batch: int) -> float:
    tot = 0.0
    for i in range(0, seqs.shape[0], batch):
        x = seqs[i:i + batch]
        tot += float(_kl(teacher, student, x, False)) * x.shape[0]
    return tot / seqs.shape[0]


def tune_scales(teacher, student, scales: dict[str, TensorScales], tokens, steps: int, lr: float = 3e-3,
                batch: int = 16, seq: int = 512, progress: bool = False, seed: int = 0) -> dict:
    """Train the scales of ``scales`` ({linear prefix in ``student``: TensorScales}) for ``steps``
    Adam steps on batches of ``batch`` sequences of ``seq`` tokens of ``tokens``, KL(teacher ||
    student). ``student`` is the quantized model (its other quantized tensors already in place);
    its linears at those prefixes are replaced for the duration. Returns a report with the new
    scales ({prefix: (scale, offset)}, float32 holding values of the storage precision) under
    ``"scales"``; ``"kept"`` False (and ``"scales"`` None) when the held-out KL, measured with the
    stored precision, did not improve."""
    if steps < 1:
        raise RwkvToolsError("tuning needs at least one step")
    seqs_all = torch.as_tensor(tokens, dtype=torch.long).flatten()
    if seqs_all.numel() < 2 * seq:
        seq = max(2, seqs_all.numel() // 2)
    seqs = _sequences(seqs_all, seq).to(next(student.parameters()).device)
    if seqs.shape[0] < 2:
        raise RwkvToolsError(f"scale tuning needs at least 4 calibration tokens (two sequences: one to train on, one "
                             f"held out); the calibration text gives {seqs_all.numel()}")
    n_val = max(1, seqs.shape[0] // 8)
    train, val = seqs[:-n_val], seqs[-n_val:]
    old = {}
    mods = {}
    for prefix, ts in scales.items():
        parent, _, attr = prefix.rpartition(".")
        owner = student.get_submodule(parent) if parent else student
        old[prefix] = (owner, attr, getattr(owner, attr))
        mods[prefix] = _TunedLinear(ts)
        setattr(owner, attr, mods[prefix])
    for p in student.parameters():
        p.requires_grad_(False)
    params = []
    for m in mods.values():
        params.append(m.t)
        if m.u is not None:
            params.append(m.u)
    try:
        kl_before = _mean_kl(teacher, student, val, batch)
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=lr)
        gen = torch.Generator().manual_seed(seed)
        bar = progress_bar(steps, "tune scales", progress, unit="step")
        losses = []
        for _ in range(steps):
            x = train[torch.randint(0, train.shape[0], (min(batch, train.shape[0]),), generator=gen).to(train.device)]
            loss = _kl(teacher, student, x, True)
            if not torch.isfinite(loss):
                raise RwkvToolsError("scale tuning diverged (non-finite loss); lower --tune-lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if bar is not None:
                bar.update(1)
                bar.set_postfix(kl=f"{losses[-1]:.4g}")
        if bar is not None:
            bar.close()
        for p in params:
            p.requires_grad_(False)
        for m in mods.values():
            m.freeze()
        kl_after = _mean_kl(teacher, student, val, batch)
        new = {prefix: m.fixed for prefix, m in mods.items()}
    finally:
        for prefix, (owner, attr, mod) in old.items():
            setattr(owner, attr, mod)
    kept = math.isfinite(kl_after) and kl_after < kl_before and all(
        torch.isfinite(v).all() for sm in new.values() for v in sm if v is not None)
    return {"steps": steps, "lr": lr, "batch": batch, "seq": seq, "train_sequences": int(train.shape[0]),
            "heldout_sequences": int(val.shape[0]), "heldout_kl_before": kl_before, "heldout_kl_after": kl_after,
            "first_loss": losses[0], "last_loss": losses[-1], "kept": kept, "scales": new if kept else None}

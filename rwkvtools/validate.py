"""Validation: perplexity over a text with the state carried across the whole text, logits drift
against a reference model, and gates that turn a report into pass/fail."""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .errors import GateError, RwkvToolsError
from .progress import progress_bar

DEFAULT_CHUNK = 1024


@dataclass
class PerplexityResult:
    ppl: float
    nll_per_token: float
    tokens: int          # tokens read (predictions = tokens - 1)
    tokens_per_s: float
    backend: str
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = {"ppl": self.ppl, "nll_per_token": self.nll_per_token, "tokens": self.tokens,
             "predictions": max(self.tokens - 1, 0), "tokens_per_s": self.tokens_per_s,
             "backend": self.backend, "seconds": self.seconds}
        d.update(self.extra)
        return d


def _progress(total: int, enabled: bool | None):
    if enabled is None:  # long texts in a terminal only
        enabled = total >= 4096 and sys.stderr.isatty()
    return progress_bar(total, "perplexity", enabled, unit="tok")


@torch.inference_mode()
def perplexity(model, tokens: list[int] | torch.Tensor, chunk_len: int = DEFAULT_CHUNK,
               progress: bool | None = None, head_chunk: int = 512) -> PerplexityResult:
    """exp(mean NLL) of every token after the first, the state carried through the whole text,
    processed in chunks of ``chunk_len`` tokens."""
    from . import ops
    toks = torch.as_tensor(tokens, dtype=torch.long).flatten()
    n = toks.numel()
    if n < 2:
        raise RwkvToolsError(f"perplexity needs at least 2 tokens, the text gives {n}")
    device = model.emb.device if hasattr(model, "emb") else "cpu"
    toks = toks.to(device)
    inp, tgt = toks[:-1], toks[1:]
    state = None
    nll = 0.0
    bar = _progress(n - 1, progress)
    backend = None
    t0 = time.perf_counter()
    for s in range(0, n - 1, chunk_len):
        x = inp[s:s + chunk_len].unsqueeze(0)
        y = tgt[s:s + chunk_len]
        if backend is None:
            backend = getattr(model, "backend", None) or ops.backend_for(model.emb, x.shape[1])
        if not hasattr(model, "forward_hidden"):  # e.g. an exported ONNX model: logits only
            logits, state = model(x, state)
            if logits.shape[1] != y.numel():
                raise RwkvToolsError("the model returns only the last position's logits; perplexity needs all of them")
            nll += F.cross_entropy(logits[0].float(), y, reduction="sum").item()
        else:
            h, state = model.forward_hidden(x, state)
            h = h[0]
            for j in range(0, h.shape[0], head_chunk):
                nll += head_nll_sum(model.head, h[j:j + head_chunk], y[j:j + head_chunk])
        if bar is not None:
            bar.update(x.shape[1])
    if bar is not None:
        bar.close()
    dt = time.perf_counter() - t0
    m = nll / (n - 1)
    return PerplexityResult(ppl=ppl_of(m), nll_per_token=m, tokens=n, tokens_per_s=n / dt if dt > 0 else float("inf"),
                            backend=backend or "chunked", seconds=dt)


def head_nll_sum(head, h: torch.Tensor, y: torch.Tensor, vocab_block: int = 1024) -> float:
    """sum_t -log softmax(head(h_t))[y_t] for hidden states h (T, C).

    A dense head is applied one block of the vocabulary at a time, with a running logsumexp:
    each block's logits stay in cache and the (T, vocab) logits are never materialised (about
    1.4x faster on CPU than one big matmul + cross_entropy, and T*vocab*4 bytes less memory).
    Other heads (quantized, low-rank) go through their own forward."""
    from .model.linear import DenseLinear
    if not isinstance(head, DenseLinear):
        return F.cross_entropy(head(h).float(), y, reduction="sum").item()
    W = head.weight
    V = W.shape[0]
    lse = None
    tgt = torch.zeros(y.shape, dtype=torch.float32, device=h.device)
    for v0 in range(0, V, vocab_block):
        v1 = min(v0 + vocab_block, V)
        logits = F.linear(h, W[v0:v1]).float()
        blk = torch.logsumexp(logits, -1)
        lse = blk if lse is None else torch.logaddexp(lse, blk)
        # the target logit of the rows whose target lies in this block (no host sync on a GPU)
        idx = (y - v0).clamp(0, v1 - v0 - 1).unsqueeze(1)
        tgt += torch.where((y >= v0) & (y < v1), logits.gather(1, idx).squeeze(1), 0.0)
    return float((lse - tgt).sum())


@torch.inference_mode()
def drift_logits(model, tokens, max_tokens: int = 256) -> torch.Tensor:
    """The logits logits_drift compares (fp32, on the CPU): a model's part of the drift, so that
    the two models need not be in memory at once."""
    toks = torch.as_tensor(tokens[:max_tokens], dtype=torch.long).unsqueeze(0)
    with torch.no_grad():
        la, _ = model(toks.to(model.emb.device))
    return la.float().cpu()


def drift_between(la: torch.Tensor, lb: torch.Tensor) -> dict:
    d = (la - lb).abs()
    return {"max_abs": float(d.max()), "mean_abs": float(d.mean()), "tokens": int(la.shape[1])}


def logits_drift(model_a, model_b, tokens, max_tokens: int = 256) -> dict:
    """Max and mean absolute difference of logits between two models on the same tokens."""
    return drift_between(drift_logits(model_a, tokens, max_tokens), drift_logits(model_b, tokens, max_tokens))


def ppl_of(nll_per_token: float) -> float:
    """exp(mean NLL); inf where that overflows a float (a model whose logits blow up), NaN stays NaN."""
    if math.isnan(nll_per_token):
        return nll_per_token
    return math.exp(nll_per_token) if nll_per_token < 709.0 else math.inf


@dataclass
class Gate:
    metric: str        # e.g. "ppl_increase_pct"
    max: float | None = None
    min: float | None = None

    def __post_init__(self):
        for b in (self.max, self.min):
            if b is not None and (isinstance(b, bool) or not isinstance(b, (int, float)) or math.isnan(b)):
                raise RwkvToolsError(f"gate on {self.metric}: the bound must be a number, got {b!r}")

    def check(self, report: dict) -> tuple[bool, str]:
        if self.metric not in report:
            return False, f"{self.metric}: not measured"
        v = report[self.metric]
        if not isinstance(v, (int, float)) or isinstance(v, bool) or math.isnan(v):
            return False, f"{self.metric} = {v} is not a number (the model's outputs are not finite?)"
        if self.max is not None and v > self.max:
            return False, f"{self.metric} = {v:.6g} > {self.max:g}"
        if self.min is not None and v < self.min:
            return False, f"{self.metric} = {v:.6g} < {self.min:g}"
        return True, f"{self.metric} = {v:.6g} ok"


def apply_gates(report: dict, gates: list[Gate]) -> list[dict]:
    """Evaluate every gate; record verdicts in report['gates']; raise one GateError listing all
    failures (after recording them)."""
    verdicts = []
    for g in gates:
        ok, msg = g.check(report)
        verdicts.append({"metric": g.metric, "max": g.max, "min": g.min, "passed": ok, "detail": msg})
    report["gates"] = verdicts
    report["passed"] = all(v["passed"] for v in verdicts)
    return verdicts


def raise_on_failed(report: dict) -> None:
    failed = [v for v in report.get("gates", []) if not v["passed"]]
    if failed:
        table = "\n".join(f"  FAIL  {v['detail']}" for v in failed)
        raise GateError(f"{len(failed)} gate(s) failed:\n{table}")


# --------------------------------------------------------------------------- transform reports
def packaged_text(kind: str) -> str:
    """Path of the texts shipped with rwkvtools (Tiny Shakespeare, public domain): 'heldout' for
    evaluation, 'calib' for calibration; disjoint slices of the same book."""
    import os
    return os.path.join(os.path.dirname(__file__), "data", f"{kind}.txt")


def text_tokens(path: str | None, vocab: int, kind: str = "heldout", tokenizer: str = "auto",
                max_tokens: int | None = None, encoding: str = "utf-8", tokenizer_file: str | None = None) -> list[int]:
    """Tokens of a text file (the packaged held-out/calibration text when ``path`` is None)."""
    from .tokenizer import Tokenizer, read_text
    tok = Tokenizer(tokenizer, vocab, tokenizer_file, encoding)
    ids = tok.encode(read_text(path or packaged_text(kind)))
    return ids[:max_tokens] if max_tokens else ids


def checkpoint_bytes(ckpt) -> int:
    n = 0
    for k in ckpt.tensors:
        t = ckpt.tensors[k]
        n += t.numel() * t.element_size()
    return n


def validate_transform(before, after, tokens, max_ppl_increase: float | None = None,
                       chunk_len: int = DEFAULT_CHUNK, drift_tokens: int = 256, device="cpu",
                       identical: bool = False) -> dict:
    """Perplexity before and after a transform on the same tokens, logits drift, sizes, and the
    max-perplexity-increase gate (percent). Returns the report (``passed`` set); never raises on
    a failed gate (the caller writes the report first, then calls raise_on_failed).
    One model is in memory at a time (the drift keeps the first model's logits on the first
    ``drift_tokens`` tokens only). ``identical``: the caller compared every tensor of ``after``
    with ``before`` and found them equal (convert's read-back), so the model is scored once."""
    import gc

    from .model import build_model

    def score(ckpt):
        m = build_model(ckpt, device=device)
        p = perplexity(m, tokens, chunk_len=chunk_len, progress=False)
        return p, drift_logits(m, tokens, drift_tokens)
    p0, l0 = score(before)
    gc.collect()   # the first model's weights go before the second is built
    p1, l1 = (p0, l0) if identical else score(after)
    rep = {"ppl_before": p0.ppl, "ppl_after": p1.ppl,
           "ppl_increase_pct": 100.0 * (p1.ppl / p0.ppl - 1.0),
           "eval_tokens": len(tokens), "backend": p1.backend,
           "logits_drift": drift_between(l0, l1),
           "params_before": before.num_params(), "params_after": after.num_params(),
           "bytes_before": checkpoint_bytes(before), "bytes_after": checkpoint_bytes(after)}
    if identical:
        rep["scored_once"] = "every tensor reads back identical to the source's: the same model, scored once"
    gates = [] if max_ppl_increase is None else [Gate("ppl_increase_pct", max=max_ppl_increase)]
    apply_gates(rep, gates)
    if math.isfinite(p0.ppl) and not math.isfinite(p1.ppl):  # scored finite and no longer does: broken,
        rep["gates"].append({"metric": "ppl_after", "max": None, "min": None, "passed": False,  # gate or none
                             "detail": f"ppl_after = {p1.ppl} is not finite (ppl_before {p0.ppl:.6g}): the "
                                       "transformed model's outputs are NaN or Inf"})
        rep["passed"] = False
    return rep

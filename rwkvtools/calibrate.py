"""Calibration: statistics of the inputs of linear layers, collected through the reference model
on calibration text, one block at a time.

One module serves every transform that needs activations: lowrank's whitening (SVD-LLM), GPTQ's
Hessians (quantize) and recursive's whitened LoRA init all use the Gram matrix X^T X (float64)
of a linear's inputs. Blocks are processed in order: the calibration sequence is embedded once,
then each block runs over it (in chunks, its state carried) with hooks that accumulate the Grams
of the requested linears; a consumer may modify the block before the sequence moves on
(``sequential=True`` recomputes the block's outputs with the modified block, as GPTQ does), so a
large model never holds more than one block's statistics and one copy of the activations.
"""
from __future__ import annotations

import math

from typing import Callable, Iterator

import torch

from .errors import RwkvToolsError


class Gram:
    """Running X^T X and row count of a linear's inputs (float64)."""

    def __init__(self, n_in: int, device="cpu"):
        self.xtx = torch.zeros(n_in, n_in, dtype=torch.float64, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(torch.float64)
        self.xtx.addmm_(x.t(), x)
        self.n += x.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        """E[x x^T] (the Gram divided by the row count)."""
        return self.xtx / max(self.n, 1)


def linears_of(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """checkpoint prefix -> linear module, for every linear built by model.linear.make_linear."""
    return {m.prefix: m for m in module.modules() if hasattr(m, "prefix")}


def _run_block(blk, x: torch.Tensor, v_first, chunk_len: int):
    """Run one block over the whole sequence (batch 1) in chunks, carrying its own state."""
    model_state = None
    outs, vfs = [], []
    T = x.shape[1]
    for s in range(0, T, chunk_len):
        xs = x[:, s:s + chunk_len]
        if model_state is None:
            model_state = _zero_block_state(blk, xs)
        vf = v_first[:, s:s + chunk_len] if v_first is not None else None
        y, model_state, vf_out = blk(xs, model_state, vf)
        outs.append(y)
        if vf_out is not None:
            vfs.append(vf_out)
    return torch.cat(outs, 1), (torch.cat(vfs, 1) if vfs else None)


def _zero_block_state(blk, xs):
    spec = blk.att_spec
    B, C = xs.shape[0], xs.shape[-1]
    z = {"att_x": xs.new_zeros(B, C), "ffn_x": xs.new_zeros(B, C)}
    if spec.major == 4:
        for k in ("aa", "bb", "pp"):
            z[k] = torch.zeros(B, spec.dim_att, dtype=torch.float32, device=xs.device)
    else:
        z["wkv"] = torch.zeros(B, spec.n_head, spec.head_size, spec.head_size, dtype=torch.float32, device=xs.device)
    return z


@torch.no_grad()
def calibrate_blocks(model, tokens, select: Callable[[str], bool], chunk_len: int = 512,
                     sequential: bool = False) -> Iterator[tuple[int, dict[str, Gram]]]:
    """Yield (layer index, {prefix: Gram}) for every block, in order. ``select(prefix)`` picks the
    linears to collect. Between yields the consumer may change the block's linears; with
    ``sequential=True`` the block is then re-run so later blocks see its new outputs."""
    toks = torch.as_tensor(tokens, dtype=torch.long).reshape(1, -1)
    if toks.shape[1] < 2:
        raise RwkvToolsError("calibration needs at least 2 tokens")
    toks = toks.to(model.emb.device)
    x = model.embed(toks)
    v_first = None
    for i, blk in enumerate(model.blocks):
        blk.att_spec = model.spec
        grams: dict[str, Gram] = {}
        handles = []
        for prefix, lin in linears_of(blk).items():
            if not select(prefix):
                continue

            def hook(mod, inp, out, prefix=prefix):
                a = inp[0]
                if prefix not in grams:
                    grams[prefix] = Gram(a.shape[-1], a.device)
                grams[prefix].add(a)
            handles.append(lin.register_forward_hook(hook))
        try:
            x_out, vf = _run_block(blk, x, v_first, chunk_len)
        finally:
            for h in handles:
                h.remove()
        yield i, grams
        if sequential:
            x_out, vf = _run_block(blk, x, v_first, chunk_len)
        x = x_out
        if i == 0 and vf is not None:
            v_first = vf
        if model.rescale_every and (i + 1) % model.rescale_every == 0:
            x = x / 2


def collect_grams(model, tokens, select: Callable[[str], bool], chunk_len: int = 512) -> dict[str, Gram]:
    """All Grams at once (small models, tests). Large models should iterate calibrate_blocks."""
    out: dict[str, Gram] = {}
    for _, g in calibrate_blocks(model, tokens, select, chunk_len):
        out.update(g)
    return out


def check_calibration_options(error, calib_tokens, chunk_len, damp=None, damp_positive: bool = False) -> None:
    """The checks every calibrated transform makes of its calibration options; raises ``error``
    (the transform's own error class) with a message naming the bad option."""
    if isinstance(calib_tokens, bool) or not isinstance(calib_tokens, int) or calib_tokens < 2:
        raise error(f"calib_tokens must be an integer >= 2, got {calib_tokens!r}")
    if isinstance(chunk_len, bool) or not isinstance(chunk_len, int) or chunk_len < 1:
        raise error(f"chunk_len must be a positive integer, got {chunk_len!r}")
    if damp is None:
        return
    bad = (isinstance(damp, bool) or not isinstance(damp, (int, float)) or not math.isfinite(damp)
           or (damp <= 0 if damp_positive else damp < 0))
    if bad:
        raise error(f"damp must be a finite number {'> 0' if damp_positive else '>= 0'}, got {damp!r}")


def calibration_tokens(path: str | None, vocab: int, n: int, tokenizer: str = "auto",
                       encoding: str = "utf-8", tokenizer_file: str | None = None) -> list[int]:
    """The first ``n`` tokens of a calibration text (default: the packaged calibration text,
    disjoint from the packaged held-out text). Shared by lowrank, quantize and recursive."""
    from .validate import text_tokens
    toks = text_tokens(path, vocab, "calib", tokenizer, n, encoding, tokenizer_file)
    if len(toks) < 2:
        raise RwkvToolsError(f"the calibration text {path or '(packaged)'} gives {len(toks)} tokens; need at least 2")
    return toks

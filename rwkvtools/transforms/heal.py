"""Healing a compressed model by knowledge distillation from the original.

The student (a recursive or lowrank output, or any checkpoint) is trained to match the teacher's
next-token distribution: loss = T^2 KL(softmax(teacher / T) || softmax(student / T)) per token,
optionally plus ``lm_weight`` times the language-model cross-entropy, through the differentiable
chunked forward of the reference model (fp32, AdamW, linear warm-up then cosine decay, gradient
clipping). Every sequence starts from the empty state.

Only the requested parameters train (the model is built with requires_grad=False everywhere):
``lora`` (the LoRA relaxation of a recursive model), ``lowrank`` (the U/V factors of a lowrank
output), ``shared`` (the shared block matrices), ``all`` (every floating tensor of the
checkpoint), ``auto`` (default: lora + lowrank, whichever the student has). Every other tensor of
the output is the student's own, bit for bit. Deterministic for a seed on a given device.

Trainable parameters are tied to checkpoint names through their storage: the model is built
from fp32 copies of the student's tensors, and its parameters are those tensors (or views of
them), so each parameter is written back under the name it came from.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ..checkpoint import Checkpoint, stored_forms
from ..errors import RwkvToolsError
from ..progress import progress_bar

TRAIN_GROUPS = ("auto", "lora", "lowrank", "shared", "all")


class HealError(RwkvToolsError):
    """Bad heal options, or a student/teacher pair that cannot be distilled."""


def parse_train(train) -> tuple[str, ...]:
    items = train.split(",") if isinstance(train, str) else list(train)
    out = []
    for it in (s.strip() for s in items):
        if not it:
            continue
        if it not in TRAIN_GROUPS:
            raise HealError(f"unknown --train group '{it}'; known: {', '.join(TRAIN_GROUPS)}")
        if it not in out:
            out.append(it)
    if not out:
        raise HealError("--train needs at least one group")
    return tuple(out)


_F32_MAX = torch.finfo(torch.float32).max


@dataclass(frozen=True)
class HealConfig:
    tokens: int = 65536          # training tokens (the budget): steps = ceil(tokens / (batch * seq_len))
    seq_len: int = 256           # tokens per training sequence
    batch_size: int = 4          # sequences per step
    lr: float = 1e-3             # peak learning rate
    train: tuple = ("auto",)     # parameter groups to train
    lm_weight: float = 0.0       # weight of the language-model loss added to the KL
    temperature: float = 1.0     # distillation temperature
    warmup: float = 0.05         # share of steps with a linear warm-up
    min_lr: float = 0.1          # final learning rate, relative to lr (cosine decay)
    weight_decay: float = 0.0
    grad_clip: float = 1.0       # max global gradient norm (0: off)
    seed: int = 0
    device: str = "cpu"          # cpu | cuda | cuda:N | auto
    eval_chunk: int = 256        # tokens per forward in the held-out evaluation

    def __post_init__(self):
        object.__setattr__(self, "train", parse_train(self.train))
        for name in ("tokens", "seq_len", "batch_size", "eval_chunk"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise HealError(f"{name} must be a positive integer, got {v!r}")
        if self.seq_len < 2:
            raise HealError("seq_len must be at least 2")
        for name, lo in (("lr", 0.0), ("temperature", 0.0)):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= lo:
                raise HealError(f"{name} must be a positive number, got {v!r}")
        # training runs in float32: the step size must be a float32 and the KL's temperature**2 too
        # (beyond, torch raised 'value cannot be converted to type float without overflow' and
        # temperature**2 an OverflowError, both mid-training)
        for name, hi in (("lr", _F32_MAX), ("temperature", math.sqrt(_F32_MAX))):
            v = getattr(self, name)
            if v > hi:
                raise HealError(f"{name} must be at most {hi:.3g} (training runs in float32), got {v!r}")
        for name in ("lm_weight", "weight_decay", "grad_clip"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise HealError(f"{name} must be a number >= 0, got {v!r}")
        for name in ("warmup", "min_lr"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0 <= v <= 1:
                raise HealError(f"{name} must be in [0, 1], got {v!r}")
        if not isinstance(self.seed, int):
            raise HealError(f"seed must be an integer, got {self.seed!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["train"] = ",".join(self.train)
        return d


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise HealError(f"unknown device '{device}' (cpu, cuda, cuda:N or auto)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise HealError("--device cuda: no CUDA device is available here (use cpu or auto)")
    return dev


# ------------------------------------------------------------------------------- the student
def _raw_parallel(ckpt: Checkpoint) -> Checkpoint:
    """The stored tensors in parallel form (TiedView unwrapped: each tensor once)."""
    from ..model.shared import TiedView
    from . import prepare_for_model
    c = prepare_for_model(ckpt)
    if isinstance(c.tensors, TiedView):
        c = Checkpoint(c.tensors.base, c.manifest, c.source)
    return c


def _tie_shared_storage(model: torch.nn.Module) -> None:
    """Parameters that are views of the same stored tensor (small tensors a recursive checkpoint
    ties across layers) become one Parameter object, so they train as one tensor."""
    seen: dict[tuple, torch.nn.Parameter] = {}
    for mod in model.modules():
        for k, p in list(mod._parameters.items()):
            if p is None:
                continue
            key = (p.data_ptr(), tuple(p.shape), tuple(p.stride()), p.dtype)
            q = seen.setdefault(key, p)
            if q is not p:
                mod._parameters[k] = q


def _param_names(model: torch.nn.Module, tensors: dict) -> dict[int, str]:
    """id(parameter) -> the checkpoint name whose storage it is."""
    by_ptr = {}
    for k, t in tensors.items():
        if t.is_floating_point() and t.numel():
            by_ptr[(t.data_ptr(), t.numel())] = k
    out = {}
    for p in model.parameters():
        k = by_ptr.get((p.data_ptr(), p.numel()))
        if k is not None:
            out[id(p)] = k
    return out


def _select(model, names: dict[int, str], groups: tuple[str, ...]) -> list[torch.nn.Parameter]:
    from ..model.linear import LowRankLinear
    from ..model.shared import SharedLoRALinear
    picked: dict[int, torch.nn.Parameter] = {}

    def add(p):
        if p is not None:
            picked[id(p)] = p

    want = set(groups)
    if "auto" in want:
        want |= {"lora", "lowrank"}
    for m in model.modules():
        if isinstance(m, SharedLoRALinear):
            if "lora" in want:
                add(m.lora_a)
                add(m.lora_b)
            if "shared" in want:
                add(m.shared_weight)
        elif isinstance(m, LowRankLinear) and "lowrank" in want:
            add(m.weight_u)
            add(m.weight_v)
    if "all" in want:
        for p in model.parameters():
            if p.is_floating_point():
                add(p)
    params = list(picked.values())
    if not params:
        if "auto" in groups:
            raise HealError("nothing to train: the student has no LoRA relaxation (recursive) or low-rank factors "
                            "(lowrank); pass --train all (or shared) to train its other tensors")
        raise HealError(f"nothing to train: the student has no parameters of group(s) {', '.join(groups)}")
    unnamed = [p for p in params if id(p) not in names]
    if unnamed:  # a parameter derived from stored tensors cannot be written back
        raise HealError(f"{len(unnamed)} parameter(s) of the requested groups are not stored tensors and "
                        "cannot be trained; choose other --train groups")
    return params


# -------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_pair(student, teacher, tokens, chunk: int = 256, temperature: float = 1.0) -> dict:
    """Held-out perplexity of both models and the mean per-token KL(teacher || student), the
    state carried through the whole text."""
    toks = torch.as_tensor(tokens, dtype=torch.long).flatten()
    n = toks.numel()
    if n < 2:
        raise HealError(f"evaluation needs at least 2 tokens, got {n}")
    dev = student.emb.device
    toks = toks.to(dev)
    inp, tgt = toks[:-1], toks[1:]
    ss = ts = None
    nll_s = nll_t = kl = 0.0
    for s in range(0, n - 1, chunk):
        x = inp[s:s + chunk].unsqueeze(0)
        y = tgt[s:s + chunk]
        ls, ss = student(x, ss)
        lt, ts = teacher(x, ts)
        ls, lt = ls[0].float(), lt[0].float()
        nll_s += float(F.cross_entropy(ls, y, reduction="sum"))
        nll_t += float(F.cross_entropy(lt, y, reduction="sum"))
        kl += float(distill_kl(ls, lt, temperature, "sum"))
    m = n - 1
    from .. import ops
    from ..validate import ppl_of
    return {"ppl_student": ppl_of(nll_s / m), "ppl_teacher": ppl_of(nll_t / m), "kl": kl / m,
            "eval_tokens": n, "backend": ops.backend_for(student.emb, min(chunk, m))}


def distill_kl(ls, lt, temperature: float = 1.0, reduction: str = "mean"):
    """T^2 KL(softmax(lt/T) || softmax(ls/T)) summed over the vocabulary, per token."""
    lps = F.log_softmax(ls / temperature, -1)
    lpt = F.log_softmax(lt / temperature, -1)
    per = (lpt.exp() * (lpt - lps)).sum(-1) * temperature ** 2
    return per.sum() if reduction == "sum" else per.mean()


# --------------------------------------------------------------------------------------- heal
def _progress(total: int, enabled: bool | None):
    return progress_bar(total, "heal", enabled, unit="tok", unit_scale=True)


def _lr_at(step: int, steps: int, cfg: HealConfig) -> float:
    wu = int(round(cfg.warmup * steps))
    if wu and step < wu:
        return cfg.lr * (step + 1) / wu
    if steps - wu <= 1:
        return cfg.lr
    p = (step - wu) / (steps - wu - 1)
    return cfg.lr * (cfg.min_lr + (1 - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * p)))


def heal(student: Checkpoint, teacher: Checkpoint, train_tokens, config: HealConfig,
         eval_tokens=None, progress: bool | None = None) -> tuple[Checkpoint, dict]:
    """Distil ``teacher`` into ``student`` on ``train_tokens``; returns the healed checkpoint
    (one history entry appended) and the report (training cost, loss, and with ``eval_tokens``
    the held-out perplexity and KL before and after)."""
    from ..model import build_model
    from ..spec import detect
    cfg = config
    dev = resolve_device(cfg.device)
    if student.form == "rnn":  # healed in the parallel form, it could not give back SRC's other tensors bit for bit
        raise HealError("the student is in the RNN form; heal trains the parallel (training) form: convert it "
                        "first (rwkvtools convert SRC PARALLEL.safetensors --to parallel) and heal that")
    if "quantized" in stored_forms(student.tensors):
        raise HealError("the student's linears are int8/int4: heal trains float tensors; heal the float model, "
                        "then quantize it")
    src = _raw_parallel(student)
    s_spec = detect(_view(src).tensors, src.manifest)
    t_view = _raw_parallel(teacher)
    t_spec = detect(_view(t_view).tensors, t_view.manifest)
    if s_spec.vocab != t_spec.vocab:
        raise HealError(f"student vocabulary {s_spec.vocab} != teacher vocabulary {t_spec.vocab}: "
                        "the teacher must be the model the student was made from")
    toks = torch.as_tensor(train_tokens, dtype=torch.long).flatten()
    if toks.numel() and (int(toks.min()) < 0 or int(toks.max()) >= s_spec.vocab):
        raise HealError(f"training tokens must lie in [0, {s_spec.vocab})")
    T, B = cfg.seq_len, cfg.batch_size
    n_win = (toks.numel() - 1) // T
    if n_win < 1:
        raise HealError(f"the training text gives {toks.numel()} tokens; --seq-len {T} needs at least {T + 1}")
    if B > n_win:  # a batch repeats no window (a huge --batch-size looped on shuffles until memory ran out)
        raise HealError(f"--batch-size {B} is more than the {n_win} windows of --seq-len {T} tokens in the "
                        f"training text; use at most {n_win}, a longer --text or a shorter --seq-len")

    torch.manual_seed(cfg.seed)
    raw = src.tensors
    work = {k: (raw[k].detach().to(torch.float32).clone() if raw[k].is_floating_point() else raw[k]) for k in raw}
    model = build_model(Checkpoint(work, src.manifest, src.source), device="cpu", dtype=torch.float32)
    _tie_shared_storage(model)
    names = _param_names(model, work)
    params = _select(model, names, cfg.train)
    for p in params:
        p.requires_grad_(True)
    model.to(dev)
    tmodel = build_model(teacher, device=dev, dtype=torch.float32)
    n_train = sum(p.numel() for p in params)

    # the held-out KL is the plain one (temperature 1): a measure of the model, not of --temperature
    before = evaluate_pair(model, tmodel, eval_tokens, cfg.eval_chunk) if eval_tokens is not None else None

    steps = max(1, math.ceil(cfg.tokens / (B * T)))
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=cfg.weight_decay)
    order = torch.empty(0, dtype=torch.long)
    bar = _progress(steps * B * T, progress)
    losses: list[float] = []
    curve = []
    t0 = time.perf_counter()
    model.train()
    for step in range(steps):
        while order.numel() < B:
            order = torch.cat([order, torch.randperm(n_win, generator=gen)])
        idx, order = order[:B], order[B:]
        starts = idx * T
        batch = torch.stack([toks[s:s + T + 1] for s in starts.tolist()]).to(dev)
        x, y = batch[:, :-1], batch[:, 1:]
        with torch.no_grad():
            lt, _ = tmodel(x)
        ls, _ = model(x)
        loss = distill_kl(ls.float().reshape(-1, ls.shape[-1]), lt.float().reshape(-1, lt.shape[-1]), cfg.temperature)
        if cfg.lm_weight:
            loss = loss + cfg.lm_weight * F.cross_entropy(ls.float().reshape(-1, ls.shape[-1]), y.reshape(-1))
        lr = _lr_at(step, steps, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        lv = float(loss.detach())
        if not math.isfinite(lv):
            raise HealError(f"the loss became {lv} at step {step + 1}; lower --lr")
        losses.append(lv)
        if step == 0 or (step + 1) % max(1, steps // 20) == 0 or step == steps - 1:
            curve.append({"step": step + 1, "tokens": (step + 1) * B * T, "loss": lv})
        if bar is not None:
            dt = time.perf_counter() - t0
            bar.update(B * T)
            bar.set_postfix(loss=f"{lv:.4f}", tok_s=f"{(step + 1) * B * T / max(dt, 1e-9):.0f}", refresh=False)
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0
    model.eval()
    for p in params:
        p.requires_grad_(False)
    after = evaluate_pair(model, tmodel, eval_tokens, cfg.eval_chunk) if eval_tokens is not None else None

    # write back exactly the trained tensors, in the student's dtypes
    new = dict(raw.items()) if isinstance(raw, dict) else {k: raw[k] for k in raw}
    trained = []
    for p in params:
        k = names[id(p)]
        new[k] = p.detach().to("cpu").reshape(raw[k].shape).to(raw[k].dtype).contiguous()
        trained.append(k)
    tail = max(1, len(losses) // 10)
    report = {"tokens_trained": steps * B * T, "steps": steps, "seconds": seconds,
              "minutes": seconds / 60.0, "tokens_per_s": steps * B * T / seconds if seconds > 0 else float("inf"),
              "device": str(dev), "trained_tensors": len(trained), "trained_params": n_train,
              "loss_first": losses[0], "loss_last": sum(losses[-tail:]) / tail, "curve": curve}
    if before is not None:
        report.update({"eval_tokens": before["eval_tokens"], "ppl_teacher": before["ppl_teacher"],
                       "ppl_before": before["ppl_student"], "ppl_after": after["ppl_student"],
                       "kl_before": before["kl"], "kl_after": after["kl"], "backend": after["backend"]})
        lost = math.log(before["ppl_student"]) - math.log(before["ppl_teacher"])
        gained = math.log(before["ppl_student"]) - math.log(after["ppl_student"])
        report["recovered"] = gained / lost if lost > 0 else None
    entry = {"transform": "heal",
             "options": {**cfg.to_dict(), "teacher": teacher.source},
             "results": {k: v for k, v in report.items() if k != "curve"}}
    out = src.with_tensors({k: new[k] for k in raw}, entry=entry)
    return out, report


def _view(ckpt: Checkpoint) -> Checkpoint:
    from . import prepare_for_model
    return prepare_for_model(ckpt)

"""Run an ONNX file exported by rwkvtools through onnxruntime with the reference model's calling
convention: ``OnnxModel(path)(tokens[B, T], state) -> (logits[B, T, V], state)``, torch tensors
in and out, so that ``validate.perplexity`` and ``rwkvtools eval`` judge it like a checkpoint."""
from __future__ import annotations

import math
import os
import re

import numpy as np
import torch

from ..checkpoint import load_json
from ..errors import FormatError, RwkvToolsError


def cuda_usable() -> bool:
    """True when onnxruntime has its CUDA provider and a CUDA device is present."""
    try:
        import onnxruntime as ort
    except ImportError:  # pragma: no cover
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available()


def ort_reason(e: Exception) -> str:
    """The reason in an onnxruntime load error, without its prefix, the file's path and the C++
    source location and signature (which used to fill the message and cut off the reason, e.g.
    'Unsupported model IR version: 14, max supported IR version: 13')."""
    msg = " ".join(str(e).split())
    m = re.search(r"\.(?:cc|cpp|h):\d+ [^()]*\([^()]*\) (.+)$", msg)
    if m:
        msg = m.group(1)
    else:
        msg = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", msg)
    return msg[:300]


class OnnxModel:
    """An exported RWKV model in onnxruntime. ``providers`` defaults to the CPU provider."""

    def __init__(self, path: str, providers: list[str] | None = None, threads: int | None = None,
                 session_config: dict | None = None):
        """``session_config``: onnxruntime session config entries, e.g.
        {"session.qdq_matmulnbits_accuracy_level": "1"} (fp32 compute in fused int8/int4 matmuls)."""
        from ..io.paths import check_name
        check_name(path)
        try:
            import onnxruntime as ort
        except ImportError as e:  # pragma: no cover
            raise RwkvToolsError("onnxruntime is not installed (pip install onnxruntime)") from e
        if not os.path.isfile(path):
            raise RwkvToolsError(f"{path}: no such file")
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = threads
        for k, v in (session_config or {}).items():
            so.add_session_config_entry(k, str(v))
        providers = providers or ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(path, so, providers=providers)
        except Exception as e:
            raise FormatError(f"{path}: onnxruntime {ort.__version__} cannot load it ({ort_reason(e)})") from None
        try:
            raw = self.session.get_modelmeta().custom_metadata_map.get("rwkvtools")
        except UnicodeDecodeError:  # onnxruntime decodes every metadata key and value as UTF-8
            raise FormatError(f"{path}: unreadable model metadata (not UTF-8 text)") from None
        if raw is None:
            raise FormatError(f"{path}: not an RWKV model exported by rwkvtools (no 'rwkvtools' metadata)")
        try:
            self.meta = load_json(raw, path, "rwkvtools metadata")
            if not isinstance(self.meta, dict):
                raise ValueError("not a JSON object")
            self.vocab = int(self.meta["vocab"])
            if not 0 < self.vocab < 1 << 31:
                raise ValueError(f"vocab {self.vocab}")
            self.mode = self.meta["mode"]
            if self.mode not in ("step", "sequence"):
                raise ValueError(f"mode {self.mode!r}, not 'step' or 'sequence'")
            self.logits_mode = self.meta.get("logits", "all")
            if self.logits_mode not in ("all", "last"):
                raise ValueError(f"logits {self.logits_mode!r}, not 'all' or 'last'")
            hist = self.meta.get("history", [])  # transform names (older files) or {transform, options}
            if not isinstance(hist, list) or not all(
                    isinstance(h, str) or (isinstance(h, dict) and isinstance(h.get("options", {}), dict))
                    for h in hist):
                raise ValueError("'history' is not a list of transforms")
            self.n_layer = int(self.meta["n_layer"])
            self._layout(self.meta["states"])
            self._check_graph()
        except (ValueError, KeyError, TypeError) as e:
            raise FormatError(f"{path}: unreadable rwkvtools metadata ({e})") from None
        except RecursionError:
            raise FormatError(f"{path}: unreadable rwkvtools metadata (JSON nested too deep)") from None
        self.providers = self.session.get_providers()
        self.backend = f"onnxruntime-{self.providers[0].replace('ExecutionProvider', '').lower()}"
        self.path = path

    def _layout(self, entries: list) -> None:
        """The model's state convention from the file's: ``self.states`` [(group, [L, 'batch',
        ...])] as the reference model keeps it, ``self.parts`` {group: [file tensor name per
        layer]} (interface 2: one tensor per layer) or {group: None} (interface 1: the file
        holds the stacked tensor itself)."""
        self.states, self.parts = [], {}
        if not isinstance(entries, list):
            raise ValueError("'states' is not a list")
        for e in entries:
            if not (isinstance(e, dict) and isinstance(e.get("name"), str)
                    and isinstance(e.get("shape"), list)
                    and all(d == "batch" or (type(d) is int and d >= 0) for d in e["shape"])):
                raise ValueError(f"state entry {str(e)[:100]} has no name or no shape of sizes and 'batch'")
            group = e.get("group")
            if group is None:                               # interface 1: stacked
                self.states.append((e["name"], list(e["shape"])))
                self.parts[e["name"]] = None
                continue
            layer = e.get("layer")
            if not isinstance(group, str) or type(layer) is not int or not 0 <= layer < self.n_layer:
                raise ValueError(f"state '{e['name']}' has group {group!r} and layer {layer!r} "
                                 f"(of {self.n_layer} layers)")
            if group not in self.parts:
                if self.n_layer > len(entries):  # each layer of a group is an entry
                    raise ValueError(f"{self.n_layer} layers, but {len(entries)} state entries")
                self.states.append((group, [self.n_layer] + list(e["shape"])))
                self.parts[group] = [None] * self.n_layer
            first = next(shp for g, shp in self.states if g == group)[1:]
            if list(e["shape"]) != first:   # every layer of a group is stacked into one tensor
                raise ValueError(f"state '{e['name']}' has shape {e['shape']}, other layers of '{group}' {first}")
            if self.parts[group][layer] is not None:
                raise ValueError(f"state '{group}' lists layer {layer} twice")
            self.parts[group][layer] = e["name"]
        for group, names in self.parts.items():
            if names is not None and None in names:
                raise ValueError(f"state '{group}' lacks a layer")

    def _check_graph(self) -> None:
        """The metadata must describe the graph: 'tokens' in, 'logits' out, each state tensor in
        and out with the rank (and fixed sizes) the graph has; and a state of sane size (under
        1 GiB per sequence: a 14B model's is ~30 MB), since init_state allocates it."""
        ins = {i.name: i.shape for i in self.session.get_inputs()}
        outs = {o.name for o in self.session.get_outputs()}
        if "tokens" not in ins or "logits" not in outs:
            raise ValueError("the graph has no 'tokens' input or no 'logits' output")
        tshape = ins["tokens"]
        if len(tshape) != 2 or (self.mode == "step") != (tshape[1] == 1):
            raise ValueError(f"mode '{self.mode}' in the metadata, tokens of shape {tshape} in the graph "
                             "(a step graph takes [batch, 1], a sequence graph [batch, seq])")
        lshape = next(o.shape for o in self.session.get_outputs() if o.name == "logits")
        if lshape and type(lshape[-1]) is int and lshape[-1] != self.vocab:
            raise ValueError(f"vocab {self.vocab} in the metadata, logits of {lshape[-1]} in the graph")
        total, fed = 0, {"tokens"}
        for group, shape in self.states:
            names = self.parts[group]
            for name, shp in ([(group, shape)] if names is None else [(n, shape[1:]) for n in names]):
                fed.add(f"state_in_{name}")
                got = ins.get(f"state_in_{name}")
                if got is None or f"state_out_{name}" not in outs:
                    raise ValueError(f"state '{name}' is not an input and an output of the graph")
                fixed = [(a, b) for a, b in zip(shp, got) if type(a) is int and type(b) is int]
                if len(got) != len(shp) or any(a != b for a, b in fixed):
                    raise ValueError(f"state '{name}' has shape {shp} in the metadata, {got} in the graph")
            total += math.prod(d for d in shape if d != "batch")
        if set(ins) - fed:
            raise ValueError(f"graph inputs {sorted(set(ins) - fed)} are no state the metadata describes")
        if total * 4 > 1 << 30:
            raise ValueError(f"a state of {total} values per sequence (over 1 GiB)")

    def init_state(self, batch_size: int = 1) -> dict[str, torch.Tensor]:
        """The empty state: zeros of every state tensor, stacked over layers as the reference
        model keeps it."""
        from ..model.common import check_batch_size
        check_batch_size(batch_size)
        return {n: torch.zeros([batch_size if d == "batch" else int(d) for d in shp], dtype=torch.float32)
                for n, shp in self.states}

    def _run(self, tokens: np.ndarray, state: dict) -> tuple[np.ndarray, dict]:
        feeds = {"tokens": tokens}
        for n, _ in self.states:
            st = np.ascontiguousarray(state[n].detach().cpu().float().numpy())
            if self.parts[n] is None:
                feeds[f"state_in_{n}"] = st
            else:
                feeds.update({f"state_in_{part}": st[i] for i, part in enumerate(self.parts[n])})
        outs = self.session.run(None, feeds)
        names = [o.name for o in self.session.get_outputs()]
        res = dict(zip(names, outs))
        new = {}
        for n, _ in self.states:
            if self.parts[n] is None:
                new[n] = torch.from_numpy(res[f"state_out_{n}"])
            else:
                new[n] = torch.from_numpy(np.stack([res[f"state_out_{part}"] for part in self.parts[n]]))
        return res["logits"], new

    def forward(self, tokens, state: dict | None = None):
        from ..model.common import check_call
        toks = torch.as_tensor(tokens)
        B = toks.shape[0] if toks.dim() else 0
        toks = check_call(toks, state, self.vocab, {n: [B if d == "batch" else int(d) for d in shp]
                                                    for n, shp in self.states})
        T = toks.shape[1]
        state = state if state is not None else self.init_state(B)
        if B == 0:  # no sequences: nothing to run (a sequence graph's reshapes cannot take batch 0)
            steps = T if self.logits_mode == "all" else 1
            return torch.zeros(0, steps, self.vocab, dtype=torch.float32), state  # logits are fp32 in every export
        arr = toks.cpu().numpy().astype(np.int64)
        if self.mode == "step":
            outs = []
            for t in range(T):
                lo, state = self._run(arr[:, t:t + 1], state)
                outs.append(lo)
            logits = np.concatenate(outs, 1) if self.logits_mode == "all" else outs[-1]
        else:
            logits, state = self._run(arr, state)
        return torch.from_numpy(logits), state

    __call__ = forward

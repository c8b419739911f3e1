"""Run an ONNX file exported by rwkvtools through onnxruntime with the reference model's calling
convention: ``OnnxModel(path)(tokens[B, T], state) -> (logits[B, T, V], state)``, torch tensors
in and out, so that ``validate.perplexity`` and ``rwkvtools eval`` judge it like a checkpoint."""
from __future__ import annotations

import json
import os

import numpy as np
import torch

from ..errors import FormatError, RwkvToolsError


def cuda_usable() -> bool:
    """True when onnxruntime has its CUDA provider and a CUDA device is present."""
    try:
        import onnxruntime as ort
    except ImportError:  # pragma: no cover
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available()


class OnnxModel:
    """An exported RWKV model in onnxruntime. ``providers`` defaults to the CPU provider."""

    def __init__(self, path: str, providers: list[str] | None = None, threads: int | None = None,
                 session_config: dict | None = None):
        """``session_config``: onnxruntime session config entries, e.g.
        {"session.qdq_matmulnbits_accuracy_level": "1"} (fp32 compute in fused int8/int4 matmuls)."""
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
            raise FormatError(f"{path}: onnxruntime cannot load it ({str(e).strip().splitlines()[-1][:300]})") from None
        raw = self.session.get_modelmeta().custom_metadata_map.get("rwkvtools")
        if raw is None:
            raise FormatError(f"{path}: not an RWKV model exported by rwkvtools (no 'rwkvtools' metadata)")
        try:
            self.meta = json.loads(raw)
            self.vocab = int(self.meta["vocab"])
            self.mode = self.meta["mode"]
            self.n_layer = int(self.meta["n_layer"])
            self._layout(self.meta["states"])
        except (ValueError, KeyError, TypeError) as e:
            raise FormatError(f"{path}: unreadable rwkvtools metadata ({e})") from None
        self.logits_mode = self.meta.get("logits", "all")
        self.providers = self.session.get_providers()
        self.backend = f"onnxruntime-{self.providers[0].replace('ExecutionProvider', '').lower()}"
        self.path = path

    def _layout(self, entries: list) -> None:
        """The model's state convention from the file's: ``self.states`` [(group, [L, 'batch',
        ...])] as the reference model keeps it, ``self.parts`` {group: [file tensor name per
        layer]} (interface 2: one tensor per layer) or {group: None} (interface 1: the file
        holds the stacked tensor itself)."""
        self.states, self.parts = [], {}
        for e in entries:
            group = e.get("group")
            if group is None:                               # interface 1: stacked
                self.states.append((e["name"], list(e["shape"])))
                self.parts[e["name"]] = None
                continue
            if group not in self.parts:
                self.states.append((group, [self.n_layer] + list(e["shape"])))
                self.parts[group] = [None] * self.n_layer
            self.parts[group][int(e["layer"])] = e["name"]
        for group, names in self.parts.items():
            if names is not None and None in names:
                raise ValueError(f"state '{group}' lacks a layer")

    def init_state(self, batch_size: int = 1) -> dict[str, torch.Tensor]:
        """The empty state: zeros of every state tensor, stacked over layers as the reference
        model keeps it."""
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
        toks = torch.as_tensor(tokens, dtype=torch.long)
        if toks.dim() != 2:
            raise ValueError(f"tokens must be (batch, time), got shape {tuple(toks.shape)}")
        B, T = toks.shape
        if T == 0:
            raise ValueError("tokens must hold at least one position")
        state = state if state is not None else self.init_state(B)
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

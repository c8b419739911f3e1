"""``eval``: perplexity of a checkpoint (or an exported ONNX model) on a text file."""
from __future__ import annotations

import os

import torch

from .errors import RwkvToolsError
from .tokenizer import Tokenizer, read_text


def evaluate_file(model_path: str, text_path: str, tokenizer: str = "auto", tokenizer_file: str | None = None,
                  encoding: str = "utf-8", max_tokens: int | None = None, chunk_len: int = 1024,
                  device: str = "cpu", dtype=torch.float32, progress=None) -> dict:
    text = read_text(text_path)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RwkvToolsError("--device cuda: no CUDA device is available (use --device cpu)")
    if model_path.endswith(".onnx") and os.path.isfile(model_path):
        from .export.onnx_eval import OnnxModel
        model = OnnxModel(model_path)
        vocab = model.vocab
    else:
        from .model import load
        model = load(model_path, device=device, dtype=dtype)
        vocab = model.spec.vocab
    tok = Tokenizer(tokenizer, vocab, tokenizer_file, encoding)
    ids = tok.encode(text)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    from .validate import perplexity
    res = perplexity(model, ids, chunk_len=chunk_len, progress=progress).to_dict()
    res["tokenizer"] = tok.name
    res["device"] = device
    res["dtype"] = str(dtype).replace("torch.", "")
    return res

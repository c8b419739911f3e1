"""``eval``: perplexity of a checkpoint (or an exported ONNX model) on a text file."""
from __future__ import annotations


import torch

from .errors import RwkvToolsError
from .tokenizer import Tokenizer, read_text


def evaluate_file(model_path: str, text_path: str, tokenizer: str = "auto", tokenizer_file: str | None = None,
                  encoding: str = "utf-8", max_tokens: int | None = None, chunk_len: int = 1024,
                  device: str = "cpu", dtype=None, progress=None) -> dict:
    """``dtype``: None = the model's own (float32 for a checkpoint, the export's for an .onnx file);
    another dtype than an .onnx file's is refused."""
    text = read_text(text_path)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RwkvToolsError("--device cuda: no CUDA device is available (use --device cpu)")
    from .io import is_onnx_file
    if is_onnx_file(model_path):  # runs in the dtype it was exported in, on onnxruntime's provider for the device
        from .export.onnx_eval import OnnxModel
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda"):
            import onnxruntime as ort
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise RwkvToolsError(f"--device {device}: this onnxruntime has no CUDA provider")
            providers = [("CUDAExecutionProvider", {"device_id": int(device[5:] or 0)}), "CPUExecutionProvider"]
        model = OnnxModel(model_path, providers=providers)
        vocab = model.vocab
        stored = "float16" if model.meta.get("dtype") == "fp16" else "float32"
        asked = str(dtype).replace("torch.", "") if dtype is not None else stored
        if asked != stored:
            asked = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(asked, asked)  # as typed
            raise RwkvToolsError(f"--dtype {asked}: an ONNX file runs in the dtype it was exported in "
                                 f"({model.meta.get('dtype')}); export it again with export-onnx --dtype")
        dtype = getattr(torch, stored)
        device = "cuda" if model.providers[0].startswith("CUDA") else "cpu"
    else:
        from .model import load
        dtype = dtype or torch.float32
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

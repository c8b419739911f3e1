"""Exporters: ONNX (``export_onnx``; graphs built node by node from the reference model, checked
in onnxruntime). New linear kinds teach the exporter their nodes with ``register_onnx_linear``."""
from __future__ import annotations


def export_onnx(*args, **kwargs):
    from .onnx import export_onnx as _e
    return _e(*args, **kwargs)


def register_onnx_linear(module_class, emitter) -> None:
    from .onnx import register_onnx_linear as _r
    _r(module_class, emitter)


__all__ = ["export_onnx", "register_onnx_linear"]

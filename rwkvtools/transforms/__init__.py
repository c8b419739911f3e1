"""Transforms: pure ``Checkpoint -> Checkpoint`` functions recorded in the manifest."""
from __future__ import annotations

from ..checkpoint import Checkpoint


def prepare_for_model(ckpt: Checkpoint) -> Checkpoint:
    """Bring a checkpoint in any stored form into the form the reference model reads (the
    parallel/training form). RNN-form files are converted back here (see rnn_form)."""
    if ckpt.form == "rnn":
        from .rnn_form import to_parallel
        ckpt = to_parallel(ckpt)
    if "shared.map" in ckpt.tensors:  # recursive: tensors tied across layers (model/shared.py)
        from ..model.shared import tied_view
        ckpt = tied_view(ckpt)
    return ckpt

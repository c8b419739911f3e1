"""Transforms: pure ``Checkpoint -> Checkpoint`` functions recorded in the manifest."""
from __future__ import annotations

from ..checkpoint import Checkpoint


def prepare_for_model(ckpt: Checkpoint) -> Checkpoint:
    """Bring a checkpoint in any stored form into the form the reference model reads (the
    parallel/training form). RNN-form files are converted back here (see rnn_form)."""
    if ckpt.form == "rnn":
        from .rnn_form import to_parallel
        return to_parallel(ckpt)
    return ckpt

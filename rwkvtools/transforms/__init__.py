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


def check_plan(plan, transform: str, key: str, plan_format: int, error) -> None:
    """A plan handed to ``<transform>.apply`` must be that transform's plan dict (with ``key``)
    in the plan format this version writes; else ``error`` with what was expected."""
    if not isinstance(plan, dict) or plan.get("transform") != transform or key not in plan:
        raise error(f"not a {transform} plan (expected a dict from {transform}.plan())")
    if plan.get("plan_format") != plan_format:
        raise error(f"{transform} plan format {plan.get('plan_format')} is not supported (expected {plan_format})")

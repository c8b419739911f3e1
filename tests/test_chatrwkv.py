"""The reference model against the official runtime, ChatRWKV's ``rwkv`` package (test-only
dependency), on random-weight checkpoints of every version it supports (v4, v5.0, v5.1, v5.2, v6,
v7): whole-sequence forward and token-by-token loop."""
import json
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from rwkvtools.checkpoint import Checkpoint
from rwkvtools.io.pth import write_pth
from rwkvtools.model import build_model
from conftest import VERSIONS

RUNNER = pathlib.Path(__file__).with_name("chatrwkv_runner.py")
MIXES = re.compile(r"\.(time_mix_[kvrg]|time_maa_[xwkvrg]|x_[rwkvag])$")


def distinct_mixes(ck: Checkpoint, seed: int = 0) -> Checkpoint:
    """The random checkpoints follow the trainers' init, where several token-shift mixes are
    equal (v4/v5 ffn time_mix_k == time_mix_r, v5 att time_mix_r == time_mix_g, v6 time_maa_x ==
    time_maa_w == time_maa_k, ffn time_maa_k == time_maa_r, v7 x_r == x_g): a model reading the
    wrong one of a pair would still match. Here every mix gets its own values in [0, 1)."""
    g = torch.Generator().manual_seed(seed)
    t = dict(ck.tensors)
    for k, x in t.items():
        if MIXES.search(k):
            t[k] = torch.rand(x.shape, generator=g, dtype=x.dtype)
    return Checkpoint(t, ck.manifest)


def chatrwkv_logits(pth: str, tokens: list[int], v7: bool, out: str) -> dict:
    cmd = [sys.executable, str(RUNNER), pth, out + ".json", out]
    with open(out + ".json", "w") as f:
        json.dump(tokens, f)
    if v7:
        cmd.append("v7")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return dict(np.load(out))


@pytest.mark.parametrize("version", VERSIONS)
def test_reference_matches_chatrwkv(tmp_path, tiny_models, version):
    pytest.importorskip("rwkv", reason="ChatRWKV's rwkv package is a test dependency: pip install -e .[test]")
    ck = distinct_mixes(tiny_models[version])
    pth = str(tmp_path / "model.pth")
    write_pth(ck, pth)
    tokens = torch.randint(0, 97, (45,), generator=torch.Generator().manual_seed(11)).tolist()
    theirs = chatrwkv_logits(pth, tokens, version == "7", str(tmp_path / "out.npz"))
    with torch.no_grad():
        ours, _ = build_model(ck)(torch.tensor([tokens]))
    ours = ours[0].numpy()
    assert np.abs(ours - theirs["seq"]).max() <= 1e-5
    assert np.abs(ours - theirs["step"]).max() <= 1e-5


def test_v6_strong_decays_match_chatrwkv(tmp_path, tiny_models):
    """v6 log-decays -exp(w) from -e^-6 down to -e^5 (~ -148): the reference model's floor
    (LOGDECAY_MIN) must only touch decays that are zero in float32 anyway, and the chunked form
    must stay finite (it switches to pairwise weights)."""
    pytest.importorskip("rwkv", reason="ChatRWKV's rwkv package is a test dependency: pip install -e .[test]")
    ck = distinct_mixes(tiny_models["6"])
    t = dict(ck.tensors)
    g = torch.Generator().manual_seed(0)
    for k, x in t.items():
        if k.endswith("att.time_decay"):
            t[k] = torch.linspace(-6.0, 5.0, x.numel())[torch.randperm(x.numel(), generator=g)].reshape(x.shape)
    ck = Checkpoint(t, ck.manifest)
    pth = str(tmp_path / "model.pth")
    write_pth(ck, pth)
    tokens = torch.randint(0, 97, (45,), generator=torch.Generator().manual_seed(12)).tolist()
    theirs = chatrwkv_logits(pth, tokens, False, str(tmp_path / "out.npz"))
    with torch.no_grad():
        ours, _ = build_model(ck)(torch.tensor([tokens]))
    ours = ours[0].numpy()
    assert np.isfinite(ours).all()
    assert np.abs(ours - theirs["seq"]).max() <= 1e-5
    assert np.abs(ours - theirs["step"]).max() <= 1e-5

"""Calibration statistics: the block-by-block Grams equal those collected by hooks on one plain
forward of the whole model, for every version (v7: the value residual crosses blocks)."""
import pytest
import torch

from rwkvtools.calibrate import calibrate_blocks, collect_grams, linears_of
from rwkvtools.model import build_model
from conftest import VERSIONS


@pytest.mark.parametrize("version", VERSIONS)
def test_block_by_block_grams_equal_full_forward(tiny_models, version):
    model = build_model(tiny_models[version])
    toks = torch.randint(0, 97, (1, 150), generator=torch.Generator().manual_seed(0))
    select = lambda p: p.endswith(("ffn.key", "ffn.value", "att.output"))  # noqa: E731
    grams = collect_grams(model, toks[0], select, chunk_len=64)
    ref = {}
    hooks = []
    for prefix, lin in linears_of(model).items():
        if select(prefix):
            def hook(m, inp, out, prefix=prefix):
                a = inp[0].reshape(-1, inp[0].shape[-1]).double()
                ref[prefix] = ref.get(prefix, 0) + a.t() @ a
            hooks.append(lin.register_forward_hook(hook))
    with torch.no_grad():
        model(toks)
    for h in hooks:
        h.remove()
    assert set(grams) == set(ref) and len(ref) == 3 * model.spec.n_layer
    for k in ref:
        assert grams[k].n == 150
        assert torch.allclose(grams[k].xtx, ref[k], rtol=1e-5, atol=1e-6), k


def test_sequential_sees_modified_block(tiny_models):
    model = build_model(tiny_models["7"])
    toks = torch.randint(0, 97, (100,), generator=torch.Generator().manual_seed(1))
    base = collect_grams(model, toks, lambda p: p == "blocks.1.ffn.key")["blocks.1.ffn.key"].xtx
    grams = {}
    for i, g in calibrate_blocks(model, toks, lambda p: p == "blocks.1.ffn.key", sequential=True):
        grams.update(g)
        if i == 0:
            w = model.blocks[0].ffn.value.weight
            w.data = torch.zeros_like(w)  # change block 0 (new storage: the checkpoint stays intact)
    assert not torch.allclose(grams["blocks.1.ffn.key"].xtx, base)

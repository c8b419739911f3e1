"""Real checkpoints from ../shared/fixtures: every file loads, is detected right, and scores a
finite perplexity far below uniform (256) on wikitext-2-test."""
import math

import pytest
import torch

import rwkvtools
from rwkvtools.io import read_checkpoint
from rwkvtools.spec import detect
from rwkvtools.validate import perplexity
from conftest import fixture_path, wikitext_bytes

FIXTURES = {
    "tiny-rwkv-4v0-660K-FP32.bin": ("4", 4, 128, 1, 256),
    "tiny-rwkv-4v0-660K-FP16.bin": ("4", 4, 128, 1, 256),
    "tiny-rwkv-4v0-660K.pth": ("4", 4, 128, 1, 256),
    "tiny-rwkv-5v1-730K-FP32.bin": ("5.0", 12, 64, 8, 256),
    "tiny-rwkv-5v2-730K-FP32.bin": ("5.2", 12, 64, 8, 224),
    "tiny-rwkv-5v2-730K-FP16.bin": ("5.2", 12, 64, 8, 224),
    "tiny-rwkv-5v2-730K-Q5_1.bin": ("5.2", 12, 64, 8, 224),
    "tiny-rwkv-6v0-3m-Q5_0.bin": ("6", 12, 128, 16, 448),
    "tiny-rwkv-6v0-3m-Q5_1.bin": ("6", 12, 128, 16, 448),
    "tiny-rwkv-7v0-834K-FP32.bin": ("7", 12, 64, 1, 256),
    "tiny-rwkv-7v0-834K-FP16.bin": ("7", 12, 64, 1, 256),
    "tiny-rwkv-7v0-834K-Q5_1.bin": ("7", 12, 64, 1, 256),
    "tiny-rwkv-7v0-834K.pth": ("7", 12, 64, 1, 256),
}


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_fixture_detected(name):
    version, layers, dim, heads, ffn = FIXTURES[name]
    ck = read_checkpoint(fixture_path(name))
    spec = detect(ck.tensors)
    assert (spec.version, spec.n_layer, spec.n_embd, spec.n_head, spec.vocab) == (version, layers, dim, heads, 256)
    if name.startswith("tiny-rwkv-5v2"):
        assert spec.ffn_dim in (224, 256)
    else:
        assert spec.ffn_dim == ffn


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_fixture_perplexity(name):
    text = wikitext_bytes(4096)
    if "6v0" in name:  # trained on UTF-16LE bytes (fixtures README)
        text = text.decode("utf-8").encode("utf-16le")[:4096]
    model = rwkvtools.load(fixture_path(name))
    res = perplexity(model, list(text), chunk_len=1024)
    assert math.isfinite(res.ppl)
    limit = 25 if "4v0" in name else 80  # far below uniform (256)
    assert res.ppl < limit, res.ppl


@pytest.mark.parametrize("stem", ["tiny-rwkv-4v0-660K", "tiny-rwkv-7v0-834K"])
def test_rwkvcpp_reader_recovers_training_form(stem):
    """The .pth fixtures were made from the .bin files; undoing rwkv.cpp's transforms must give
    the same tensors (v4: -exp(td) inverted in float64)."""
    a = read_checkpoint(fixture_path(stem + ".pth"))
    b = read_checkpoint(fixture_path(stem + "-FP32.bin"))
    assert set(a.tensors) == set(b.tensors)
    for k in a.tensors:
        assert b.shape(k) == tuple(a.tensors[k].shape), k
        assert torch.allclose(b.tensors[k], a.tensors[k], rtol=1e-6, atol=0), k


def test_v7_reference_perplexity_matches_official_runtimes():
    """ChatRWKV and rwkv.cpp (FP32) both give 41.495829 on wikitext-2-test bytes [0, 8192)
    (reference notes §16.8); our reference model must agree to 1e-5 relative."""
    model = rwkvtools.load(fixture_path("tiny-rwkv-7v0-834K.pth"))
    res = perplexity(model, list(wikitext_bytes(8192)))
    assert abs(res.ppl - 41.495829) / 41.495829 < 1e-5


@pytest.mark.parametrize("stem", ["tiny-rwkv-4v0-660K", "tiny-rwkv-5v2-730K", "tiny-rwkv-7v0-834K"])
def test_rwkvcpp_fp16_file_is_the_fp32_file_in_16_bits(stem):
    """rwkv.cpp's converter wrote both files from one model: the FP16 file's matrices read back as
    float16 tensors equal to the FP32 file's rounded to float16; its FP32 records are equal."""
    a = read_checkpoint(fixture_path(stem + "-FP32.bin"))
    b = read_checkpoint(fixture_path(stem + "-FP16.bin"))
    assert list(a.tensors) == list(b.tensors)
    n16 = 0
    for k in a.tensors:
        x, y = a.tensors[k], b.tensors[k]
        if y.dtype == torch.float16:
            assert torch.equal(y, x.half()), k
            n16 += 1
        else:
            assert y.dtype == torch.float32 and torch.equal(y, x), k
    assert n16 > 0

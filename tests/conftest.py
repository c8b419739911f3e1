import os
import pathlib

import pytest
import torch

REPO = pathlib.Path(__file__).resolve().parent.parent
SHARED = pathlib.Path(os.environ.get("RWKVTOOLS_SHARED", REPO.parent / "shared"))
FIXTURES = SHARED / "fixtures"
DATA = SHARED / "data"
VERSIONS = ("4", "5.0", "5.1", "5.2", "6", "7")

torch.set_num_threads(min(2, torch.get_num_threads()))


def shared_or_skip():
    if not FIXTURES.is_dir():
        pytest.skip(f"../shared not found at {SHARED} (set RWKVTOOLS_SHARED); fixture tests need it")
    return SHARED


@pytest.fixture
def shared():
    return shared_or_skip()


def fixture_path(name: str) -> str:
    shared_or_skip()
    p = FIXTURES / name
    if not p.exists():
        pytest.fail(f"fixture {p} is missing from ../shared/fixtures")
    return str(p)


def wikitext_bytes(n: int = 8192) -> bytes:
    shared_or_skip()
    return (DATA / "wikitext-2-test.txt").read_bytes()[:n]


@pytest.fixture(scope="session")
def tiny_models():
    """One small random-weight checkpoint per version (3 layers, dim 64, 4 heads of 16)."""
    from rwkvtools.random_init import random_checkpoint
    return {v: random_checkpoint(v, n_layer=3, n_embd=64, head_size=16, vocab=97, seed=7) for v in VERSIONS}


def max_rel(a, b):
    """max |a - b| / max(1, max |b|)"""
    return float((a - b).abs().max() / max(1.0, float(b.abs().max())))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one torch thread is as fast and does not stall on a busy machine. Modules
    opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

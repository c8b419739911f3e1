import os

import pytest

from rwkvtools.errors import RwkvToolsError
from rwkvtools.tokenizer import Tokenizer, pick


def test_auto_pick():
    assert pick("auto", 256) == "bytes"
    assert pick("auto", 65536) == "world"
    assert pick("auto", 50277) == "neox"
    with pytest.raises(RwkvToolsError):
        pick("auto", 1000)


def test_bytes_and_utf16():
    assert Tokenizer("bytes", 256).encode("hé") == [104, 195, 169]
    assert Tokenizer("bytes", 256, encoding="utf-16le").encode("hi") == [104, 0, 105, 0]


def test_bad_encodings_are_clear_errors(tmp_path):
    for enc, words in (("klingon", "unknown encoding"), ("rot13", "not a text encoding")):
        with pytest.raises(RwkvToolsError, match=words):
            Tokenizer("bytes", 256, encoding=enc)
    with pytest.raises(RwkvToolsError, match=r"ascii encoding cannot store \('é' at character 1\)"):
        Tokenizer("bytes", 256, encoding="ascii").encode("hé")
    # on the command line: refused while parsing (exit 2, no traceback), before any model is read or written
    from click.testing import CliRunner

    from rwkvtools.cli import main
    text = tmp_path / "t.txt"
    text.write_text("hello")
    for args in (["eval", str(tmp_path / "absent.pth"), "--text", str(text)],
                 ["quantize", str(tmp_path / "absent.pth"), str(tmp_path / "o.safetensors"), "--scheme", "int8"]):
        r = CliRunner().invoke(main, args + ["--encoding", "klingon"])
        assert r.exit_code == 2 and "unknown encoding: klingon" in r.output, r.output
        assert "Traceback" not in r.output and "absent.pth" not in r.output  # parsed before the model is opened
    assert os.listdir(tmp_path) == ["t.txt"]


def test_encoding_that_refuses_the_whole_text_is_a_clear_error(tmp_path):
    """--encoding idna raised a bare UnicodeError ('label empty or too long') on ordinary text: an
    internal error (exit 2 with 'internal error (UnicodeError ...)')."""
    with pytest.raises(RwkvToolsError, match="idna encoding cannot encode the text"):
        Tokenizer("bytes", 256, encoding="idna").encode("hello world\n" * 10)
    from click.testing import CliRunner

    from conftest import fixture_path
    from rwkvtools.cli import main
    text = tmp_path / "t.txt"
    text.write_text("hello world\n" * 10)
    r = CliRunner().invoke(main, ["eval", fixture_path("tiny-rwkv-7v0-834K.pth"), "--text", str(text),
                                  "--encoding", "idna"])
    assert r.exit_code == 2 and "error: the idna encoding cannot encode" in r.output, r.output
    assert "internal error" not in r.output and "Traceback" not in r.output, r.output


def test_world_matches_chatrwkv_trie_tokenizer():
    """pyrwkv-tokenizer against ChatRWKV's own World tokenizer (test-only dependency)."""
    rwkv = pytest.importorskip("rwkv.rwkv_tokenizer")
    vocab = os.path.join(os.path.dirname(rwkv.__file__), "rwkv_vocab_v20230424.txt")
    ref = rwkv.TRIE_TOKENIZER(vocab)
    ours = Tokenizer("world", 65536)
    for text in ["Hello world!", "  spaces\n\nand newlines\t", "中文和 emoji 🙂 mixed", "x" * 300,
                 "The quick brown fox = jumps @-@ over <unk> 12345."]:
        assert ours.encode(text) == ref.encode(text)


def test_neox_from_file(tmp_path):
    import tokenizers
    from tokenizers import models, pre_tokenizers
    tok = tokenizers.Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    p = tmp_path / "tok.json"
    tok.save(str(p))
    assert Tokenizer("neox", 50277, tokenizer_file=str(p)).encode("ab a b") == [2, 0, 1]


def test_read_text_refuses_a_device_and_an_endless_text(tmp_path, monkeypatch):
    """--text /dev/zero read until memory ran out (3.5 GB, then a misleading 'out of memory; try
    a smaller --chunk-len'): the text is tokenized whole, so devices are refused and a text
    longer than MAX_TEXT_BYTES is an error, read no further than that."""
    import os
    import rwkvtools.tokenizer as T
    from rwkvtools.errors import RwkvToolsError
    if os.path.exists("/dev/zero"):
        with pytest.raises(RwkvToolsError, match="is a device"):
            T.read_text("/dev/zero")
    with pytest.raises(RwkvToolsError, match="is a folder"):
        T.read_text(str(tmp_path))
    p = tmp_path / "t.txt"
    p.write_text("x" * 101)
    monkeypatch.setattr(T, "MAX_TEXT_BYTES", 100)
    with pytest.raises(RwkvToolsError, match="give an excerpt"):
        T.read_text(str(p))
    p.write_text("x" * 100)
    assert T.read_text(str(p)) == "x" * 100

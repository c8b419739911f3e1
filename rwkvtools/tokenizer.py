"""Tokenizers for perplexity: bytes (vocab 256), RWKV World (vocab 65536, via the maintained
``pyrwkv-tokenizer`` package) and GPT-NeoX 20B (Pile models, via ``tokenizers`` and the
``20B_tokenizer.json`` file the user holds; nothing is downloaded)."""
from __future__ import annotations

import os

from .errors import RwkvToolsError

TOKENIZERS = ("auto", "bytes", "world", "neox")
NEOX_VOCABS = (50277, 50304)


def pick(name: str, vocab: int) -> str:
    if name != "auto":
        return name
    if vocab == 256:
        return "bytes"
    if vocab == 65536:
        return "world"
    if vocab in NEOX_VOCABS:
        return "neox"
    raise RwkvToolsError(f"--tokenizer auto: no tokenizer is known for vocab size {vocab}; "
                         "choose one with --tokenizer bytes|world|neox")


def check_encoding(encoding: str) -> str:
    """A text encoding Python knows (utf-8, utf-16le, latin-1, ...), else a clear error."""
    try:
        "".encode(encoding)
    except (LookupError, TypeError, ValueError) as e:
        raise RwkvToolsError(f"--encoding {encoding!r}: {e}") from None
    return encoding


def _encode_bytes(text: str, encoding: str) -> list[int]:
    try:
        return list(text.encode(encoding))
    except UnicodeEncodeError as e:
        raise RwkvToolsError(f"the text has characters the {encoding} encoding cannot store "
                             f"({text[e.start:e.end]!r} at character {e.start}); pick another --encoding") from None
    except UnicodeError as e:  # codecs that refuse whole texts, not characters (idna: 'label empty or too long')
        raise RwkvToolsError(f"the {encoding} encoding cannot encode the text ({e}); pick another --encoding") from None


class Tokenizer:
    def __init__(self, name: str, vocab: int, tokenizer_file: str | None = None, encoding: str = "utf-8"):
        self.name = pick(name, vocab)
        self.encoding = encoding
        if self.name == "bytes":
            if vocab < 256:
                raise RwkvToolsError(f"the bytes tokenizer needs a vocab of at least 256, the model has {vocab}")
            check_encoding(encoding)
            self._enc = lambda text: _encode_bytes(text, encoding)
        elif self.name == "world":
            try:
                import pyrwkv_tokenizer
            except ImportError:
                raise RwkvToolsError("the World tokenizer needs the 'pyrwkv-tokenizer' package: pip install pyrwkv-tokenizer") from None
            tok = pyrwkv_tokenizer.RWKVTokenizer()
            self._enc = tok.encode
        elif self.name == "neox":
            path = tokenizer_file or os.environ.get("RWKVTOOLS_NEOX_TOKENIZER")
            if not path or not os.path.exists(path):
                raise RwkvToolsError("the GPT-NeoX 20B tokenizer needs its '20B_tokenizer.json' (shipped with "
                                     "RWKV-LM and ChatRWKV): pass --tokenizer-file PATH or set RWKVTOOLS_NEOX_TOKENIZER")
            from tokenizers import Tokenizer as HFTok
            try:
                tok = HFTok.from_file(path)
            except Exception as e:  # tokenizers raises its own exception type
                raise RwkvToolsError(f"{path}: not a tokenizers JSON file ({e})") from None
            self._enc = lambda text: tok.encode(text).ids
        else:
            raise RwkvToolsError(f"unknown tokenizer '{name}'; known: {', '.join(TOKENIZERS)}")
        self.vocab = vocab

    def encode(self, text: str) -> list[int]:
        ids = self._enc(text)
        if ids and max(ids) >= self.vocab:
            raise RwkvToolsError(f"the {self.name} tokenizer produced id {max(ids)}, outside the model's vocab {self.vocab}")
        return ids


MAX_TEXT_BYTES = 1 << 30  # a text is tokenized whole: a device or an endless pipe must not fill the memory


def read_text(path: str) -> str:
    import stat
    try:
        mode = os.stat(path).st_mode
        if stat.S_ISDIR(mode):
            raise RwkvToolsError(f"{path}: is a folder; give a text file")
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            raise RwkvToolsError(f"{path}: is a device, not a text file")
        with open(path, "rb") as f:
            data = f.read(MAX_TEXT_BYTES + 1)
        if len(data) > MAX_TEXT_BYTES:
            raise RwkvToolsError(f"{path}: longer than {MAX_TEXT_BYTES >> 30} GiB; give an excerpt (the text is "
                                 "tokenized whole before --max-tokens/--calib-tokens take their share)")
    except FileNotFoundError:
        raise RwkvToolsError(f"{path}: no such text file") from None
    except OSError as e:
        raise RwkvToolsError(f"{path}: cannot read ({e.strerror})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RwkvToolsError(f"{path}: not UTF-8 text ({e})") from None

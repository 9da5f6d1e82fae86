"""Text <-> token ids for the models we tune: the World tokenizer, byte vocabularies, Hugging Face tokenizer.json.

A state is only as good as the match between the tokens it was trained on and the tokens its model reads,
so every tokenizer says how many ids it can produce, and `get_tokenizer` refuses one that does not fit.
"""

from __future__ import annotations

import ast
import functools
import os
import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import TokenizerError, option

if TYPE_CHECKING:
    from .checkpoint import ModelSpec

WORLD_VOCAB = "rwkv_vocab_v20230424.txt"
WORLD_VOCAB_SIZE = 65536
BUILTIN = ("world", "bytes", "utf-16-le")
_ALIASES = {"world": "world", "bytes": "utf-8", "utf-8": "utf-8", "utf8": "utf-8",
            "utf-16-le": "utf-16-le", "utf-16le": "utf-16-le", "utf16le": "utf-16-le"}
MAX_TOKENIZER_BYTES = 64 << 20  # the largest tokenizer.json files in use are about 35 MB

# End-of-document names seen in tokenizer.json files, most common first; any other special token
# whose name mentions eos / endoftext is the fallback.
_EOD_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|eos|>", "<|end_of_text|>", "<|end|>")
_EOD_PATTERN = re.compile(r"eos|end_?of_?text", re.IGNORECASE)
_SURROGATE = re.compile("[\ud800-\udfff]")


def lone_surrogate(text: str) -> str | None:
    """Why `text` cannot be encoded, if it holds a lone surrogate (a JSON "\\ud800" escape without its pair,
    or command-line bytes that were not UTF-8); None when it is valid Unicode text."""
    found = _SURROGATE.search(text)
    if found is None:
        return None
    return f"lone surrogate \\u{ord(found.group()):04x} at character {found.start() + 1} (not valid Unicode text)"


class Tokenizer(ABC):
    """What the data pipeline and the trainer need from a tokenizer, whatever its kind."""

    name: str
    vocab_size: int
    eod: int | None  # the id that ends a document, if the vocabulary has one

    def encode(self, text: str) -> list[int]:
        """The token ids of `text`; text that is not valid Unicode gets one line instead of a UnicodeEncodeError."""
        why = lone_surrogate(text)
        if why is not None:
            raise TokenizerError(f"cannot encode the text: {why}")
        return self._encode(text)

    @abstractmethod
    def _encode(self, text: str) -> list[int]: ...

    @abstractmethod
    def decode(self, ids: list[int]) -> str: ...

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} ({self.vocab_size} tokens)>"


class WorldTokenizer(Tokenizer):
    """The RWKV World tokenizer: the `rwkv` pip package's vocabulary file and its rule (at each position, the
    longest token the bytes start with), in a table of a few MB where the pip package's trie takes ~300 MB."""

    name = "world"
    vocab_size = WORLD_VOCAB_SIZE
    eod = 0

    def __init__(self) -> None:
        _world_vocab()  # a damaged rwkv package fails here, not at the first sample

    def _encode(self, text: str) -> list[int]:
        return _world_vocab().encode(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        """Ids with no text (0, the end of a document, and the unused ids at the top) decode to nothing;
        a cut through a UTF-8 character decodes to U+FFFD instead of failing the whole string."""
        table = _world_vocab().idx2token
        out = []
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the World vocabulary (0..{self.vocab_size - 1})")
            out.append(table.get(i, b""))
        return b"".join(out).decode("utf-8", errors="replace")


class _WorldVocab:
    """The World vocabulary as two dicts, and for each two-byte start the lengths of the tokens that begin with it
    (longest first): the longest match is then a few dict lookups, with no trie of 65k nodes."""

    def __init__(self, lines: list[str], where: str) -> None:
        self.idx2token: dict[int, bytes] = {}
        for number, line in enumerate(lines, 1):
            try:
                idx, token = int(line[: line.index(" ")]), ast.literal_eval(line[line.index(" ") : line.rindex(" ")])
                token = token.encode("utf-8") if isinstance(token, str) else token
                assert isinstance(token, bytes) and len(token) == int(line[line.rindex(" ") :])
            except (ValueError, SyntaxError, AssertionError):
                raise TokenizerError(f"{where}:{number}: not a line of the World vocabulary") from None
            self.idx2token[idx] = token
        self.token2idx = {token: idx for idx, token in self.idx2token.items()}
        lengths: dict[bytes, set[int]] = {}
        for token in self.token2idx:
            lengths.setdefault(token[:2], set()).add(len(token))
        self.lengths = {start: sorted(n, reverse=True) for start, n in lengths.items()}

    def encode(self, src: bytes) -> list[int]:
        out, i, n = [], 0, len(src)
        while i < n:
            for length in self.lengths.get(src[i : i + 2], ()):
                token = src[i : i + length] if i + length <= n else None
                if token in self.token2idx:
                    break
            else:
                token = src[i : i + 1]  # every single byte is a token
            out.append(self.token2idx[token])
            i += len(token)
        return out


@functools.lru_cache(maxsize=1)
def _world_vocab() -> _WorldVocab:
    """Reading the 65k-line vocabulary takes about a second: do it once per process."""
    import rwkv

    vocab = Path(rwkv.__file__).parent / WORLD_VOCAB
    try:
        lines = vocab.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        raise TokenizerError(f"{vocab}: the World vocabulary is missing or damaged in the rwkv package; reinstall "
                             "it") from None
    return _WorldVocab(lines, str(vocab))


def release_world_vocab() -> None:
    """Drop the World vocabulary's tables (16 MiB of small objects): a run under a memory budget has no more use
    for them once its data is tokenized. The next use reads them again."""
    _world_vocab.cache_clear()


class ByteTokenizer(Tokenizer):
    """One token per byte of the text in a fixed encoding: the tiny test models (UTF-8, or UTF-16-LE for v6).

    Token 0 is an ordinary byte here, so there is no end-of-document id."""

    vocab_size = 256
    eod = None

    def __init__(self, encoding: str) -> None:
        self.encoding = encoding
        self.name = "bytes" if encoding == "utf-8" else encoding

    def _encode(self, text: str) -> list[int]:
        return list(text.encode(self.encoding))

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode(self.encoding, errors="replace")


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json`, read with the `tokenizers` library (a JSON file: no code runs from it)."""

    def __init__(self, path: str | os.PathLike) -> None:
        from tokenizers import Tokenizer as _HF

        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        try:
            size = path.stat().st_size if path.is_file() else None
        except OSError as e:
            raise TokenizerError(f"{path}: cannot read ({e.strerror})") from None
        if size is None:
            raise TokenizerError(f"{path}: no such tokenizer file")
        if size > MAX_TOKENIZER_BYTES:
            raise TokenizerError(f"{path}: {size} bytes, more than any tokenizer.json "
                                 f"({MAX_TOKENIZER_BYTES >> 20} MiB at most)")
        try:
            self._tok = _HF.from_file(str(path))
        except BaseException as e:  # noqa: BLE001 - plain Exceptions for a bad file; a Rust panic is a BaseException
            if isinstance(e, KeyboardInterrupt | SystemExit):
                raise
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise TokenizerError(f"{path}: not a valid tokenizer.json ({reason})") from None
        self.path = path
        self.name = f"hf:{path}"
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eod = _find_eod(self._tok)

    def _encode(self, text: str) -> list[int]:
        # no automatic BOS/EOS: the data pipeline decides exactly which tokens a sample holds
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids))


def _find_eod(tok) -> int | None:
    special = {t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    for name in _EOD_NAMES:
        if name in special:
            return special[name]
    found = sorted(i for content, i in special.items() if _EOD_PATTERN.search(content))
    return found[0] if found else None


def get_tokenizer(name: str | None = None, spec: ModelSpec | None = None) -> Tokenizer:
    """name: "world" | "bytes" (UTF-8 bytes) | "utf-16-le" | a path to a Hugging Face tokenizer.json.

    None: chosen from spec.vocab_size (65536 -> world, 256 -> bytes); anything else needs a name,
    because guessing wrong trains a state on text the model never reads.
    """
    if name is None:
        if spec is None:
            raise TokenizerError(f"no tokenizer named and no model to choose one from; pass {option('tokenizer')}")
        if spec.vocab_size == WORLD_VOCAB_SIZE:
            return WorldTokenizer()
        if spec.vocab_size == 256:
            return ByteTokenizer("utf-8")
        raise TokenizerError(f"model {spec.name} has a vocabulary of {spec.vocab_size} tokens, which matches no "
                             f"built-in tokenizer; pass {option('tokenizer')} (world, bytes, utf-16-le or a "
                             "tokenizer.json)")
    tok = _named(name)
    if spec is not None and tok.vocab_size > spec.vocab_size:
        raise TokenizerError(f"tokenizer {tok.name} has {tok.vocab_size} tokens but model {spec.name} "
                             f"has {spec.vocab_size}")
    return tok


def check_tokenizer_name(name: str | os.PathLike) -> str | None:
    """Why `name` names no tokenizer (None when it does): lets a run refuse it before loading anything."""
    name = os.fspath(name)
    if name.strip().lower() in _ALIASES or Path(name.removeprefix("hf:")).exists():
        return None
    return "expected world, bytes, utf-16-le or the path of a tokenizer.json (no such file)"


def _named(name: str) -> Tokenizer:
    why = check_tokenizer_name(name)
    if why is not None:
        raise TokenizerError(f"{option('tokenizer', name)}: unknown tokenizer: {why}")
    kind = _ALIASES.get(name.strip().lower())
    if kind == "world":
        return WorldTokenizer()
    if kind is not None:
        return ByteTokenizer(kind)
    return HFTokenizer(name.removeprefix("hf:"))

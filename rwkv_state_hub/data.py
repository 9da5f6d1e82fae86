"""Training data for state tuning: files -> Samples (tokens + which of them are trained) -> padded Batches.

Formats, chosen by extension (a directory means every supported file in it, sorted by name):

    .jsonl / .json   JSON Lines, one sample per line:
                       {"text": "..."}                                 every token trained, plus end-of-document
                       {"messages": [{"role": ..., "content": ...}]}   World chat format, assistant turns trained
                       {"prompt": "...", "response": "..."}            "User: ...\\n\\nAssistant: ...", response trained
                       {"instruction": "...", "input": "...", "output": "..."}  output trained
                       {"tokens": [ids], "mask": [0/1]}  (or "text": [ids])    RWKV-StateTuning, used as given
    .txt             one document, cut into windows of ctx_len + 1 tokens, every token trained
    .bin + .idx      RWKV-LM / Megatron binidx: each document cut into windows like .txt, read lazily

All data is checked when loaded, so bad data fails before any training starts: jsonl and txt are parsed whole;
binidx files can be far larger than memory, so their index is read and every token id range-checked through the
memory map a chunk at a time, and the tokens of a window come from the memory map when asked for.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from .errors import InvalidDataError, InvalidOptionError, option
from .files import atomic_write
from .prompt_format import ROLES, Message, chat_segments, clean_turn, instruction_segments
from .tokenizer import Tokenizer, lone_surrogate

JSONL_SUFFIXES = (".jsonl", ".json")
TEXT_SUFFIXES = (".txt",)
BINIDX_SUFFIXES = (".bin", ".idx")
ACCEPTED = ('{"text": str}, {"messages": [{"role", "content"}, ...]}, {"prompt", "response"}, '
            '{"instruction", "input" (optional), "output"}, {"tokens": [ids], "mask": [0/1]}')

BINIDX_MAGIC = b"MMIDIDX\x00\x00"
_BINIDX_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, number of sequences, doc_idx length
_BINIDX_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16}
_BINIDX_FLOATS = {6: "float64", 7: "float32"}
_CHUNK = 8 << 20
_ID_CHECK_CHUNK = 64 << 20  # bytes of a .bin mapped at once while its token ids are range-checked
_ID_SEARCH_BLOCK = 1 << 20  # tokens searched at once for the first bad id in a chunk that has one
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # a JSON escape that may leave a lone surrogate


@dataclass
class Sample:
    """One training sequence: mask[i] == 1 means tokens[i] is a target, predicted from tokens[:i] and the state."""

    tokens: list[int]
    mask: list[int]
    source: str  # where it came from, for messages: "file.jsonl:12", "notes.txt#3", "data.bin#doc17"

    @property
    def n_trained(self) -> int:
        """Targets actually trained: the first token is only ever an input."""
        return sum(self.mask[1:])


@dataclass
class Batch:
    inputs: torch.Tensor  # [B, T] long: tokens[:-1] of each sample, right-padded with 0
    targets: torch.Tensor  # [B, T] long: tokens[1:], padded with 0
    loss_mask: torch.Tensor  # [B, T] float32: mask[1:] of each sample, 0 on padding
    mask: torch.Tensor  # [B, T] bool: True on real input positions (the model's `mask` argument)
    n_trained: int  # loss_mask.sum()

    def to(self, device: torch.device | str) -> Batch:
        """The same batch on another device."""
        return Batch(self.inputs.to(device), self.targets.to(device), self.loss_mask.to(device),
                     self.mask.to(device), self.n_trained)

    def window(self, start: int, stop: int) -> Batch:
        """Positions start..stop-1 of every sequence (a chunk in time, for exact long-context training)."""
        loss_mask = self.loss_mask[:, start:stop]
        return Batch(self.inputs[:, start:stop], self.targets[:, start:stop], loss_mask, self.mask[:, start:stop],
                     int(loss_mask.sum()))


def collate(samples: list[Sample]) -> Batch:
    """Right-pad samples of different lengths into one batch; padding is never an input the loss sees."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    T = max(len(s.tokens) for s in samples) - 1
    B = len(samples)
    inputs = torch.zeros(B, T, dtype=torch.long)
    targets = torch.zeros(B, T, dtype=torch.long)
    loss_mask = torch.zeros(B, T, dtype=torch.float32)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, s in enumerate(samples):
        n = len(s.tokens) - 1
        if n < 1 or len(s.mask) != len(s.tokens):
            raise ValueError(f"{s.source}: a sample needs at least 2 tokens and one mask value per token")
        tokens = torch.tensor(s.tokens, dtype=torch.long)
        inputs[b, :n] = tokens[:-1]
        targets[b, :n] = tokens[1:]
        loss_mask[b, :n] = torch.tensor(s.mask[1:], dtype=torch.float32)
        mask[b, :n] = True
    return Batch(inputs, targets, loss_mask, mask, int(loss_mask.sum().item()))


# ---------------------------------------------------------------- chat records (the template: prompt_format)


def _chat_messages(messages: object, where: str = "messages") -> list[Message]:
    """A "messages" value checked as training data: role and content strings, at least one assistant turn,
    none of them empty. The text it renders to is prompt_format's, the same that generation sends."""
    if not isinstance(messages, list):
        raise InvalidDataError(f'{where}: "messages" must be a list, found {_kind(messages)}')
    checked: list[Message] = []
    for j, message in enumerate(messages):
        at = f"{where}: messages[{j}]"
        if not isinstance(message, dict):
            raise InvalidDataError(f"{at} must be an object with role and content, found {_kind(message)}")
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            found = repr(role)[:40] if isinstance(role, str) else _kind(role)
            raise InvalidDataError(f"{at}: role must be one of system, user, assistant, found {found}")
        content = message.get("content")
        if not isinstance(content, str):
            raise InvalidDataError(f'{at}: "content" must be a string, found {_kind(content)}')
        if role == "assistant" and not clean_turn(content):
            raise InvalidDataError(f"{at}: the assistant turn is empty, nothing to train on")
        checked.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in checked):
        raise InvalidDataError(f"{where}: no assistant turn, nothing to train on")
    return checked


def _answer_segments(obj: dict, where: str) -> list[tuple[str, bool]]:
    """prompt/response and instruction/input/output records, in the chat and Alpaca-style formats."""
    if "prompt" in obj or "response" in obj:
        prompt, response = (_string_field(obj, key, where) for key in ("prompt", "response"))
        if not response:
            raise InvalidDataError(f'{where}: "response" is empty, nothing to train on')
        return chat_segments([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}])
    instruction, output = (_string_field(obj, key, where) for key in ("instruction", "output"))
    given = _string_field(obj, "input", where) if obj.get("input") is not None else ""
    if not output:
        raise InvalidDataError(f'{where}: "output" is empty, nothing to train on')
    return instruction_segments(instruction, given, output)


def _string_field(obj: dict, key: str, where: str) -> str:
    if key not in obj:
        raise InvalidDataError(f'{where}: missing "{key}"')
    value = obj[key]
    if not isinstance(value, str):
        raise InvalidDataError(f'{where}: "{key}" must be a string, found {_kind(value)}')
    return clean_turn(value)


def _kind(value: object) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


# ---------------------------------------------------------------- one record -> tokens and mask


def encode_segments(segments: list[tuple[str, bool]], tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """Encode trained and untrained text apart so the mask boundary falls exactly between tokens.

    Consecutive untrained pieces are encoded together: "User: hi\\n\\nAssistant:" then gets the very ids
    the model sees when it is prompted with that string at inference."""
    tokens: list[int] = []
    mask: list[int] = []
    merged: list[tuple[str, bool]] = []
    for text, trained in segments:
        if merged and not trained and not merged[-1][1]:
            merged[-1] = (merged[-1][0] + text, False)
        else:
            merged.append((text, trained))
    for text, trained in merged:
        ids = tokenizer.encode(text)
        tokens += ids
        mask += [int(trained)] * len(ids)
    return tokens, mask


def _record(obj: object, tokenizer: Tokenizer, where: str) -> tuple[list[int], list[int]]:
    if not isinstance(obj, dict):
        raise InvalidDataError(f"{where}: expected a JSON object, found {_kind(obj)}")
    if "messages" in obj:
        return encode_segments(chat_segments(_chat_messages(obj["messages"], where)), tokenizer)
    if "tokens" in obj or isinstance(obj.get("text"), list):
        return _given_tokens(obj, where)
    if "text" in obj:
        text = obj["text"]
        if not isinstance(text, str):
            raise InvalidDataError(f'{where}: "text" must be a string (or a list of token ids with "mask"), '
                                   f"found {_kind(text)}")
        tokens = tokenizer.encode(text) + ([tokenizer.eod] if tokenizer.eod is not None else [])
        return tokens, [1] * len(tokens)
    if any(key in obj for key in ("prompt", "response", "instruction", "output")):
        return encode_segments(_answer_segments(obj, where), tokenizer)
    keys = ", ".join(json.dumps(k)[:40] for k in list(obj)[:5]) or "no keys"  # escaped: one line whatever they hold
    raise InvalidDataError(f"{where}: unrecognised sample ({keys}); accepted: {ACCEPTED}")


def _given_tokens(obj: dict, where: str) -> tuple[list[int], list[int]]:
    key = "tokens" if "tokens" in obj else "text"
    tokens = obj[key]
    if not isinstance(tokens, list) or not all(type(t) is int for t in tokens):
        raise InvalidDataError(f'{where}: "{key}" must be a list of integer token ids')
    mask = obj.get("mask", [1] * len(tokens))
    if not isinstance(mask, list):
        raise InvalidDataError(f'{where}: "mask" must be a list of 0/1, found {_kind(mask)}')
    if len(mask) != len(tokens):
        raise InvalidDataError(f'{where}: "{key}" has {len(tokens)} ids but "mask" has {len(mask)} values')
    bad = next((m for m in mask if type(m) is not int or m not in (0, 1)), None)
    if bad is not None:
        raise InvalidDataError(f'{where}: "mask" values must be 0 or 1, found {bad!r}')
    return tokens, mask


def _check_ids(tokens: Sequence[int], vocab_size: int, where: str) -> None:
    if tokens and (min(tokens) < 0 or max(tokens) >= vocab_size):
        bad = next(t for t in tokens if not 0 <= t < vocab_size)
        raise InvalidDataError(f"{where}: token id {bad} is outside the vocabulary (vocab size {vocab_size})")


def windows(n: int, ctx_len: int) -> list[tuple[int, int]]:
    """(start, length) windows of a long document: ctx_len + 1 tokens each, overlapping by one token, so every
    token after the first is a target exactly once (the last token of a window is the first input of the next).
    A final window of one token would train nothing and is dropped."""
    return [(start, min(ctx_len + 1, n - start)) for start in range(0, max(n - 1, 0), ctx_len)]


# ---------------------------------------------------------------- files


def _read_jsonl(path: Path, name: str, tokenizer: Tokenizer, ctx_len: int, vocab_size: int) -> tuple[list, int]:
    data = _read_bytes(path, name)
    records = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        where = f"{name}:{number}"
        try:
            line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise InvalidDataError(f"{where}: not UTF-8 text (byte {e.start + 1} of the line)") from None
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            spread = number == 1 and line.strip() in ("[", "{")
            hint = " (one JSON value over several lines? write one object per line: JSON Lines)" if spread else ""
            raise InvalidDataError(f"{where}: bad JSON: {e.msg} at column {e.colno}{hint}") from None
        except RecursionError:
            raise InvalidDataError(f"{where}: bad JSON: nested too deeply") from None
        except ValueError as e:  # e.g. an integer of more digits than Python converts
            raise InvalidDataError(f"{where}: bad JSON: {str(e).split(';')[0].splitlines()[0][:120]}") from None
        if _SURROGATE_ESCAPE.search(raw):
            _refuse_lone_surrogates(obj, where)
        records.append((obj, where))
    if not records:
        raise InvalidDataError(f"{name}: no samples (only blank lines)")
    return _samples(records, tokenizer, ctx_len, vocab_size)


def _samples(records: list[tuple[object, str]], tokenizer: Tokenizer, ctx_len: int,
             vocab_size: int) -> tuple[list[Sample], int]:
    """Parsed records (each with where it came from) -> samples cut to ctx_len + 1 tokens, and how many were cut."""
    samples: list[Sample] = []
    truncated = 0
    for obj, where in records:
        tokens, mask = _record(obj, tokenizer, where)
        _check_ids(tokens, vocab_size, where)
        cut = len(tokens) > ctx_len + 1
        if cut:
            tokens, mask = tokens[: ctx_len + 1], mask[: ctx_len + 1]
            truncated += 1
        sample = Sample(tokens, mask, where)
        if sample.n_trained == 0:
            within = f" within its first {ctx_len + 1} tokens (ctx_len {ctx_len})" if cut else ""
            raise InvalidDataError(f"{where}: nothing to train on{within}: no token after the first has mask 1")
        samples.append(sample)
    return samples, truncated


def _refuse_lone_surrogates(obj: object, where: str) -> None:
    """A "\\ud800" escape without its pair parses to a string no tokenizer can encode: refuse it by line."""
    pending = [obj]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            why = lone_surrogate(item)
            if why is not None:
                raise InvalidDataError(f"{where}: {why}; JSON escapes \\ud800-\\udfff must come in pairs")
        elif isinstance(item, dict):
            pending += [*item.keys(), *item.values()]
        elif isinstance(item, list):
            pending += item


def _read_text(path: Path, name: str, tokenizer: Tokenizer, ctx_len: int, vocab_size: int) -> list[Sample]:
    data = _read_bytes(path, name)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line_start = data.rfind(b"\n", 0, e.start) + 1
        line = data.count(b"\n", 0, e.start) + 1
        raise InvalidDataError(f"{name}:{line}: not UTF-8 text (byte {e.start - line_start + 1} of the line)") from None
    if not text.strip():
        raise InvalidDataError(f"{name}: empty file (only whitespace)")
    tokens = tokenizer.encode(text) + ([tokenizer.eod] if tokenizer.eod is not None else [])
    _check_ids(tokens, vocab_size, name)
    spans = windows(len(tokens), ctx_len)
    samples = [Sample(tokens[s : s + n], [1] * n, f"{name}#{k}") for k, (s, n) in enumerate(spans, start=1)]
    if not samples:
        raise InvalidDataError(f"{name}: nothing to train on (a single token)")
    return samples


def _read_bytes(path: Path, name: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InvalidDataError(f"{name}: cannot read ({e.strerror})") from None
    if not data.strip():
        raise InvalidDataError(f"{name}: empty file")
    return data


class _BinIdx:
    """One binidx pair. Only the index is read up front; each window's tokens come from the memory map on demand."""

    def __init__(self, idx: Path, bin_: Path, ctx_len: int, vocab_size: int) -> None:
        self.idx, self.bin, self.ctx_len, self.vocab_size = idx, bin_, ctx_len, vocab_size
        self.name = str(bin_)
        self.dtype, self.sizes, self.pointers = _read_index(idx, bin_)
        _check_bin_ids(bin_, self.dtype, self.sizes, self.pointers, vocab_size)
        sizes = self.sizes
        L = sizes.astype(np.int64)
        per_doc = np.where(L >= 2, (L - 1 + ctx_len - 1) // ctx_len, 0)  # windows of each document
        self.per_doc = per_doc
        self.ends = np.cumsum(per_doc)  # window index one past each document's last
        self.n_trained = int(np.where(L >= 2, L - 1, 0).sum())
        self.n_tokens = self.n_trained + int(per_doc.sum())
        self._data: np.ndarray | None = None
        if len(self) == 0:
            why = "every document is shorter than 2 tokens" if len(sizes) else "the index lists no documents"
            raise InvalidDataError(f"{self.name}: no samples: {why}")

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def __getitem__(self, i: int) -> Sample:
        doc = int(np.searchsorted(self.ends, i, side="right"))
        k = i - (int(self.ends[doc - 1]) if doc else 0)
        start = k * self.ctx_len
        n = min(self.ctx_len + 1, int(self.sizes[doc]) - start)
        if self._data is None:
            self._data = np.memmap(self.bin, dtype=np.uint8, mode="r")
        offset = int(self.pointers[doc]) + start * self.dtype.itemsize
        tokens = np.frombuffer(self._data, dtype=self.dtype, count=n, offset=offset).tolist()
        source = f"{self.name}#doc{doc}" + (f"#{k + 1}" if self.per_doc[doc] > 1 else "")
        _check_ids(tokens, self.vocab_size, source)
        return Sample(tokens, [1] * n, source)

    def __getstate__(self) -> dict:
        """A memory map does not travel to DataLoader workers; each opens its own."""
        return {**self.__dict__, "_data": None}


def _check_bin_ids(bin_: Path, dtype: np.dtype, sizes: np.ndarray, pointers: np.ndarray, vocab: int) -> None:
    """Range-check every token id of every document before the first step, so that a bad id deep in a large file
    costs one line now, not a stop mid-run. The bytes the documents use are mapped 64 MiB at a time and unmapped
    after, so memory stays bounded whatever the file's size."""
    info = np.iinfo(dtype)
    if not len(sizes) or (info.min >= 0 and info.max < vocab):
        return  # this dtype cannot hold an id outside the vocabulary (uint16 for a 65536-token one)
    size = dtype.itemsize
    start, stop = int(pointers.min()), int((pointers + sizes.astype(np.int64) * size).max())
    for offset in range(start, stop, _ID_CHECK_CHUNK):
        chunk = np.memmap(bin_, dtype=dtype, mode="r", offset=offset,
                          shape=(min(_ID_CHECK_CHUNK, stop - offset) // size,))
        try:
            if chunk.min() >= 0 and chunk.max() < vocab:
                continue
            found = _first_bad_id(chunk, offset, sizes, pointers, vocab)
        finally:
            del chunk  # unmap: the pages read leave the process's memory
        if found is not None:
            doc, position, bad = found
            raise InvalidDataError(f"{bin_}: document {doc}, token {position}: token id {bad} is outside the "
                                   f"vocabulary (vocab size {vocab})")


def _first_bad_id(chunk: np.ndarray, offset: int, sizes: np.ndarray, pointers: np.ndarray,
                  vocab: int) -> tuple[int, int, int] | None:
    """(document, position in it, id) of the chunk's first out-of-range id that a document uses; bytes that no
    document covers are never read as tokens and may hold anything."""
    size = chunk.dtype.itemsize
    order = np.argsort(pointers, kind="stable")
    firsts, lasts = pointers[order], (pointers + sizes.astype(np.int64) * size)[order]
    reach = np.maximum.accumulate(lasts)  # the furthest byte any document starting at or before here covers
    widest = np.maximum.accumulate(np.where(lasts == reach, np.arange(len(order)), 0))  # which one reaches it
    for block in range(0, len(chunk), _ID_SEARCH_BLOCK):
        part = chunk[block : block + _ID_SEARCH_BLOCK]
        at = np.flatnonzero((part < 0) | (part >= vocab))
        where = offset + (block + at) * size  # byte offsets of the bad ids
        k = np.searchsorted(firsts, where, side="right") - 1
        used = (k >= 0) & (reach[np.maximum(k, 0)] > where)
        if used.any():
            i = int(np.argmax(used))
            doc = int(order[widest[k[i]]])
            return doc, int(where[i] - pointers[doc]) // size, int(part[at[i]])
    return None


def _read_index(idx: Path, bin_: Path) -> tuple[np.dtype, np.ndarray, np.ndarray]:
    """The Megatron MMapIndexedDataset index: header, sizes int32[n], pointers int64[n] (bytes), doc_idx."""
    try:
        size = idx.stat().st_size
        with open(idx, "rb") as f:
            header = f.read(_BINIDX_HEADER.size)
        bin_size = bin_.stat().st_size
    except OSError as e:
        raise InvalidDataError(f"{e.filename}: cannot read ({e.strerror})") from None
    if len(header) < _BINIDX_HEADER.size or not header.startswith(BINIDX_MAGIC):
        raise InvalidDataError(f"{idx}: not a binidx index (bad magic; expected an MMIDIDX file from RWKV-LM/Megatron)")
    _, version, code, n, doc_count = _BINIDX_HEADER.unpack(header)
    if version != 1:
        raise InvalidDataError(f"{idx}: unsupported binidx version {version} (expected 1)")
    if code not in _BINIDX_DTYPES:
        what = f"{_BINIDX_FLOATS[code]}: token ids must be integers" if code in _BINIDX_FLOATS else "unknown"
        raise InvalidDataError(f"{idx}: unsupported token dtype code {code} ({what})")
    expected = _BINIDX_HEADER.size + 12 * n + 8 * doc_count
    if size < expected:
        raise InvalidDataError(f"{idx}: truncated index ({size} bytes, the header promises {expected})")
    dtype = np.dtype(_BINIDX_DTYPES[code]).newbyteorder("<")
    sizes = np.fromfile(idx, dtype="<i4", count=n, offset=_BINIDX_HEADER.size)
    pointers = np.fromfile(idx, dtype="<i8", count=n, offset=_BINIDX_HEADER.size + 4 * n)
    ends = pointers + sizes.astype(np.int64) * dtype.itemsize
    bad = np.flatnonzero((sizes < 0) | (pointers < 0) | (ends > bin_size))
    if len(bad):
        d = int(bad[0])
        raise InvalidDataError(f"{bin_}: does not match its index: document {d} would span bytes "
                               f"{int(pointers[d])}..{int(ends[d])} of a {bin_size}-byte file")
    odd = np.flatnonzero(pointers % dtype.itemsize)
    if len(odd):
        d = int(odd[0])
        raise InvalidDataError(f"{idx}: document {d} starts at byte {int(pointers[d])}, not on a "
                               f"{dtype.itemsize}-byte token boundary")
    return dtype, sizes, pointers


def write_binidx(path_prefix: str | os.PathLike, documents: list[list[int]],
                 dtype: npt.DTypeLike = np.uint16) -> tuple[Path, Path]:
    """Write documents as RWKV-LM / Megatron binidx (`prefix.bin` + `prefix.idx`), each file atomically.

    uint16 holds the World vocabulary (65536); use int32 for anything larger."""
    dtype = np.dtype(dtype).newbyteorder("<")
    code = next((c for c, t in _BINIDX_DTYPES.items() if np.dtype(t) == dtype.newbyteorder("=")), None)
    if code is None:
        raise ValueError(f"binidx cannot store {dtype}; use one of uint8, int8, int16, int32, int64, uint16")
    prefix = str(path_prefix).removesuffix(".bin").removesuffix(".idx")
    limits = np.iinfo(dtype)
    arrays = []
    for d, doc in enumerate(documents):
        values = np.asarray(doc, dtype=np.int64).reshape(-1)
        if values.size and (values.min() < limits.min or values.max() > limits.max):
            raise InvalidDataError(f"document {d}: token ids {values.min()}..{values.max()} do not fit {dtype.name}")
        arrays.append(values.astype(dtype))
    sizes = np.array([len(a) for a in arrays], dtype="<i4")
    pointers = np.zeros(len(arrays), dtype="<i8")
    np.cumsum(sizes[:-1].astype(np.int64) * dtype.itemsize, out=pointers[1:])
    doc_idx = np.arange(len(arrays) + 1, dtype="<i8")
    header = _BINIDX_HEADER.pack(BINIDX_MAGIC, 1, code, len(arrays), len(doc_idx))
    data = np.concatenate(arrays) if arrays else np.zeros(0, dtype=dtype)
    bin_path = atomic_write(prefix + ".bin", lambda p: p.write_bytes(data.tobytes()))
    index = header + sizes.tobytes() + pointers.tobytes() + doc_idx.tobytes()
    idx_path = atomic_write(prefix + ".idx", lambda p: p.write_bytes(index))
    return bin_path, idx_path


# ---------------------------------------------------------------- the dataset


class Dataset(Sequence[Sample]):
    """Every sample of every file, in order. jsonl/txt samples are held in memory; binidx ones are read on demand."""

    def __init__(self, paths: list[Path], parts: list, ctx_len: int, n_truncated: int = 0,
                 records_sha256: str | None = None) -> None:
        """parts: lists of Samples (or binidx readers), in order; `load_dataset` is the usual way to make one.
        records_sha256: the hash of in-memory records, for a dataset that has no files."""
        self.paths = paths  # every data file, in the order they are hashed (binidx: .idx then .bin)
        self._records_sha256 = records_sha256
        self.ctx_len = ctx_len
        self.n_truncated = n_truncated  # jsonl samples cut to ctx_len + 1 tokens
        self._parts = parts
        self._starts = []
        total = 0
        for part in parts:
            self._starts.append(total)
            total += len(part)
        self._len = total
        self.n_tokens = sum(p.n_tokens if isinstance(p, _BinIdx) else sum(len(s.tokens) for s in p) for p in parts)
        self.n_trained_tokens = sum(p.n_trained if isinstance(p, _BinIdx) else sum(s.n_trained for s in p)
                                    for p in parts)

    @property
    def path(self) -> list[Path]:
        return self.paths

    @cached_property
    def sha256(self) -> str:
        """sha256 over the data files' bytes, in order (or over in-memory records as JSON Lines): names which data
        a state was trained on."""
        if self._records_sha256 is not None:
            return self._records_sha256
        h = hashlib.sha256()
        for path in self.paths:
            with open(path, "rb") as f:
                while chunk := f.read(_CHUNK):
                    h.update(chunk)
        return h.hexdigest()

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> Sample:
        if not isinstance(i, int | np.integer):
            raise TypeError(f"dataset indices must be integers, not {type(i).__name__}")
        i = int(i)
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError(f"sample {i} out of range ({self._len} samples)")
        p = bisect.bisect_right(self._starts, i) - 1
        return self._parts[p][i - self._starts[p]]

    def summary(self) -> str:
        """One line for the CLI."""
        cut = f", {self.n_truncated} cut to {self.ctx_len + 1} tokens" if self.n_truncated else ""
        return (f"{len(self)} samples from {len(self.paths)} file(s): {self.n_tokens:,} tokens, "
                f"{self.n_trained_tokens:,} trained{cut}")

    def __repr__(self) -> str:
        return f"<Dataset {self.summary()}>"


def load_dataset(paths: str | os.PathLike | list, tokenizer: Tokenizer, ctx_len: int,
                 vocab_size: int | None = None) -> Dataset:
    """Read every sample of the given files and folders, or of a list of records (dicts as a .jsonl line
    holds them); any bad line or record stops here, naming its file and line (or record number).

    vocab_size: the model's; token ids at or above it are refused (default: the tokenizer's)."""
    if ctx_len < 1:
        raise InvalidOptionError(f"{option('ctx_len', ctx_len)}: must be at least 1")
    vocab = vocab_size if vocab_size is not None else tokenizer.vocab_size
    items = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    if not items:
        raise InvalidOptionError(f"no data given ({option('data')}: files, folders or a list of records)")
    if all(isinstance(item, dict) for item in items):
        return _records_dataset(items, tokenizer, ctx_len, vocab)
    if any(not isinstance(item, str | os.PathLike) for item in items):
        bad = next(item for item in items if not isinstance(item, str | os.PathLike))
        raise InvalidOptionError(f"{option('data')}: expected paths or a list of dicts, found a "
                                 f"{type(bad).__name__} among them")
    sources: list[tuple[str, tuple[Path, ...]]] = []
    for item in items:
        for source in _expand(Path(item)):
            if source not in sources:
                sources.append(source)
    files: list[Path] = []
    parts: list = []
    truncated = 0
    for kind, found in sources:
        files += found
        path = found[0]
        name = str(path)
        if kind == "jsonl":
            samples, cut = _read_jsonl(path, name, tokenizer, ctx_len, vocab)
            parts.append(samples)
            truncated += cut
        elif kind == "text":
            parts.append(_read_text(path, name, tokenizer, ctx_len, vocab))
        else:
            parts.append(_BinIdx(found[0], found[1], ctx_len, vocab))
    return Dataset(files, parts, ctx_len, truncated)


def _records_dataset(records: list[dict], tokenizer: Tokenizer, ctx_len: int, vocab: int) -> Dataset:
    """In-memory records (a notebook's list of dicts), read exactly as the same lines of a .jsonl file."""
    try:
        lines = [json.dumps(r, ensure_ascii=False, sort_keys=True) for r in records]
    except (TypeError, ValueError) as e:
        raise InvalidDataError(f"data: a record is not JSON data ({e})") from None
    numbered = [(r, f"data[{i}]") for i, r in enumerate(records)]
    for obj, where in numbered:
        _refuse_lone_surrogates(obj, where)
    samples, truncated = _samples(numbered, tokenizer, ctx_len, vocab)
    digest = hashlib.sha256("".join(line + "\n" for line in lines).encode("utf-8", "surrogatepass")).hexdigest()
    return Dataset([], [samples], ctx_len, truncated, records_sha256=digest)


def _expand(path: Path) -> list[tuple[str, tuple[Path, ...]]]:
    """A path as given -> (format, files) entries; binidx is the pair (.idx, .bin)."""
    if path.is_dir():
        entries = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        found = [_classify(p) for p in entries if p.suffix.lower() in JSONL_SUFFIXES + TEXT_SUFFIXES + BINIDX_SUFFIXES]
        unique = list(dict.fromkeys(found))
        if not unique:
            raise InvalidDataError(f"{path}: no data files in this folder (.jsonl, .json, .txt or .bin + .idx)")
        return unique
    if path.is_file():
        return [_classify(path)]
    prefix = str(path)
    if Path(prefix + ".bin").is_file() and Path(prefix + ".idx").is_file():  # RWKV-LM's --data_file convention
        return [("binidx", (Path(prefix + ".idx"), Path(prefix + ".bin")))]
    raise InvalidDataError(f"{path}: no such file or directory")


def _classify(path: Path) -> tuple[str, tuple[Path, ...]]:
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return "jsonl", (path,)
    if suffix in TEXT_SUFFIXES:
        return "text", (path,)
    if suffix in BINIDX_SUFFIXES:
        idx, bin_ = path.with_suffix(".idx"), path.with_suffix(".bin")
        other = bin_ if suffix == ".idx" else idx
        if not other.is_file():
            raise InvalidDataError(f"{path}: a binidx dataset needs both files; {other.name} is missing")
        return "binidx", (idx, bin_)
    raise InvalidDataError(f"{path}: unsupported file type {suffix or '(no extension)'!r}; "
                           "expected .jsonl, .json, .txt, or a .bin + .idx pair")

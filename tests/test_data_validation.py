"""Issue 16, item 5: all training data is checked before the first step. binidx token ids over the whole file
(a chunk of the memory map at a time), invalid UTF-8 and lone surrogates as `file:line:`, and every tokenizer
file that is not one gets one line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import REPO

import rwkv_state_hub.data as data_module
import rwkv_state_hub.tokenizer as tokenizer_module
from rwkv_state_hub.cli import cli
from rwkv_state_hub.data import _BINIDX_HEADER, BINIDX_MAGIC, load_dataset, write_binidx
from rwkv_state_hub.errors import StateHubError
from rwkv_state_hub.tokenizer import get_tokenizer

BYTES = get_tokenizer("bytes")
MODEL = REPO / "rwkv_state_hub" / "examples" / "models" / "tiny-rwkv-5v2-730K.pth"


def refused(path, tokenizer=BYTES, vocab_size=None, ctx_len=64) -> str:
    with pytest.raises(StateHubError) as err:
        load_dataset(path, tokenizer, ctx_len, vocab_size)
    assert "\n" not in str(err.value)
    return str(err.value)


def write_raw_binidx(prefix: Path, tokens: list[int], docs: list[tuple[int, int]], dtype=np.uint16) -> Path:
    """A binidx pair whose documents are (first token, length) spans of `tokens`: gaps and any order allowed."""
    codes = {np.dtype(np.uint16): 8, np.dtype(np.int32): 4}
    item = np.dtype(dtype).itemsize
    Path(f"{prefix}.bin").write_bytes(np.asarray(tokens, dtype=dtype).tobytes())
    sizes = np.array([n for _, n in docs], dtype="<i4")
    pointers = np.array([s * item for s, _ in docs], dtype="<i8")
    header = _BINIDX_HEADER.pack(BINIDX_MAGIC, 1, codes[np.dtype(dtype)], len(docs), len(docs) + 1)
    index = header + sizes.tobytes() + pointers.tobytes() + np.arange(len(docs) + 1, dtype="<i8").tobytes()
    Path(f"{prefix}.idx").write_bytes(index)
    return Path(f"{prefix}.bin")


# ---------------------------------------------------------------- binidx: every id checked when loaded


def test_a_bad_id_in_document_20_is_refused_when_loaded(tmp_path):
    docs = [[1, 2, 3, 4, 5]] * 30
    docs[20] = [1, 2, 3, 300, 5]
    write_binidx(tmp_path / "c", docs)
    message = refused(tmp_path / "c.bin")
    assert message == (f"{tmp_path / 'c.bin'}: document 20, token 3: token id 300 is outside the vocabulary "
                       "(vocab size 256)")


def test_a_bad_id_in_the_data_stops_train_before_the_first_step(tmp_path):
    docs = [[1, 2, 3, 4, 5, 6, 7, 8]] * 30
    docs[20] = [1, 2, 3, 4, 5, 6, 7, 999]
    write_binidx(tmp_path / "c", docs)
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, ["train", "--model", str(MODEL), "--data", str(tmp_path / "c.bin"), "--out", str(out),
                                 "--steps", "8", "--micro-bsz", "1"])
    assert r.exit_code == 1 and r.output.strip() == (f"Error: {tmp_path / 'c.bin'}: document 20, token 7: token id 999 "
                                                     "is outside the vocabulary (vocab size 256)")
    assert not out.exists()  # not one step trained


@pytest.mark.parametrize("seed", range(6))
def test_the_chunked_check_finds_the_first_bad_id_a_document_uses(tmp_path, monkeypatch, seed):
    """Chunks and search blocks of a few tokens, documents in any order with gaps between them: the error names
    the first bad id in file order that a document covers, with its document and position; ids in the gaps,
    which no document uses, are never read as tokens and pass."""
    monkeypatch.setattr(data_module, "_ID_CHECK_CHUNK", 16)  # bytes: 8 uint16 tokens
    monkeypatch.setattr(data_module, "_ID_SEARCH_BLOCK", 3)
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 256, size=200).tolist()
    spans, start = [], 0
    while start < 190:
        n = int(rng.integers(1, 12))
        spans.append((start, min(n, 200 - start)))
        start += n + int(rng.integers(0, 4))  # a gap of 0-3 tokens
    order = rng.permutation(len(spans))
    docs = [spans[i] for i in order]
    used = {p for s, n in spans for p in range(s, s + n)}
    for p in set(range(200)) - used:
        tokens[p] = 60000  # junk where no document looks
    write_raw_binidx(tmp_path / "g", tokens, docs)
    assert len(load_dataset(tmp_path / "g.bin", BYTES, 8)) > 0
    bad = sorted(rng.choice(sorted(used), size=2, replace=False).tolist())
    for p in bad:
        tokens[p] = 256 + p
    write_raw_binidx(tmp_path / "g", tokens, docs)
    doc = next(d for d, (s, n) in enumerate(docs) if s <= bad[0] < s + n)
    want = f"document {doc}, token {bad[0] - docs[doc][0]}: token id {256 + bad[0]} is outside"
    assert want in refused(tmp_path / "g.bin")


def test_negative_ids_of_a_signed_dtype_are_refused(tmp_path):
    write_raw_binidx(tmp_path / "s", [1, 2, 3, 4, -7, 5], [(0, 3), (3, 3)], dtype=np.int32)
    assert "document 1, token 1: token id -7 is outside the vocabulary" in refused(tmp_path / "s.bin")


def test_a_document_not_on_a_token_boundary_is_refused(tmp_path):
    path = write_raw_binidx(tmp_path / "o", [1, 2, 3, 4], [(0, 2)])
    idx = Path(str(path).replace(".bin", ".idx"))
    raw = bytearray(idx.read_bytes())
    raw[_BINIDX_HEADER.size + 4 : _BINIDX_HEADER.size + 12] = (1).to_bytes(8, "little")  # pointer: byte 1
    idx.write_bytes(bytes(raw))
    assert refused(tmp_path / "o.bin") == f"{idx}: document 0 starts at byte 1, not on a 2-byte token boundary"


def test_no_id_can_be_out_of_range_so_nothing_is_read(tmp_path, monkeypatch):
    """uint16 ids and a 65536-token vocabulary: the check has nothing to do and maps nothing."""
    write_binidx(tmp_path / "w", [[1, 2, 65535]])
    monkeypatch.setattr(np, "memmap", lambda *a, **k: pytest.fail("mapped"))
    assert load_dataset(tmp_path / "w.bin", BYTES, 8, vocab_size=65536) is not None


# ---------------------------------------------------------------- jsonl and txt: file:line


@pytest.mark.parametrize("record", [
    '{"text": "ab\\ud800cd"}',
    '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "\\udfff"}]}',
    '{"prompt": "\\ud83d", "response": "ok"}',
    '{"text": "ok", "note\\udc00": 1}',
])
def test_a_lone_surrogate_is_a_file_line_error(tmp_path, record):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "fine"}\n' + record + "\n")
    message = refused(path)
    assert message.startswith(f"{path}:2: lone surrogate \\u")
    assert "JSON escapes \\ud800-\\udfff must come in pairs" in message


def test_a_surrogate_pair_is_one_character_and_trains(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "\\ud83d\\ude00 and a literal backslash-u: \\\\ud800"}\n')
    sample = load_dataset(path, BYTES, 64)[0]
    assert BYTES.decode(sample.tokens) == "\U0001f600 and a literal backslash-u: \\ud800"


def test_an_integer_too_long_to_convert_is_a_file_line_error(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"tokens": [' + "1" * 5000 + "]}\n")
    assert refused(path).startswith(f"{path}:1: bad JSON: Exceeds the limit (4300 digits)")


def test_invalid_utf8_in_a_text_file_names_its_line(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes(b"first line\nsecond\nthird \xff line\n")
    assert refused(path) == f"{path}:3: not UTF-8 text (byte 7 of the line)"


def test_a_lone_surrogate_in_a_jsonl_file_through_the_cli(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "x\\ud800"}\n')
    r = CliRunner().invoke(cli, ["train", "--model", str(MODEL), "--data", str(path), "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and r.output.startswith(f"Error: {path}:1: lone surrogate \\ud800")
    assert len(r.output.strip().splitlines()) == 1


# ---------------------------------------------------------------- tokenizers


@pytest.mark.parametrize("name", ["bytes", "utf-16-le"])
def test_every_tokenizer_refuses_text_that_is_not_unicode(name):
    with pytest.raises(StateHubError, match=r"^cannot encode the text: lone surrogate \\udcff at character 3"):
        get_tokenizer(name).encode("ab\udcffc")


def test_an_hf_tokenizer_refuses_text_that_is_not_unicode(tmp_path):
    from tokenizers import Tokenizer, models

    path = tmp_path / "tokenizer.json"
    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(path))
    tok = get_tokenizer(str(path))
    assert tok.encode("a") == [0]
    with pytest.raises(StateHubError, match="lone surrogate"):
        tok.encode("a\ud800")


def test_a_prompt_that_is_not_unicode_is_one_line(tmp_path):
    """Bytes on the command line that are not UTF-8 reach Python as lone surrogates."""
    r = CliRunner().invoke(cli, ["generate", "--model", str(MODEL), "--prompt", "hi\udcff", "--max-tokens", "2"])
    assert r.exit_code == 1 and r.output.strip() == (
        "Error: cannot encode the text: lone surrogate \\udcff at character 3 (not valid Unicode text)")


@pytest.mark.parametrize("content", [
    b"not json at all",
    b"[1, 2, 3]",
    b"[" * 100_000 + b"]" * 100_000,
    b'{"version": "1.0", "model": {"type": "BPE", "vocab": {"\xff": 0}, "merges": []}}',
    b'{"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a b"]}}',
    b"",
])
def test_a_tokenizer_json_that_is_not_one_is_one_line(tmp_path, content):
    path = tmp_path / "tokenizer.json"
    path.write_bytes(content)
    with pytest.raises(StateHubError) as err:
        get_tokenizer(str(path))
    assert str(err.value).startswith(f"{path}: not a valid tokenizer.json (") and "\n" not in str(err.value)


def test_a_huge_tokenizer_json_is_refused_before_it_is_parsed(tmp_path, monkeypatch):
    monkeypatch.setattr(tokenizer_module, "MAX_TOKENIZER_BYTES", 1000)
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps({"padding": " " * 2000}))
    with pytest.raises(StateHubError, match=rf"^{re.escape(str(path))}: 2015 bytes, more than any tokenizer.json"):
        get_tokenizer(str(path))

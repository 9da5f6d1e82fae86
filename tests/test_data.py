"""Training data: every format to exact tokens and masks, windows, binidx, collate, and one-line errors."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import rwkv_state_hub.data as data_module
from rwkv_state_hub.data import (
    Dataset,
    Sample,
    collate,
    load_dataset,
    windows,
    write_binidx,
)
from rwkv_state_hub.errors import InvalidDataError, InvalidOptionError, StateHubError
from rwkv_state_hub.prompt_format import render_chat
from rwkv_state_hub.tokenizer import get_tokenizer

BYTES = get_tokenizer("bytes")


def b(text: str) -> list[int]:
    return list(text.encode())


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def only(dataset: Dataset) -> Sample:
    assert len(dataset) == 1
    return dataset[0]


def trained_text(sample: Sample, tokenizer=BYTES) -> list[str]:
    """The runs of trained tokens, decoded."""
    runs: list[list[int]] = []
    for i, (t, m) in enumerate(zip(sample.tokens, sample.mask, strict=True)):
        if m and (i == 0 or not sample.mask[i - 1]):
            runs.append([])
        if m:
            runs[-1].append(t)
    return [tokenizer.decode(r) for r in runs]


# --- jsonl formats ------------------------------------------------------------------------------------------------


def test_text_sample_trains_every_token(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello"}])
    s = only(load_dataset(path, BYTES, ctx_len=64))
    assert s.tokens == b("hello")  # bytes has no end-of-document id
    assert s.mask == [1] * 5
    assert s.source == f"{path}:1"


def test_text_sample_gets_eod_when_the_tokenizer_has_one(tmp_path):
    world = get_tokenizer("world")
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello world"}])
    s = only(load_dataset(path, world, ctx_len=64))
    assert s.tokens == world.encode("hello world") + [0]
    assert s.mask == [1] * len(s.tokens)


def test_messages_render_in_world_chat_format():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "  Hi\r\nthere\n\n\nfriend  "},
        {"role": "assistant", "content": "Hello!\n\nHow can I help?"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Bye."},
    ]
    assert render_chat(messages) == (
        "System: Be brief.\n\nUser: Hi\nthere\nfriend\n\nAssistant: Hello!\nHow can I help?\n\n"
        "User: Bye\n\nAssistant: Bye.\n\n"
    )


def test_messages_mask_exactly_the_assistant_answers(tmp_path):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "See\n\nyou."},
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    s = only(load_dataset(path, BYTES, ctx_len=512))
    expected_tokens, expected_mask = [], []
    for text, trained in [("System: Be brief.\n\nUser: Hi\n\nAssistant:", 0), (" Hello!\n\n", 1),
                          ("User: Bye\n\nAssistant:", 0), (" See\nyou.\n\n", 1)]:
        expected_tokens += b(text)
        expected_mask += [trained] * len(b(text))
    assert s.tokens == expected_tokens
    assert s.mask == expected_mask
    assert trained_text(s) == [" Hello!\n\n", " See\nyou.\n\n"]


def test_messages_with_the_world_tokenizer_mask_on_token_boundaries(tmp_path):
    world = get_tokenizer("world")
    messages = [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris. 巴黎。"},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome."},
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    s = only(load_dataset(path, world, ctx_len=512, vocab_size=65536))
    assert trained_text(s, world) == [" Paris. 巴黎。\n\n", " Rome.\n\n"]
    assert world.decode(s.tokens) == render_chat(messages)
    prompt = world.encode("User: What is the capital of France?\n\nAssistant:")
    assert s.tokens[: len(prompt)] == prompt  # the prompt has the ids it gets at inference
    assert s.mask[: len(prompt)] == [0] * len(prompt)


def test_prompt_response(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "2+2?", "response": "4"}])
    s = only(load_dataset(path, BYTES, ctx_len=64))
    assert s.tokens == b("User: 2+2?\n\nAssistant: 4\n\n")
    assert s.mask == [0] * len(b("User: 2+2?\n\nAssistant:")) + [1] * len(b(" 4\n\n"))


def test_instruction_input_output(tmp_path):
    path = write_jsonl(tmp_path / "alpaca.jsonl", [
        {"instruction": "Add.", "input": "2 and 2", "output": "4"},
        {"instruction": "Greet.", "input": "", "output": "Hi"},
        {"instruction": "Greet.", "output": "Hi"},
    ])
    ds = load_dataset(path, BYTES, ctx_len=128)
    with_input, empty_input, no_input = ds[0], ds[1], ds[2]
    prompt = "Instruction: Add.\n\nInput: 2 and 2\n\nResponse:"
    assert with_input.tokens == b(prompt + " 4\n\n")
    assert with_input.mask == [0] * len(b(prompt)) + [1] * 4
    assert empty_input.tokens == no_input.tokens == b("Instruction: Greet.\n\nResponse: Hi\n\n")
    assert trained_text(empty_input) == [" Hi\n\n"]


def test_tokens_and_mask_used_as_given(tmp_path):
    path = write_jsonl(tmp_path / "st.jsonl", [
        {"tokens": [5, 6, 7, 8], "mask": [0, 0, 1, 1]},
        {"text": [9, 10, 11], "mask": [0, 1, 0]},
        {"tokens": [1, 2]},
    ])
    ds = load_dataset(path, BYTES, ctx_len=16)
    assert [(s.tokens, s.mask) for s in ds] == [([5, 6, 7, 8], [0, 0, 1, 1]), ([9, 10, 11], [0, 1, 0]),
                                              ([1, 2], [1, 1])]
    assert ds.n_tokens == 9
    assert ds.n_trained_tokens == 2 + 1 + 1  # the first token of a sample is never a target


def test_blank_lines_skipped_and_sources_name_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('\n{"text": "ab"}\n   \n\r\n{"text": "cd"}\r\n')
    ds = load_dataset(path, BYTES, ctx_len=8)
    assert [s.source for s in ds] == [f"{path}:2", f"{path}:5"]
    assert [s.tokens for s in ds] == [b("ab"), b("cd")]


def test_long_jsonl_samples_are_truncated_and_counted(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"text": "x" * 50},
        {"prompt": "q", "response": "a" * 40},
        {"text": "short"},
    ])
    ds = load_dataset(path, BYTES, ctx_len=24)
    assert [len(s.tokens) for s in ds] == [25, 25, 5]
    prompt = b("User: q\n\nAssistant:")
    assert ds[1].tokens == b("User: q\n\nAssistant: " + "a" * 40)[:25]
    assert ds[1].mask == [0] * len(prompt) + [1] * (25 - len(prompt))
    assert ds.n_truncated == 2
    assert "2 cut to 25 tokens" in ds.summary()


# --- .txt and windows --------------------------------------------------------------------------------------------


def test_windows_overlap_by_one_and_drop_a_lone_last_token():
    assert windows(10, 4) == [(0, 5), (4, 5), (8, 2)]
    assert windows(9, 4) == [(0, 5), (4, 5)]  # a final window of 1 token would train nothing
    assert windows(5, 4) == [(0, 5)]
    assert windows(3, 4) == [(0, 3)]
    assert windows(1, 4) == []


def test_txt_is_one_document_cut_into_windows(tmp_path):
    text = "abcdefghijklmnopqrstuvwxyz"
    path = tmp_path / "notes.txt"
    path.write_text(text)
    ds = load_dataset(path, BYTES, ctx_len=8)
    assert [s.tokens for s in ds] == [b(text[0:9]), b(text[8:17]), b(text[16:25]), b(text[24:26])]
    assert all(s.mask == [1] * len(s.tokens) for s in ds)
    assert [s.source for s in ds] == [f"{path}#{k}" for k in (1, 2, 3, 4)]
    assert ds.n_trained_tokens == len(text) - 1  # every token after the first is a target exactly once
    assert ds.n_tokens == 26 + 3


def test_txt_with_world_appends_eod(tmp_path):
    world = get_tokenizer("world")
    path = tmp_path / "notes.txt"
    path.write_text("A short story.")
    s = only(load_dataset(path, world, ctx_len=64))
    assert s.tokens == world.encode("A short story.") + [0]


# --- binidx ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_binidx_round_trip(tmp_path, dtype):
    docs = [list(range(1, 12)), [40000 if dtype == np.uint16 else 70000, 7], [3], list(range(100, 104))]
    bin_path, idx_path = write_binidx(tmp_path / "corpus", docs, dtype=dtype)
    assert (bin_path.name, idx_path.name) == ("corpus.bin", "corpus.idx")
    assert bin_path.stat().st_size == 18 * np.dtype(dtype).itemsize
    header = idx_path.read_bytes()[:34]
    assert header[:9] == b"MMIDIDX\x00\x00"
    assert struct.unpack("<QBQQ", header[9:]) == (1, 8 if dtype == np.uint16 else 4, 4, 5)
    for given in ("corpus.bin", "corpus.idx", "corpus"):  # either file, or RWKV-LM's prefix
        ds = load_dataset(tmp_path / given, BYTES, ctx_len=4, vocab_size=100_000)
        assert [s.tokens for s in ds] == [[1, 2, 3, 4, 5], [5, 6, 7, 8, 9], [9, 10, 11], docs[1],
                                          [100, 101, 102, 103]]  # the 1-token document trains nothing: skipped
        assert [s.source for s in ds][:4] == [f"{bin_path}#doc0#1", f"{bin_path}#doc0#2", f"{bin_path}#doc0#3",
                                              f"{bin_path}#doc1"]
        assert ds[-1].source == f"{bin_path}#doc3"
        assert all(s.mask == [1] * len(s.tokens) for s in ds)
        assert ds.paths == [idx_path, bin_path]
    expected = hashlib.sha256(idx_path.read_bytes() + bin_path.read_bytes()).hexdigest()
    assert ds.sha256 == expected


def test_binidx_counts_come_from_the_index_and_tokens_are_read_lazily(tmp_path, monkeypatch):
    docs = [list(range(1, 30)), list(range(1, 6))]
    write_binidx(tmp_path / "c", docs)
    opened = []
    real_memmap = np.memmap

    def counting_memmap(*args, **kwargs):
        opened.append(args[0])
        return real_memmap(*args, **kwargs)

    monkeypatch.setattr(data_module.np, "memmap", counting_memmap)
    ds = load_dataset(tmp_path / "c.bin", BYTES, ctx_len=8, vocab_size=65536)  # uint16 ids: no id check to map
    assert opened == []  # nothing read from the .bin yet
    assert len(ds) == 4 + 1
    assert ds.n_trained_tokens == 28 + 4
    assert ds.n_tokens == (28 + 4) + (4 + 1)
    assert sum(s.n_trained for s in ds) == ds.n_trained_tokens
    assert ds[2].tokens == list(range(17, 26))
    assert ds[-1].tokens == [1, 2, 3, 4, 5]
    assert len(opened) == 1  # one memory map, opened on first access


def test_binidx_token_out_of_vocab_is_reported_when_loaded(tmp_path):
    write_binidx(tmp_path / "c", [[1, 2, 3], [4, 300, 5]])
    with pytest.raises(StateHubError, match=rf"^{tmp_path / 'c.bin'}: document 1, token 1: token id 300 .*256"):
        load_dataset(tmp_path / "c.bin", BYTES, ctx_len=8)


def test_binidx_survives_pickling_for_dataloader_workers(tmp_path):
    import pickle

    write_binidx(tmp_path / "c", [[1, 2, 3, 4]])
    ds = load_dataset(tmp_path / "c.bin", BYTES, ctx_len=8)
    assert ds[0].tokens == [1, 2, 3, 4]
    clone = pickle.loads(pickle.dumps(ds))  # our own object, in memory: the test's pickle, not the user's data
    assert clone[0].tokens == [1, 2, 3, 4]


def test_write_binidx_refuses_ids_that_do_not_fit(tmp_path):
    with pytest.raises(StateHubError, match="document 1: token ids 0..70000 do not fit uint16"):
        write_binidx(tmp_path / "c", [[1], [0, 70000]])
    assert not (tmp_path / "c.bin").exists()
    with pytest.raises(ValueError, match="cannot store float32"):
        write_binidx(tmp_path / "c", [[1]], dtype=np.float32)


# --- several files -------------------------------------------------------------------------------------------------


def test_directory_loads_supported_files_sorted_and_hashes_them_in_order(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "b.jsonl", [{"text": "bb"}])
    (folder / "a.txt").write_text("aa")
    write_binidx(folder / "c", [[1, 2, 3]])
    (folder / "README.md").write_text("ignored")
    ds = load_dataset(folder, BYTES, ctx_len=8)
    assert [s.tokens for s in ds] == [b("aa"), b("bb"), [1, 2, 3]]
    files = [folder / "a.txt", folder / "b.jsonl", folder / "c.idx", folder / "c.bin"]
    assert ds.paths == files
    assert ds.sha256 == hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()
    assert ds.n_tokens == 7 and ds.n_trained_tokens == 4
    assert len(load_dataset([folder / "a.txt", folder / "b.jsonl"], BYTES, ctx_len=8)) == 2


# --- collate ----------------------------------------------------------------------------------------------------


def test_collate_pads_and_masks():
    long = Sample([10, 11, 12, 13, 14], [0, 0, 1, 1, 1], "a")
    short = Sample([20, 21, 22], [1, 0, 1], "b")
    batch = collate([long, short])
    assert batch.inputs.dtype == batch.targets.dtype == torch.long
    assert batch.loss_mask.dtype == torch.float32 and batch.mask.dtype == torch.bool
    assert batch.inputs.tolist() == [[10, 11, 12, 13], [20, 21, 0, 0]]
    assert batch.targets.tolist() == [[11, 12, 13, 14], [21, 22, 0, 0]]
    assert batch.loss_mask.tolist() == [[0, 1, 1, 1], [0, 1, 0, 0]]
    assert batch.mask.tolist() == [[True] * 4, [True, True, False, False]]
    assert batch.n_trained == 4
    moved = batch.to("cpu")
    assert torch.equal(moved.loss_mask, batch.loss_mask) and moved.mask.dtype == torch.bool
    assert moved.n_trained == 4


def test_collate_of_loaded_samples(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "a", "response": "b"}, {"text": "xyz"}])
    ds = load_dataset(path, BYTES, ctx_len=64)
    batch = collate(list(ds))
    assert batch.inputs.shape == (2, len(b("User: a\n\nAssistant: b\n\n")) - 1)
    assert batch.n_trained == ds.n_trained_tokens == len(" b\n\n") + 2


# --- errors -----------------------------------------------------------------------------------------------------


def one_line_error(path, *, ctx_len=64, tokenizer=BYTES, vocab_size=None) -> str:
    with pytest.raises(StateHubError) as err:
        load_dataset(path, tokenizer, ctx_len=ctx_len, vocab_size=vocab_size)
    message = str(err.value)
    assert "\n" not in message
    return message


GOOD = {"text": "fine"}


@pytest.mark.parametrize(("line", "expected"), [
    ('{"text": "a"', "bad JSON: Expecting ',' delimiter at column 13"),
    ("[1, 2]", "expected a JSON object, found a list"),
    ('"just text"', "expected a JSON object, found a string"),
    ('{"question": "q", "answer": "a"}', 'unrecognised sample ("question", "answer"); accepted: {"text": str}'),
    ('{"text": 5}', '"text" must be a string (or a list of token ids with "mask"), found a number'),
    ('{"messages": "hi"}', '"messages" must be a list, found a string'),
    ('{"messages": ["hi"]}', "messages[0] must be an object with role and content, found a string"),
    ('{"messages": [{"role": "bot", "content": "x"}]}', "messages[0]: role must be one of system, user, "
                                                        "assistant, found 'bot'"),
    ('{"messages": [{"role": ["user"], "content": "x"}]}', "messages[0]: role must be one of system, user, "
                                                           "assistant, found a list"),  # was a TypeError
    ('{"messages": [{"role": "user", "content": 3}]}', 'messages[0]: "content" must be a string, found a number'),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant turn, nothing to train on"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " \\n\\n "}]}',
     "messages[1]: the assistant turn is empty, nothing to train on"),
    ('{"prompt": "q"}', 'missing "response"'),
    ('{"prompt": "q", "response": ["a"]}', '"response" must be a string, found a list'),
    ('{"prompt": "q", "response": "  "}', '"response" is empty, nothing to train on'),
    ('{"instruction": "i", "output": ""}', '"output" is empty, nothing to train on'),
    ('{"tokens": [1, 2, 3], "mask": [1, 1]}', '"tokens" has 3 ids but "mask" has 2 values'),
    ('{"tokens": [1, 2], "mask": [1, 2]}', '"mask" values must be 0 or 1, found 2'),
    ('{"tokens": [1, "2"], "mask": [1, 1]}', '"tokens" must be a list of integer token ids'),
    ('{"tokens": [1, 256], "mask": [1, 1]}', "token id 256 is outside the vocabulary (vocab size 256)"),
    ('{"tokens": [-1, 2], "mask": [1, 1]}', "token id -1 is outside the vocabulary (vocab size 256)"),
    ('{"tokens": [1, 2, 3], "mask": [1, 0, 0]}', "nothing to train on: no token after the first has mask 1"),
    ('{"text": "x"}', "nothing to train on"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, line, expected):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + line + "\n")
    message = one_line_error(path)
    assert message.startswith(f"{path}:3: "), message
    assert expected in message, message


def test_error_for_an_answer_beyond_ctx_len(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q" * 40, "response": "a"}])
    assert one_line_error(path, ctx_len=16) == (f"{path}:1: nothing to train on within its first 17 tokens "
                                                "(ctx_len 16): no token after the first has mask 1")


def test_error_for_a_world_token_id_beyond_the_model(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"tokens": [1, 70000], "mask": [0, 1]}])
    message = one_line_error(path, tokenizer=get_tokenizer("world"), vocab_size=65536)
    assert message == f"{path}:1: token id 70000 is outside the vocabulary (vocab size 65536)"


def test_error_for_invalid_utf8(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    assert one_line_error(path).startswith(f"{path}:2: not UTF-8 text")
    txt = tmp_path / "d.txt"
    txt.write_bytes(b"line one\nline \xfe two")
    assert one_line_error(txt) == f"{txt}:2: not UTF-8 text (byte 6 of the line)"


def test_json_files_are_json_lines(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n{"text": "a"}\n]\n')
    assert one_line_error(path).startswith(f"{path}:1: bad JSON: ")
    assert "write one object per line: JSON Lines" in one_line_error(path)
    path.write_text('{"text": "ab"}\n{"text": "cd"}\n')
    assert [s.tokens for s in load_dataset(path, BYTES, ctx_len=8)] == [b("ab"), b("cd")]


@pytest.mark.parametrize(("name", "content", "expected"), [
    ("empty.jsonl", "", "empty file"),
    ("blank.jsonl", "\n  \n", "empty file"),
    ("empty.txt", "", "empty file"),
    ("spaces.txt", " \n ", "empty file"),
    ("one.txt", "x", "nothing to train on (a single token)"),
    ("data.csv", "a,b", "unsupported file type '.csv'; expected .jsonl, .json, .txt, or a .bin + .idx pair"),
])
def test_file_errors(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_text(content)
    assert one_line_error(path) == f"{path}: {expected}"


def test_missing_paths(tmp_path):
    missing = tmp_path / "nope.jsonl"
    assert one_line_error(missing) == f"{missing}: no such file or directory"
    write_binidx(tmp_path / "c", [[1, 2]])
    (tmp_path / "c.idx").unlink()
    assert one_line_error(tmp_path / "c.bin") == f"{tmp_path / 'c.bin'}: a binidx dataset needs both files; " \
                                                 "c.idx is missing"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert one_line_error(empty).startswith(f"{empty}: no data files in this folder")
    with pytest.raises(InvalidOptionError, match=r"no data given \(data: files, folders or a list of records\)"):
        load_dataset([], BYTES, ctx_len=8)


def test_records_read_exactly_as_the_same_jsonl_lines(tmp_path):
    """A notebook's list of dicts gives the very samples (tokens, masks, truncation) the same lines of a
    .jsonl file give, and a bad record is named by its index."""
    records = [{"text": "plain text"}, {"prompt": "Q?", "response": "A."},
               {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello " * 20}]}]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    from_file, from_records = load_dataset(path, BYTES, ctx_len=64), load_dataset(records, BYTES, ctx_len=64)
    assert [(s.tokens, s.mask) for s in from_records] == [(s.tokens, s.mask) for s in from_file]
    assert from_records.n_truncated == from_file.n_truncated == 1
    assert len(from_records.sha256) == 64 and from_records.sha256 == load_dataset(records, BYTES, 64).sha256
    assert from_records.sha256 != load_dataset(records[:2], BYTES, 64).sha256
    with pytest.raises(InvalidDataError, match=r"^data\[1\]: \"response\" is empty"):
        load_dataset([records[0], {"prompt": "Q?", "response": ""}], BYTES, ctx_len=64)
    with pytest.raises(InvalidOptionError, match="expected paths or a list of dicts, found a int"):
        load_dataset([path, 3], BYTES, ctx_len=64)


def test_binidx_errors(tmp_path):
    _, idx = write_binidx(tmp_path / "c", [[1, 2, 3]])
    good = idx.read_bytes()
    idx.write_bytes(b"NOTMAGIC!" + good[9:])
    assert one_line_error(idx).startswith(f"{idx}: not a binidx index (bad magic")
    idx.write_bytes(good[:17] + bytes([6]) + good[18:])
    assert one_line_error(idx) == f"{idx}: unsupported token dtype code 6 (float64: token ids must be integers)"
    idx.write_bytes(good[:40])
    assert one_line_error(idx).startswith(f"{idx}: truncated index")
    idx.write_bytes(good)
    (tmp_path / "c.bin").write_bytes(b"\x01\x00")
    assert "does not match its index" in one_line_error(idx)
    write_binidx(tmp_path / "short", [[1], []])
    assert one_line_error(tmp_path / "short.bin").endswith("no samples: every document is shorter than 2 tokens")
    write_binidx(tmp_path / "none", [])
    assert one_line_error(tmp_path / "none.idx").endswith("no samples: the index lists no documents")


def test_ctx_len_must_be_positive(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD])
    assert one_line_error(path, ctx_len=0) == "ctx_len=0: must be at least 1"

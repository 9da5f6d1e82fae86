"""Tokenizers: World (as the rwkv pip package runs it), byte vocabularies, Hugging Face tokenizer.json."""

from __future__ import annotations

import contextvars
import subprocess
import sys
from pathlib import Path

import pytest
import rwkv
from hypothesis import given, settings
from hypothesis import strategies as st
from rwkv.rwkv_tokenizer import TRIE_TOKENIZER
from tokenizers import Tokenizer as HFTokenizerLib
from tokenizers import decoders, models, pre_tokenizers, trainers

from rwkv_state_hub import tokenizer as tokenizer_module
from rwkv_state_hub.checkpoint import ModelSpec
from rwkv_state_hub.errors import StateHubError, TokenizerError, speak_cli
from rwkv_state_hub.tokenizer import get_tokenizer, release_world_vocab

MIXED = "Hello, world! 你好，世界。 Emoji: 😀🚀 and\ttabs\n\nnew paragraph ÄÖÜ"


def spec(vocab_size: int) -> ModelSpec:
    return ModelSpec(arch="v7", n_layer=2, n_embd=64, n_head=1, head_size=64, n_ffn=256, vocab_size=vocab_size,
                     path="/models/tiny-model.pth")


@pytest.fixture(scope="module")
def pip_world() -> TRIE_TOKENIZER:
    """The rwkv pip package's own tokenizer, built the way its PIPELINE builds it."""
    return TRIE_TOKENIZER(str(Path(rwkv.__file__).parent / "rwkv_vocab_v20230424.txt"))


@pytest.fixture
def hf_file(tmp_path) -> Path:
    """A tiny byte-level BPE tokenizer.json trained here, with <|endoftext|> as a special token."""
    tok = HFTokenizerLib(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["the cat sat on the mat", "the dog ate the cat food", "hello there"], trainer)
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path


# --- World ----------------------------------------------------------------------------------------------------


def test_world_round_trips_english_chinese_emoji():
    tok = get_tokenizer("world")
    assert (tok.name, tok.vocab_size, tok.eod) == ("world", 65536, 0)
    ids = tok.encode(MIXED)
    assert tok.decode(ids) == MIXED
    assert len(ids) < len(MIXED.encode())  # real merges, not one token per byte


def test_world_matches_the_pip_tokenizer(pip_world):
    tok = get_tokenizer("world")
    prompt = "User: hi\n\nAssistant:"
    assert tok.encode(prompt) == pip_world.encode(prompt) == [24281, 59, 4571, 261, 5585, 41693, 59]
    assert tok.encode(MIXED) == pip_world.encode(MIXED)


def test_world_is_built_once_and_read_again_once_released():
    first = tokenizer_module._world_vocab()
    tok = get_tokenizer("world")
    assert tokenizer_module._world_vocab() is first
    release_world_vocab()
    assert tok.encode("User: hi") == [24281, 59, 4571]  # read again on use
    assert tokenizer_module._world_vocab() is not first


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(1, 65529), min_size=1, max_size=40), st.binary(max_size=40), st.text(max_size=60))
def test_world_matches_pip_on_runs_of_its_own_tokens_and_any_bytes(pip_world, ids, noise, text):
    """The longest match, stressed: the vocabulary's own tokens run together, then any bytes (UTF-8 broken
    anywhere, as a cut prompt can be) and any text, whole and cut at an odd place."""
    src = b"".join(pip_world.idx2token.get(i, b"") for i in ids) + noise + text.encode("utf-8")
    assert tokenizer_module._world_vocab().encode(src) == pip_world.encodeBytes(src)
    cut = src[len(src) // 3 :]
    assert tokenizer_module._world_vocab().encode(cut) == pip_world.encodeBytes(cut)


def test_world_tokenizer_takes_a_few_mb_not_hundreds():
    """Measured in a fresh process: the pip package's trie took ~295 MB of RSS; our table must stay small."""
    code = ("from rwkv_state_hub.model.memory import rss_bytes; a = rss_bytes(); "
            "from rwkv_state_hub.tokenizer import get_tokenizer; t = get_tokenizer('world'); "
            "assert t.encode('hello world') == [34550, 40213]; print((rss_bytes() - a) >> 20)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout) < 60, f"the World tokenizer took {r.stdout.strip()} MiB"


def test_world_decode_of_eod_and_cut_characters():
    tok = get_tokenizer("world")
    ids = tok.encode("ok")
    assert tok.decode(ids + [0]) == "ok"  # the end-of-document id has no text
    emoji = tok.encode("😀")
    partial = tokenizer_module._world_vocab().encode("😀".encode()[:2])
    assert tok.decode(partial) == "\ufffd"  # a cut character is replaced, not an exception
    assert tok.decode(emoji) == "😀"
    with pytest.raises(ValueError, match="outside the World vocabulary"):
        tok.decode([65536])


# --- byte vocabularies -----------------------------------------------------------------------------------------


def test_bytes_round_trip_and_ids():
    tok = get_tokenizer("bytes")
    assert (tok.name, tok.vocab_size, tok.eod) == ("bytes", 256, None)
    assert tok.encode("hé") == [104, 0xC3, 0xA9]
    assert tok.decode(tok.encode(MIXED)) == MIXED
    assert tok.decode([0xC3]) == "\ufffd"  # errors="replace"
    assert get_tokenizer("utf-8").name == "bytes"


def test_utf16le_round_trip_and_ids():
    tok = get_tokenizer("utf-16-le")
    assert (tok.name, tok.vocab_size, tok.eod) == ("utf-16-le", 256, None)
    assert tok.encode("Hi") == [72, 0, 105, 0]
    assert tok.decode(tok.encode(MIXED)) == MIXED
    assert tok.decode([72, 0, 105]) == "H\ufffd"


# --- choosing from the model ------------------------------------------------------------------------------------


def test_auto_choice_from_the_model_vocabulary():
    assert get_tokenizer(None, spec(65536)).name == "world"
    assert get_tokenizer(spec=spec(256)).name == "bytes"
    with pytest.raises(TokenizerError, match=r"tiny-model has a vocabulary of 320 tokens.*; pass tokenizer \("):
        get_tokenizer(None, spec(320))
    with pytest.raises(TokenizerError, match="no tokenizer named and no model"):
        get_tokenizer()


def test_messages_name_the_flag_on_the_command_line():
    def as_the_cli(*args):
        speak_cli()
        return get_tokenizer(*args)

    with pytest.raises(TokenizerError, match=r"320 tokens.*; pass --tokenizer \("):
        contextvars.copy_context().run(as_the_cli, None, spec(320))
    with pytest.raises(TokenizerError, match="^--tokenizer wrold: unknown tokenizer"):
        contextvars.copy_context().run(as_the_cli, "wrold")


def test_a_tokenizer_larger_than_the_model_is_refused():
    with pytest.raises(StateHubError, match="^tokenizer world has 65536 tokens but model tiny-model has 256$"):
        get_tokenizer("world", spec(256))
    assert get_tokenizer("utf-16-le", spec(256)).name == "utf-16-le"
    assert get_tokenizer("bytes", spec(65536)).name == "bytes"  # a smaller vocabulary fits


def test_unknown_name():
    with pytest.raises(TokenizerError, match="^tokenizer='wrold': unknown tokenizer.*world, bytes, utf-16-le"):
        get_tokenizer("wrold")


# --- Hugging Face tokenizer.json --------------------------------------------------------------------------------


def test_hf_tokenizer_json(hf_file):
    tok = get_tokenizer(str(hf_file))
    reference = HFTokenizerLib.from_file(str(hf_file))
    assert tok.name == f"hf:{hf_file}"
    assert tok.vocab_size == reference.get_vocab_size(with_added_tokens=True)
    assert tok.eod == reference.token_to_id("<|endoftext|>") == 1
    text = "the cat ate the food, hello!"
    ids = tok.encode(text)
    assert ids == reference.encode(text, add_special_tokens=False).ids
    assert len(ids) < len(text)  # merges learned from the sentences above are used
    assert tok.decode(ids) == text
    assert get_tokenizer(f"hf:{hf_file}").eod == 1
    assert get_tokenizer(str(hf_file.parent)).vocab_size == tok.vocab_size  # a folder holding tokenizer.json


def test_hf_tokenizer_without_eos_has_no_eod(tmp_path):
    tok = HFTokenizerLib(models.WordLevel({"hello": 0, "world": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["[PAD]"])
    path = tmp_path / "words.json"
    tok.save(str(path))
    loaded = get_tokenizer(str(path))
    assert loaded.eod is None
    assert loaded.encode("hello world") == [0, 1]
    assert loaded.vocab_size == 4


def test_hf_tokenizer_vocab_larger_than_model(hf_file):
    with pytest.raises(StateHubError, match=rf"^tokenizer hf:{hf_file} has \d+ tokens but model tiny-model has 256$"):
        get_tokenizer(str(hf_file), spec(256))


def test_hf_invalid_and_missing_files(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"not": "a tokenizer"}')
    with pytest.raises(StateHubError) as err:
        get_tokenizer(str(bad))
    assert str(err.value).startswith(f"{bad}: not a valid tokenizer.json (")
    assert "\n" not in str(err.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(StateHubError, match=f"^{empty / 'tokenizer.json'}: no such tokenizer file$"):
        get_tokenizer(str(empty))  # a folder without a tokenizer.json

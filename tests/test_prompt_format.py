"""One prompt format for training and for generation: a conversation rendered for training (through the real
data loader) equals, byte for byte and token for token, what generation sends before each reply plus the reply
the state is taught to write, for every mix of roles, line endings and blank lines."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rwkv_state_hub.chat import Conversation
from rwkv_state_hub.data import load_dataset
from rwkv_state_hub.prompt_format import (
    TURN_END,
    answer_prompt,
    clean_turn,
    render_chat,
    reply,
    turn,
    turn_prompt,
)
from rwkv_state_hub.tokenizer import get_tokenizer

TOKENIZERS = {"bytes": get_tokenizer("bytes"), "world": get_tokenizer("world")}
VOCAB = {"bytes": 256, "world": 65536}
# contents that have made templates drift: blank lines (with spaces, tabs, \r\n), edge whitespace, a lone \r,
# a line that only looks like a turn, text the World tokenizer merges across the template's own characters
CONTENTS = ["Hi", "  two\nlines  ", "para one\n\n\npara two", "a\r\n\r\nb\r\n", " \t\n x \n\t \n y", "old\rmac",
            "User: not a turn", "巴黎。\n \n東京", "ends with colon:", "tab\tin\tline"]
TEXT = st.text(st.sampled_from(["a", "B", " ", "\t", "\n", "\r", ":", "é", "中", "\x0b", "\u2028"]), max_size=14)


def sent_by_generation(messages: list[dict]) -> list[tuple[str, bool]]:
    """What a chat that carries its state sends (False) before each reply, and the reply it should write (True):
    the turns since the last reply go in one prompt, then the reply continues the state."""
    pieces, pending, last = [], [], None
    for m in messages:
        if m["role"] != "assistant":
            pending.append(m)
            continue
        pieces += [(answer_prompt(pending, last), False), (reply(m["content"]), True)]
        pending, last = [], pieces[-1][0]
    if pending:
        pieces.append(("".join(turn(m["role"], m["content"]) for m in pending), False))
    return pieces


def trainable(messages: list[dict]) -> bool:
    """What the data loader accepts: an assistant turn, and none of them blank."""
    answers = [m for m in messages if m["role"] == "assistant"]
    return bool(answers) and all(clean_turn(m["content"]) for m in answers)


def expected_sample(messages: list[dict], tokenizer) -> tuple[list[int], list[int]]:
    tokens, mask = [], []
    for text, trained in sent_by_generation(messages):
        ids = tokenizer.encode(text)
        tokens += ids
        mask += [int(trained)] * len(ids)
    return tokens, mask


def assert_trained_as_generated(conversations: list[list[dict]], tmp_path: Path) -> None:
    """Write the conversations as training data, load them with each tokenizer, and compare every sample with
    what generation sends; the rendered text too."""
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in conversations), encoding="utf-8")
    for name, tokenizer in TOKENIZERS.items():
        data = load_dataset(path, tokenizer, ctx_len=1 << 16, vocab_size=VOCAB[name])
        assert len(data) == len(conversations)
        for sample, messages in zip(data, conversations, strict=True):
            assert "".join(text for text, _ in sent_by_generation(messages)) == render_chat(messages)
            assert (sample.tokens, sample.mask) == expected_sample(messages, tokenizer), (name, messages)


def test_every_mix_of_up_to_four_roles(tmp_path):
    """Every sequence of system, user and assistant turns up to four long that trains something, with tricky
    contents rotated through the turns."""
    contents = itertools.cycle(CONTENTS)
    conversations = []
    for n in range(1, 5):
        for roles in itertools.product(("system", "user", "assistant"), repeat=n):
            messages = [{"role": r, "content": next(contents)} for r in roles]
            if trainable(messages):
                conversations.append(messages)
    assert len(conversations) > 60
    assert_trained_as_generated(conversations, tmp_path)


@settings(max_examples=150, derandomize=True, deadline=None, database=None)
@given(turns=st.lists(st.tuples(st.sampled_from(["system", "user", "assistant"]), TEXT), min_size=1, max_size=6))
def test_any_conversation(tmp_path_factory, turns):
    messages = [{"role": r, "content": c} for r, c in turns]
    if not trainable(messages):
        return
    assert_trained_as_generated([messages], tmp_path_factory.mktemp("chat"))


@settings(max_examples=300, derandomize=True, deadline=None, database=None)
@given(text=TEXT)
def test_a_cleaned_turn_cannot_end_early(text):
    """No blank line inside, no \\r, nothing at the edges for the template to double; cleaning twice changes
    nothing; every character that is not a line ending or space is kept, in order."""
    cleaned = clean_turn(text)
    assert "\r" not in cleaned and cleaned == cleaned.strip() and clean_turn(cleaned) == cleaned
    assert TURN_END not in cleaned and not any(line.strip() == "" for line in cleaned.split("\n")[1:-1])
    assert "".join(cleaned.split()) == "".join(text.split())


class ScriptedRunner:
    """Stands in for the pip model: records what a Conversation feeds, and 'generates' a scripted reply."""

    def __init__(self, replies: list[str]) -> None:
        self.fed: list[str] = []
        self.replies = iter(replies)

    def initial(self, state):
        return []

    def feed(self, text, state):
        self.fed.append(text)
        return None, state

    def stream(self, logits, state, sampling, stop=None):
        text = next(self.replies)
        for i in range(1, len(text) + 1):
            yield text[:i], state
            if stop and stop in text[:i]:
                return


def test_the_demo_chat_sends_what_training_rendered():
    """The demo's Conversation, fed user turns, sends exactly the untrained pieces of the same conversation
    rendered for training, and its transcript is the training text."""
    messages = [{"role": r, "content": c} for r, c in
                zip(itertools.cycle(["user", "assistant"]), CONTENTS, strict=False)]
    pieces = sent_by_generation(messages)
    runner = ScriptedRunner([text for text, trained in pieces if trained])
    conv = Conversation()
    for m in messages[0::2]:
        list(conv.turn(runner, None, m["content"]))
    assert runner.fed == [text for text, trained in pieces if not trained]
    assert conv.transcript == render_chat(messages)


@pytest.mark.parametrize("after,expected", [(None, "User: hi\n\nAssistant:"), (" ok\n\n", "User: hi\n\nAssistant:"),
                                            (" cut off", "\n\nUser: hi\n\nAssistant:")])
def test_a_reply_cut_off_gets_its_blank_line_before_the_next_turn(after, expected):
    assert turn_prompt(" hi \r\n", after) == expected

"""Text from the `rwkv` pip package token by token, and conversations that carry their own recurrent state.
The logic behind the demo page, with no UI in it; the sampler is generate's, the chat template prompt_format's.

A chat turn feeds only the new words (`User: ...\\n\\nAssistant:`) into the state the conversation was left
in, never the history again: that is what an RNN is for, and what makes a long chat cost the same per turn.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .checkpoint import ModelSpec
from .errors import InvalidOptionError, option
from .generate import DEFAULT_SAMPLING, Sampler, Sampling
from .pip_bridge import pip_state
from .prompt_format import TURN_END, clean_turn, turn_prompt
from .state import State
from .tokenizer import Tokenizer

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_strategy(strategy: str) -> tuple[str, torch.dtype]:
    """'cpu fp32' -> ('cpu', float32): the device and activation dtype of a one-device pip strategy."""
    parts = strategy.split()
    if len(parts) != 2 or parts[1] not in _DTYPES:
        raise InvalidOptionError(f"{option('strategy', strategy)}: expected one device and one dtype, e.g. "
                                 "'cpu fp32' or 'cuda fp16'")
    return parts[0], _DTYPES[parts[1]]


class PipRunner:
    """A loaded pip model and its tokenizer. Shared read-only between sessions: every call works on a copy
    of the state list it is given (pip's forward writes into the list it gets)."""

    def __init__(self, pip_model, tokenizer: Tokenizer, spec: ModelSpec, strategy: str = "cpu fp32") -> None:
        self.model = pip_model
        self.tokenizer = tokenizer
        self.spec = spec
        self.device, self.dtype = parse_strategy(strategy)

    def initial(self, state: State | None) -> list[Tensor]:
        """A fresh pip state list: the given state, or the zero state of the base model."""
        return pip_state(state if state is not None else State.zeros(self.spec, full_state=True),
                         self.spec.arch, self.dtype, self.device)

    def feed(self, text: str, state: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """Read `text` into (a copy of) `state`: the logits after its last token, and the new state."""
        tokens = self.tokenizer.encode(text)
        if not tokens:
            raise InvalidOptionError("the prompt is empty: a model reads one token before it predicts one")
        logits, state = self.model.forward(tokens, [t.clone() for t in state])
        return logits, state

    def stream(self, logits: Tensor, state: list[Tensor], sampling: Sampling = DEFAULT_SAMPLING,
               stop: str | None = None) -> Iterator[tuple[str, list[Tensor]]]:
        """Yield (text so far, state after it) after each token, up to max_tokens, the end-of-document token
        or `stop`. Every token produced is also read into the state, so the state always holds the text."""
        sample = Sampler(sampling)
        state = [t.clone() for t in state]
        out: list[int] = []
        eod = self.tokenizer.eod
        for _ in range(sampling.max_tokens):
            token = sample(logits)
            if eod is not None and token == eod:
                return
            out.append(token)
            logits, state = self.model.forward([token], state)
            text = self.tokenizer.decode(out)
            yield text, state
            if stop and stop in text:
                return

    def complete(self, prompt: str, state: State | None,
                 sampling: Sampling = DEFAULT_SAMPLING) -> Iterator[str]:
        """Continue `prompt` from `state` (None: the base model): the new text after each token."""
        logits, st = self.feed(prompt, self.initial(state))
        yield ""
        for text, _ in self.stream(logits, st, sampling):
            yield text


@dataclass
class Conversation:
    """One column of one chat: the recurrent state after everything said so far, and that text itself."""

    state: list[Tensor] | None = None
    transcript: str = ""
    last_reply: str | None = field(default=None, repr=False)  # raw, as generated (stop included)

    def turn(self, runner: PipRunner, initial: State | None, message: str,
             sampling: Sampling = DEFAULT_SAMPLING) -> Iterator[str]:
        """Feed the new user turn into this conversation's state and stream the reply (up to the blank line
        that ends it); the state keeps the reply, and the next turn continues from there."""
        if not clean_turn(message):
            raise InvalidOptionError("the message is empty")
        prompt = turn_prompt(message, self.last_reply)
        start = self.state if self.state is not None else runner.initial(initial)
        logits, state = runner.feed(prompt, start)
        self.state, self.transcript, self.last_reply = state, self.transcript + prompt, ""
        text = ""
        for text, after in runner.stream(logits, state, sampling, stop=TURN_END):
            self.state = after
            yield text.split(TURN_END)[0]
        self.transcript += text
        self.last_reply = text


def side_by_side(left: Iterator[str], right: Iterator[str]) -> Iterator[tuple[str, str]]:
    """Advance two streams one step each in turn, yielding both texts so far, until both are done."""
    streams, texts, live = (left, right), ["", ""], [True, True]
    while any(live):
        for i, stream in enumerate(streams):
            if live[i]:
                text = next(stream, None)
                if text is None:
                    live[i] = False
                else:
                    texts[i] = text
        yield texts[0], texts[1]

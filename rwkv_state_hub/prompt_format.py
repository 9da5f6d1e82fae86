"""The prompt formats, in one place: what a state is trained on and what it is later given are built by the
same functions, so the two cannot drift apart.

World chat format: each turn is `Role: content` followed by a blank line; a blank line ends a turn, so none may
appear inside one. The model is given everything up to `Assistant:` and writes ` answer\\n\\n` itself:

    System: Be brief.\\n\\nUser: Hi\\n\\nAssistant: Hello!\\n\\nUser: Bye\\n\\nAssistant: Bye.\\n\\n

Training renders a conversation as (text, trained) pieces with `chat_segments`: each untrained piece is exactly
the `answer_prompt` that generation sends before the reply that follows it (tests/test_prompt_format.py checks this
for every mix of roles, byte for byte and token for token).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
TURN_END = "\n\n"  # the blank line that ends every turn
ANSWER = "Assistant:"  # what the model is given before it answers
_BLANK_LINES = re.compile(r"\n\s*\n")  # a line break, any blank lines after it, and the next line break

Message = Mapping[str, str]  # {"role": one of ROLES, "content": text}, as in data files and chat APIs


def clean_turn(text: str) -> str:
    """One turn's text as the format needs it: line endings as \\n (\\r\\n and a lone \\r too), no blank line
    inside (it would end the turn early), no whitespace at either end (the template adds its own)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").strip()
    return _BLANK_LINES.sub("\n", text)


def turn(role: str, content: str) -> str:
    """One finished turn: `Role: content\\n\\n`."""
    return f"{ROLES[role]}: {clean_turn(content)}{TURN_END}"


def reply(content: str) -> str:
    """What the model writes after `Assistant:`, and what training teaches it to write: ` content\\n\\n`."""
    return f" {clean_turn(content)}{TURN_END}"


def answer_prompt(messages: Sequence[Message], after_reply: str | None = None) -> str:
    """What generation sends before the next reply: the turns not yet read (system, user), then `Assistant:`.

    after_reply: the last reply as generated, when the state goes on from it; one cut off before its blank
    line (max tokens reached) gets that blank line first, so the next turn starts where the format expects."""
    sep = "" if after_reply is None or after_reply.endswith(TURN_END) else TURN_END
    return sep + "".join(turn(m["role"], m["content"]) for m in messages) + ANSWER


def turn_prompt(message: str, after_reply: str | None = None) -> str:
    """One user message, as a chat feeds it into the state the conversation was left in."""
    return answer_prompt([{"role": "user", "content": message}], after_reply)


def chat_segments(messages: Sequence[Message]) -> list[tuple[str, bool]]:
    """A conversation as (text, trained) pieces: before each assistant turn, the `answer_prompt` generation sends
    (untrained); the assistant's `reply` (trained). Turns after the last reply are kept, untrained."""
    segments: list[tuple[str, bool]] = []
    pending: list[Message] = []
    for message in messages:
        if message["role"] == "assistant":
            segments += [(answer_prompt(pending), False), (reply(message["content"]), True)]
            pending = []
        else:
            pending.append(message)
    if pending:
        segments.append(("".join(turn(m["role"], m["content"]) for m in pending), False))
    return segments


def render_chat(messages: Sequence[Message]) -> str:
    """The exact text a conversation is trained on."""
    return "".join(text for text, _ in chat_segments(messages))


def instruction_segments(instruction: str, given: str, output: str) -> list[tuple[str, bool]]:
    """The Alpaca-style format: `Instruction: ...`, `Input: ...` (left out when empty), `Response:` + output."""
    given = clean_turn(given)
    text = f"Instruction: {clean_turn(instruction)}{TURN_END}" + (f"Input: {given}{TURN_END}" if given else "")
    return [(text + "Response:", False), (reply(output), True)]

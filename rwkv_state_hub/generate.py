"""Text generation from any initial state (RNN mode), to see what a state does."""

from __future__ import annotations

import torch

from .errors import StateHubError
from .model import RWKV, RecurrentState
from .state import State
from .tokenizer import Tokenizer


def sample_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """Nucleus sampling; temperature 0 is greedy, and so is one so small that the scaled logits overflow."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if not bool(torch.isfinite(probs).all()):
        return int(logits.argmax())
    sorted_probs, order = probs.sort(descending=True)
    keep = sorted_probs.cumsum(-1) - sorted_probs < top_p
    keep[0] = True  # the most likely token always stays, even with top_p <= 0
    sorted_probs = sorted_probs * keep
    return int(order[torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)])


@torch.no_grad()
def generate(
    model: RWKV,
    tokenizer: Tokenizer,
    prompt: str,
    state: State | RecurrentState | None = None,
    max_tokens: int = 100,
    temperature: float = 1.0,
    top_p: float = 0.85,
    seed: int = 0,
) -> str:
    """Continue `prompt` from `state` (a State, a RecurrentState or the zero state); returns the new text."""
    rs = state.to_recurrent() if isinstance(state, State) else state
    tokens = tokenizer.encode(prompt)
    if not tokens:
        raise StateHubError("the prompt encodes to no tokens: a model reads one token before it predicts one")
    logits, rs = model(torch.tensor([tokens]), rs)
    logits = logits[0, -1]
    g = torch.Generator().manual_seed(seed)
    out: list[int] = []
    for _ in range(max_tokens):
        token = sample_token(logits, temperature, top_p, g)
        if tokenizer.eod is not None and token == tokenizer.eod:
            break
        out.append(token)
        logits, rs = model.step(token, rs)
        logits = logits[0]
    return tokenizer.decode(out)

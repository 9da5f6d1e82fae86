"""Text generation from any initial state (RNN mode), and the one sampler behind every piece of generated text:
`rwkv-state generate`, `generate()`, the demo's completion and chat columns. One `DEFAULT_SAMPLING`, so the
same seed and settings give the same choices everywhere.

The settings (Sampling, LIMITS, DEFAULT_SAMPLING) import no torch: the CLI builds its options from them at start-up.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING

from .errors import InvalidOptionError, option

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from .model import RWKV, RecurrentState
    from .state import State
    from .tokenizer import Tokenizer

# setting -> (lowest, highest) allowed: checked by Sampling, and the bounds of the matching CLI options
LIMITS: dict[str, tuple[float, float]] = {
    "temperature": (0, 10),
    "top_p": (0, 1),
    "max_tokens": (1, 4096),
    "presence_penalty": (-5, 5),
    "frequency_penalty": (-5, 5),
    "seed": (0, 2**32 - 1),
}


@dataclass(frozen=True)
class Sampling:
    """How to pick each token. temperature 0 = greedy; top-p keeps the most likely tokens up to that
    probability; the penalties subtract presence + frequency x count from the logit of every token already
    produced in this reply (ChatRWKV's chat defaults: they keep a small model from repeating itself)."""

    temperature: float = 1.0
    top_p: float = 0.3
    max_tokens: int = 80
    presence_penalty: float = 0.3
    frequency_penalty: float = 0.3
    seed: int = 0

    def __post_init__(self) -> None:
        for name, (low, high) in LIMITS.items():
            value = getattr(self, name)
            whole = name in ("max_tokens", "seed")
            typed = isinstance(value, int if whole else int | float) and not isinstance(value, bool)
            if not typed or not low <= value <= high:
                shown = repr(value)[:40] if isinstance(value, int | float | str) else type(value).__name__
                kind = "a whole number" if whole else "a number"
                raise InvalidOptionError(f"{option(name)} {shown}: expected {kind} from {low} to {high}")

    def but(self, **changes: float) -> Sampling:
        """These settings with some changed, by name (temperature=0, max_tokens=40, ...)."""
        known = [f.name for f in fields(self)]
        unknown = sorted(set(changes) - set(known))
        if unknown:
            raise InvalidOptionError(f"{unknown[0]}: not a sampling setting; choose from {', '.join(known)}")
        return replace(self, **changes)


DEFAULT_SAMPLING = Sampling()


def sample_token(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """Nucleus sampling; temperature 0 is greedy, and so is one so small that the scaled logits overflow."""
    import torch

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


class Sampler:
    """The sampling of one reply: its own random generator, and the counts behind the penalties. Called with
    each step's logits (of any model, on any device), it returns the next token."""

    def __init__(self, sampling: Sampling = DEFAULT_SAMPLING) -> None:
        import torch

        self.sampling = sampling
        self.generator = torch.Generator().manual_seed(int(sampling.seed))
        self.counts: Counter[int] = Counter()

    def __call__(self, logits: Tensor) -> int:
        import torch

        s = self.sampling
        logits = logits.float().cpu()
        if self.counts and (s.presence_penalty or s.frequency_penalty):
            ids = torch.tensor(list(self.counts))
            seen = torch.tensor(list(self.counts.values()), dtype=torch.float32)
            logits = logits.clone()
            logits[ids] -= s.presence_penalty + s.frequency_penalty * seen
        token = sample_token(logits, s.temperature, s.top_p, self.generator)
        self.counts[token] += 1
        return token


def generate(model: RWKV, tokenizer: Tokenizer, prompt: str, state: State | RecurrentState | None = None,
             sampling: Sampling = DEFAULT_SAMPLING, **changes: float) -> str:
    """Continue `prompt` from `state` (a State, a RecurrentState or the zero state); returns the new text.
    Sampling: `sampling`, with any setting changed by name (generate(..., temperature=0, max_tokens=40))."""
    import torch

    from .state import State

    sampling = sampling.but(**changes) if changes else sampling
    rs = state.to_recurrent() if isinstance(state, State) else state
    tokens = tokenizer.encode(prompt)
    if not tokens:
        raise InvalidOptionError("the prompt encodes to no tokens: a model reads one token before it predicts one")
    sample = Sampler(sampling)
    out: list[int] = []
    with torch.no_grad():
        logits, rs = model(torch.tensor([tokens]), rs)
        logits = logits[0, -1]
        for _ in range(sampling.max_tokens):
            token = sample(logits)
            if tokenizer.eod is not None and token == tokenizer.eod:
                break
            out.append(token)
            logits, rs = model.step(token, rs)
            logits = logits[0]
    return tokenizer.decode(out)

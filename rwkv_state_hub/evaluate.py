"""Held-out loss and per-token accuracy of a model from a given initial state.

Used by training (validation) and by `rwkv-state eval` (base vs few-shot prompt vs tuned state).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .data import Dataset, Sample, collate
from .loss import batch_loss, token_losses, windowed_batch_loss
from .model import RWKV, RecurrentState

__all__ = ["EvalResult", "batch_loss", "compare", "evaluate", "loss_by_position"]


@dataclass
class EvalResult:
    loss: float  # mean cross-entropy per trained token (nats)
    accuracy: float  # fraction of trained tokens where the argmax is the target
    n_tokens: int

    def __str__(self) -> str:
        return f"loss {self.loss:.4f}, accuracy {self.accuracy:.2%} over {self.n_tokens} tokens"


@torch.no_grad()
def evaluate(
    model: RWKV,
    samples: Dataset | list[Sample],
    state: RecurrentState | None = None,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    time_chunk: int | None = None,
) -> EvalResult:
    """Mean loss and accuracy over `samples` from `state` (zeros if None), `batch_size` samples at a time and,
    with `time_chunk`, that many positions at a time (the same figures in less memory)."""
    total, correct, n = 0.0, 0.0, 0
    for start in range(0, len(samples), batch_size):
        batch = collate([samples[i] for i in range(start, min(start + batch_size, len(samples)))]).to(device)
        loss_sum, right = windowed_batch_loss(model, batch, state, time_chunk or batch.inputs.shape[1])
        total += float(loss_sum)
        correct += float(right)
        n += batch.n_trained
    return EvalResult(total / max(n, 1), correct / max(n, 1), n)


POSITION_EDGES = (0, 16, 64, 256)  # buckets [0, 16), [16, 64), [64, 256), [256, ...) of tokens already read


@torch.no_grad()
def loss_by_position(
    model: RWKV, samples: Dataset | list[Sample], state: RecurrentState | None = None,
    edges: tuple[int, ...] = POSITION_EDGES,
) -> list[tuple[str, float, int]]:
    """(bucket, mean loss per trained token, tokens) by how far into its sample a token is: how long a
    state's effect lasts. A state that only sets the first few tokens gains in the first bucket alone."""
    sums = torch.zeros(len(edges), dtype=torch.float64)
    counts = torch.zeros(len(edges), dtype=torch.float64)
    bounds = torch.tensor(edges)
    for sample in samples:
        batch = collate([sample])
        nll = token_losses(model, batch, state)[0]
        weight = batch.loss_mask[0].double()
        bucket = torch.searchsorted(bounds, torch.arange(len(nll)), right=True) - 1
        sums.index_add_(0, bucket, nll.double() * weight)
        counts.index_add_(0, bucket, weight)
    names = [f"{a}-{b}" for a, b in zip(edges, edges[1:], strict=False)] + [f"{edges[-1]}+"]
    return [(name, float(sums[i] / counts[i]) if counts[i] else float("nan"), int(counts[i]))
            for i, name in enumerate(names)]


def compare(
    model_path: str,
    data: list[str],
    states: list[str],
    few_shot_data: str | None = None,
    shots: int = 3,
    tokenizer_name: str | None = None,
    ctx_len: int = 512,
    force: bool = False,
    quant: str | None = None,
) -> list[dict]:
    """The table of `rwkv-state eval`: base model (zero state), base model after a few-shot prompt drawn
    from `few_shot_data`, and each tuned state, all on the same held-out samples (`quant`: on the model with
    its matrices stored as int8 or nf4)."""
    from .data import load_dataset
    from .formats import load_state
    from .model import load_model
    from .tokenizer import get_tokenizer

    model = load_model(model_path, quant=quant)
    tok = get_tokenizer(tokenizer_name, model.spec)
    held_out = load_dataset(data, tok, ctx_len, model.spec.vocab_size)
    rows = [{"name": "base model (zero state)", **vars(evaluate(model, held_out))}]
    if few_shot_data:
        pool = load_dataset(few_shot_data, tok, ctx_len, model.spec.vocab_size)
        prompt = [t for i in range(min(shots, len(pool))) for t in pool[i].tokens]
        with torch.no_grad():
            _, after_prompt = model(torch.tensor([prompt]))
        rows.append({"name": f"base + {min(shots, len(pool))}-shot prompt ({len(prompt)} tokens)",
                     **vars(evaluate(model, held_out, after_prompt))})
    for path in states:
        state = load_state(path)
        state.check(model.spec, force=force)
        rows.append({"name": f"state {Path(path).name}", **vars(evaluate(model, held_out, state.to_recurrent()))})
    return rows

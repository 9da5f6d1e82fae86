"""Held-out loss and per-token accuracy of a model from a given initial state.

Used by training (validation) and by `rwkv-state eval` (base vs few-shot prompt vs tuned state).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .data import Dataset, Sample, collate
from .model import RWKV, RecurrentState
from .model.common import head_loss, linear


@dataclass
class EvalResult:
    loss: float  # mean cross-entropy per trained token (nats)
    accuracy: float  # fraction of trained tokens where the argmax is the target
    n_tokens: int

    def __str__(self) -> str:
        return f"loss {self.loss:.4f}, accuracy {self.accuracy:.2%} over {self.n_tokens} tokens"


HEAD_BUDGET = 256 << 20  # bytes of fp32 logits that may exist at once (ctx 1024 x vocab 65536)


def _head_loss(hidden: Tensor, head: torch.nn.Linear, targets: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    logits = linear(hidden, head)
    nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    correct = ((logits.argmax(-1) == targets).to(weight.dtype) * weight).sum() if not torch.is_grad_enabled() else None
    return (nll * weight).sum(), correct


def batch_loss(model: RWKV, batch, state: RecurrentState | None) -> tuple[Tensor, Tensor | None]:
    """(sum of cross-entropy over trained tokens, number of correct argmax predictions; None when training).

    When the batch's logits would exceed HEAD_BUDGET, the head and the loss run a chunk of positions at a
    time and are recomputed in the backward pass, so full-vocabulary logits never exist for the whole
    sequence at once. (Below the budget one pass is faster: recomputing costs a second head forward.)"""
    hidden, _ = model.hidden(batch.inputs, state, batch.mask)
    weight = batch.loss_mask.to(hidden.dtype)
    if torch.is_grad_enabled() and hidden.requires_grad and not model.head.weight.requires_grad:
        return head_loss(hidden, model.head, batch.targets, weight), None  # training a state: fused, lean
    B, T, _ = hidden.shape
    chunk = max(16, HEAD_BUDGET // (B * model.spec.vocab_size * 4))
    if chunk >= T:
        return _head_loss(hidden, model.head, batch.targets, weight)
    loss, correct = hidden.new_zeros(()), hidden.new_zeros(())
    for t in range(0, T, chunk):
        part = (hidden[:, t : t + chunk], model.head, batch.targets[:, t : t + chunk], weight[:, t : t + chunk])
        if torch.is_grad_enabled():
            loss = loss + checkpoint(_head_loss, *part, use_reentrant=False)[0]
            correct = None
        else:
            chunk_loss, chunk_correct = _head_loss(*part)
            loss, correct = loss + chunk_loss, correct + chunk_correct
    return loss, correct


@torch.no_grad()
def evaluate(
    model: RWKV,
    samples: Dataset | list[Sample],
    state: RecurrentState | None = None,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
) -> EvalResult:
    total, correct, n = 0.0, 0.0, 0
    for start in range(0, len(samples), batch_size):
        batch = collate([samples[i] for i in range(start, min(start + batch_size, len(samples)))]).to(device)
        loss_sum, right = batch_loss(model, batch, state)
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
        hidden, _ = model.hidden(batch.inputs, state, batch.mask)
        nll = F.cross_entropy(linear(hidden, model.head)[0].float(), batch.targets[0], reduction="none")
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
) -> list[dict]:
    """The table of `rwkv-state eval`: base model (zero state), base model after a few-shot prompt drawn
    from `few_shot_data`, and each tuned state, all on the same held-out samples."""
    from .data import load_dataset
    from .formats import load_state
    from .model import load_model
    from .tokenizer import get_tokenizer

    model = load_model(model_path)
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

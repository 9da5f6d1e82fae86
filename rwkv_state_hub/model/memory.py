"""How much memory a state-tuning step needs, and how many layers to recompute to stay within a budget.

A step keeps, for the backward pass, what every block saved in the forward pass (its "activations").
A block whose activations are recomputed (non-reentrant checkpointing) keeps only its inputs, at the
price of running its forward twice. `plan_recompute` picks the fewest such blocks that keep the
estimated peak RSS within a budget, from the activations measured on a short probe of the model itself
(so the estimate follows the code: a new WKV formulation changes it without a table to update).
"""

from __future__ import annotations

import os
import resource
import sys

import torch

from ..loss import head_chunk_bytes
from .common import RWKV, RecurrentState

PROBE_TOKENS = 32
# What a step's peak adds beyond what the blocks save, in units of one block's saved activations, measured
# on L12 D768 at ctx 512 (fp32 and bf16 weights): each block that keeps its activations costs 1.75x what it
# saves (the backward pass's gradients and glibc's fragmented heap), and a step costs about 7 blocks' worth
# however many are recomputed (the recomputed block, gradient buffers, the heap's slack); both rounded up.
KEPT_FACTOR = 1.8
BASE_BLOCKS = 7.5


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    """This process's resident memory now (Linux /proc; elsewhere the peak stands in for it)."""
    kib = _status_kib("VmRSS")
    return kib * 1024 if kib is not None else peak_rss_bytes()


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def available_bytes() -> int | None:
    """Memory the system can still give (MemAvailable), or None where it cannot tell."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def saved_bytes_per_token(model: RWKV) -> int:
    """Bytes that one block keeps for the backward pass per token, measured on a PROBE_TOKENS forward
    pass of the whole model (weights and anything shared are not counted; each storage counted once).
    The pass runs the head too: every page of a memory-mapped weight is then resident, so the RSS that
    `plan_recompute` reads next counts all the weights (the head alone is 100 MB in bf16 at 0.1B)."""
    frozen = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in frozen:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    device = model.emb.weight.device
    dtype = model.ln_out.weight.dtype
    state = RecurrentState.zeros(model.spec, 1, device, dtype)
    state.wkv.requires_grad_(True)
    tokens = torch.zeros(1, PROBE_TOKENS, dtype=torch.long, device=device)
    before = model.recompute_layers
    model.recompute_layers = 0
    try:
        with torch.enable_grad():
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                logits, final = model(tokens, state)
            # run the backward pass too: it releases what was saved (a graph saved through hooks and
            # dropped unused would keep it, a cycle through the autograd nodes)
            (logits.sum() + final.wkv.sum()).backward()
    finally:
        model.recompute_layers = before
    return sum(seen.values()) // (PROBE_TOKENS * model.spec.n_layer)


def plan_recompute(model: RWKV, batch: int, ctx: int, budget_bytes: float) -> int:
    """The fewest leading blocks to recompute so that a training step of `batch` x `ctx` tokens should
    peak within `budget_bytes` of RSS (this process as it is now, weights included). All blocks when even
    that does not fit: the least memory this model can train in."""
    L, C = model.spec.n_layer, model.spec.n_embd
    tokens = batch * ctx
    width = model.ln_out.weight.dtype.itemsize  # the residual stream's dtype (fp32)
    saved = saved_bytes_per_token(model) * tokens                    # one block's activations
    inputs = 2 * tokens * C * width                                   # a recomputed block keeps x (and v7's v_first)
    head = 2 * head_chunk_bytes(model.head) + 2 * tokens * C * width  # logits of one chunk, hidden and its gradient
    now = rss_bytes()
    for n in range(L + 1):
        estimate = now + head + BASE_BLOCKS * saved + (L - n) * KEPT_FACTOR * saved + n * inputs
        if estimate <= budget_bytes:
            return n
    return L


def default_budget() -> int | None:
    """With no --memory-budget: 80% of the memory available now plus what this process already holds
    (recompute only when the step would not fit in RAM otherwise)."""
    free = available_bytes()
    return None if free is None else int(0.8 * free) + rss_bytes()

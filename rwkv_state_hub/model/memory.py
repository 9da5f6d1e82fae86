"""How much memory a state-tuning step needs, and how many layers to recompute to stay within a budget.

A step keeps, for the backward pass, what every block saved in the forward pass (its "activations").
A block whose activations are recomputed (non-reentrant checkpointing) keeps only its inputs, at the
price of running its forward twice. `plan_recompute` picks the fewest such blocks that keep the
estimated peak RSS within a budget, from the activations measured on a short probe of the model itself
(so the estimate follows the code: a new WKV formulation changes it without a table to update).
"""

from __future__ import annotations

import math
import os
import resource
import sys
from dataclasses import dataclass

import torch

from ..files import release_free_heap
from ..loss import boundaries_kept, training_logits_bytes
from .common import RWKV, RecurrentState
from .quant import QuantizedLinear, allocate_scratch

PROBE_TOKENS = 32
# What a step's peak adds to RSS, in units of one block's saved activations: a block that keeps its activations
# costs KEPT_FACTOR times them (its gradients and the heap's fragments); a recomputed one keeps only its inputs
# (LAYER_FIXED a layer, with the heap's fragments); the one block at work, recomputed or not, AT_WORK times them (its
# activations and its backward's). Then the recurrent states: those kept at the chunks' boundaries (the whole
# sequence: the final one) and, in time chunks, STATES_IN_FLIGHT more (the chunk's final state, its gradient, the
# gradient carried from the chunk after); and one chunk of logits. In time chunks loss.chunked_backward hands the
# heap's free pages back after each chunk's forward and backward, so a layer costs less there. Fitted on the 0.1B,
# 0.4B and 1.5B shapes with fp32, bf16, int8 and nf4 matrices, the first step after the plan: the whole 512-token
# sequence with none, half or all of the blocks recomputed (every measured peak 0.49-0.85 of the estimate), and
# time chunks of 32-256 tokens with all or half of them recomputed, the boundary states in memory and in a file
# (0.33-0.88), STEP_SPREAD included.
KEPT_FACTOR = 2.0
AT_WORK = {"whole": 6.0, "chunked": 7.0}
LAYER_FIXED = {"whole": 3.5 * 2**20, "chunked": 1 << 20}
STATES_IN_FLIGHT = {"whole": 0, "chunked": 3}
# and the whole of it 10% more: measured peaks spread that much around the fit between runs and shapes (at 5%, 1.5B
# fp32 under weights + 1 GiB peaked at 0.998 of the budget with the CPU kernels; without any, 0.4B fp32 at 0.99)
STEP_SPREAD = 1.10


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
    """Bytes that one block keeps for the backward pass per token, measured on a PROBE_TOKENS pass of the second
    block (weights and anything shared are not counted; each storage counted once): one block, not the whole
    model, so that the probe's own peak stays below a step's (the whole model kept its activations and ran the
    head: +0.35 GiB at the 1.5B shape, the run's peak under a tight budget). The second, because in RWKV-7 every
    block after the first also mixes in the first one's values."""
    frozen = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in frozen:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    device = model.emb.weight.device
    state = RecurrentState.zeros(model.spec, 1, device, model.ln_out.weight.dtype)
    layer = min(1, len(model.blocks) - 1)
    x = model.emb(torch.zeros(1, PROBE_TOKENS, dtype=torch.long, device=device)).to(state.wkv.dtype)
    v_first = None
    with torch.no_grad():
        for i in range(layer):
            x, *_, v_first = model.blocks[i](x, state.att_x[:, i], state.wkv[:, i], state.ffn_x[:, i], v_first, None)
    inputs = [x, state.att_x[:, layer], state.wkv[:, layer], state.ffn_x[:, layer]]
    inputs = [t.clone().requires_grad_() for t in inputs]
    with torch.enable_grad():
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            x, _, wkv, *_ = model.blocks[layer](*inputs, v_first, None)
        # run the backward pass too: it releases what was saved (a graph saved through hooks and
        # dropped unused would keep it, a cycle through the autograd nodes)
        (x.sum() + wkv.sum()).backward()
    return sum(seen.values()) // PROBE_TOKENS


def page_in(model: RWKV) -> None:
    """Read every page of the model's weights and buffers: training reads them all sooner or later, and a
    memory-mapped one counts in RSS only once read, so the plan must see them resident."""
    with torch.no_grad():
        for t in (*model.parameters(), *model.buffers()):
            float(t.reshape(-1)[:: max(1, 4096 // t.element_size())].double().sum())  # one value per page


MIN_TIME_CHUNK = 32  # the shortest time chunk plan_step tries: below it, per-chunk overheads dominate


@dataclass(frozen=True)
class StepPlan:
    """How a step stays within a budget: `recompute` leading blocks recompute their activations, and the
    sequence runs forward and backward `time_chunk` tokens at a time (None: whole), keeping the states at the
    chunks' boundaries in memory or, with `boundaries_in_file`, in a file (loss.chunked_backward's spill_to).
    `estimate`: its peak RSS."""

    recompute: int
    time_chunk: int | None
    estimate: float
    fits: bool
    boundaries_in_file: bool = False


def state_bytes(spec, batch: int = 1) -> int:
    """Bytes of a whole recurrent state (every layer's WKV matrices and both token shifts, fp32)."""
    return batch * spec.n_layer * (spec.n_head * spec.head_size**2 + 2 * spec.n_embd) * 4


def step_bytes(spec, batch: int, tokens: int, ctx: int, recompute: int, saved_per_token: int,
               logits_bytes: int, in_file: bool = False) -> float:
    """What a step of `batch` x `ctx` tokens, run `tokens` at a time with `recompute` blocks recomputed, adds to
    RSS at its peak: the blocks' activations, the recurrent states kept at chunk boundaries (one, read back, when
    `in_file`), and a chunk of logits (`logits_bytes`: loss.training_logits_bytes). From the
    spec alone, so that it can be known before a model is loaded."""
    L = spec.n_layer
    saved = saved_per_token * batch * tokens                      # one block's activations
    state = state_bytes(spec, batch)
    logits = min(logits_bytes, batch * tokens * spec.vocab_size * 4)
    way = "chunked" if tokens < ctx else "whole"
    blocks = (L - recompute) * KEPT_FACTOR * saved + AT_WORK[way] * saved + L * LAYER_FIXED[way]
    states = (1 if in_file else boundaries_kept(math.ceil(ctx / tokens))) + STATES_IN_FLIGHT[way]
    return STEP_SPREAD * (blocks + states * state + logits)


def _logits_bytes(model: RWKV) -> int:
    quantized = isinstance(model.head, QuantizedLinear)
    return training_logits_bytes(torch.float32 if quantized else model.head.weight.dtype, quantized)


def time_chunks(ctx: int, time_chunk: int | None = None) -> list[int]:
    """The time chunks a step of `ctx` tokens may run in, longest first: `time_chunk` (or the whole sequence),
    halving down to MIN_TIME_CHUNK."""
    chunks = [min(ctx, time_chunk or ctx)]
    while chunks[-1] > MIN_TIME_CHUNK:
        chunks.append(max(MIN_TIME_CHUNK, chunks[-1] // 2))
    return chunks


def step_ways(ctx: int, time_chunk: int | None = None) -> list[tuple[int, bool]]:
    """The ways a step of `ctx` tokens may run, cheapest first, as (time chunk, boundary states in a file): from
    the longest chunk (time_chunks) down, at each first keeping the boundary states in memory, then in a file
    (a write and a read of each, far cheaper than halving the chunk)."""
    return [(chunk, in_file) for chunk in time_chunks(ctx, time_chunk)
            for in_file in ((False, True) if chunk < ctx else (False,))]


def plan_step(model: RWKV, batch: int, ctx: int, budget_bytes: float, time_chunk: int | None = None) -> StepPlan:
    """The cheapest way for a step of `batch` x `ctx` tokens to peak within `budget_bytes` of RSS (this process
    as it is now, weights included), all with the exact gradient: in the first of step_ways that fits, the fewest
    recomputed blocks (each a second forward pass of a block). When nothing fits, the least this model can train
    in (every block recomputed, in the way that needs least), with fits=False."""
    per_token = saved_bytes_per_token(model)
    page_in(model)
    allocate_scratch(model)
    release_free_heap()
    now = rss_bytes()
    least = None
    for chunk, in_file in step_ways(ctx, time_chunk):
        estimates = step_estimates(model, batch, chunk, per_token, now, ctx, in_file)
        for n, estimate in enumerate(estimates):
            plan = StepPlan(n, chunk if chunk < ctx else time_chunk, estimate, estimate <= budget_bytes, in_file)
            if plan.fits:
                return plan
        if least is None or plan.estimate < least.estimate:
            least = plan
    return least


def step_estimates(model: RWKV, batch: int, tokens: int, saved_per_token: int | None = None, now: int | None = None,
                   ctx: int | None = None, in_file: bool = False) -> list[float]:
    """The estimated peak RSS (from this process's RSS `now`) of a step of `batch` x `ctx` tokens (default:
    `tokens`) run `tokens` at a time, recomputing 0, 1, ... n_layer blocks."""
    per_token = saved_bytes_per_token(model) if saved_per_token is None else saved_per_token
    now = rss_bytes() if now is None else now
    return [now + step_bytes(model.spec, batch, tokens, ctx or tokens, n, per_token, _logits_bytes(model),
                             in_file) for n in range(model.spec.n_layer + 1)]


def plan_recompute(model: RWKV, batch: int, ctx: int, budget_bytes: float) -> int:
    """The fewest leading blocks to recompute so that a step of `batch` x `ctx` tokens (no time chunks) should
    peak within `budget_bytes`; all blocks when even that does not fit."""
    fits = [n for n, estimate in enumerate(step_estimates(model, batch, ctx)) if estimate <= budget_bytes]
    return fits[0] if fits else model.spec.n_layer


def default_budget() -> int | None:
    """With no --memory-budget: 80% of the memory available now plus what this process already holds
    (recompute only when the step would not fit in RAM otherwise)."""
    free = available_bytes()
    return None if free is None else int(0.8 * free) + rss_bytes()

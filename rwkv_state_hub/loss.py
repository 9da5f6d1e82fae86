"""The one loss: cross-entropy over trained tokens through the model's head, a chunk of rows at a time.

Training, validation, `rwkv-state eval` and the benchmarks all call `batch_loss`. Full-vocabulary logits never
exist for the whole batch at once (HEAD_CHUNK_BYTES of them at most, none when training through an fp32 head), so
a 65k vocabulary at ctx 4096 costs 32 MiB, not 1 GiB. When a state is trained, the
gradient to the hidden states is worked out in the same pass as the loss (the head is frozen: nothing else needs a
gradient), so nothing of the size of the logits is kept for the backward pass and the head runs once.
"""

from __future__ import annotations

import math
import os
import tempfile

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .files import release_free_heap
from .model.quant import QuantizedLinear
from .wkv import cpu as cpu_kernels

HEAD_CHUNK_BYTES = 32 << 20  # logits alive at once: 128 positions of a 65k vocab in fp32, 256 in bf16

Head = Tensor | QuantizedLinear  # a frozen head's weight [V, C], or the head itself when quantized

# An fp32 head's d nll / d hidden is softmax(h W^T) W - W[target]: attention with the hidden state as the query and
# the head's rows as both keys and values. torch's CPU flash-attention kernel works it out with the log-sum-exp a
# block of the vocabulary at a time, reading each block of the head once for both products and never holding a row
# of logits: 1.5x the chunked logits' speed at the 0.1B shape on 2 cores (a 200 MB head is read once per chunk of
# positions there, twice with the gradient). A quantized head runs the same online softmax in torch (_streamed_loss)
# on each block of rows it dequantizes. A bf16 head keeps the chunked logits (faster for it), turned into their
# gradient by the C++ CPU kernel (wkv/csrc/xent_cpu.cpp: three passes over the bf16 logits where torch makes eight
# over an fp32 copy) where it is built.
_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _flash_for(dtype: torch.dtype, quantized: bool) -> bool:
    """Whether training through a head of matrices in `dtype` (quantized or not) runs flash attention on the CPU."""
    return _FLASH is not None and dtype == torch.float32 and not quantized


def training_logits_bytes(dtype: torch.dtype, quantized: bool) -> int:
    """The most bytes of fp32 logits a training step holds at once on the CPU through a head of matrices in
    `dtype` (quantized or not): none through an fp32 head (flash attention), else a chunk."""
    return 0 if _flash_for(dtype, quantized) else HEAD_CHUNK_BYTES


def _operand(head: nn.Module) -> Head:
    return head if isinstance(head, QuantizedLinear) else head.weight.detach()


def _fused_bf16(head: Tensor) -> bool:
    """Whether the cross-entropy through this head runs in the C++ CPU kernel (a bf16 CPU head, kernels built)."""
    return head.dtype == torch.bfloat16 and head.device.type == "cpu" and cpu_kernels.load() is not None


def _flash_fits(flat: Tensor, head: Head) -> bool:
    return (isinstance(head, Tensor) and head.device.type == "cpu" and head.dtype == flat.dtype
            and _flash_for(head.dtype, quantized=False))


def _flash_loss(flat: Tensor, head: Tensor, targets: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """nll [rows] and d loss / d hidden [rows, C] through a frozen fp32 head, in one flash-attention pass."""
    out, lse = _FLASH(flat[None, None], head[None, None], head[None, None], scale=1.0)[:2]
    picked = head[targets]                                                # [rows, C]: each target's row
    nll = lse[0, 0] - (flat * picked).sum(-1)
    return nll, (out[0, 0] - picked).mul_(weight[:, None])


def _chunked_loss(flat: Tensor, head: Tensor, targets: Tensor, weight: Tensor,
                  want_grad: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """(nll [rows], correct argmax predictions (without a gradient), d loss / d hidden or None), through full
    logits a chunk of rows at a time."""
    grad = torch.empty_like(flat) if want_grad else None
    nll = flat.new_empty(flat.shape[0])
    correct = flat.new_zeros(())
    fused = want_grad and _fused_bf16(head)  # the C++ kernel: from the bf16 logits to their bf16 gradient
    rows = max(16, HEAD_CHUNK_BYTES // (head.shape[0] * (2 if fused else 4)))  # its logits stay bf16: twice the rows
    for s in range(0, flat.shape[0], rows):
        h, t, wt = flat[s : s + rows], targets[s : s + rows, None], weight[s : s + rows, None]
        logits = F.linear(h.to(head.dtype), head)
        if fused:
            nll[s : s + rows] = cpu_kernels.xent_bf16_(logits, t[:, 0], wt[:, 0])
            grad[s : s + rows] = (logits @ head).to(grad.dtype)
            continue
        logits = logits.to(h.dtype)                                       # [rows, V]
        picked = logits.gather(1, t)
        if grad is None:
            correct += ((logits.argmax(-1, keepdim=True) == t).to(wt.dtype) * wt).sum()
        # one pass each over the logits, in place: e^(logit - max), its sum, and (training) the softmax
        top = logits.amax(-1, keepdim=True)
        e = logits.sub_(top).exp_()
        total = e.sum(-1, keepdim=True)
        nll[s : s + rows] = (top + total.log() - picked)[:, 0]
        if grad is None:
            continue
        probs = e.div_(total)
        probs.scatter_add_(1, t, torch.full_like(wt, -1.0)).mul_(wt)      # d loss / d logits
        grad[s : s + rows] = (probs.to(head.dtype) @ head).to(grad.dtype)
    return nll, correct, grad


def _streamed_loss(flat: Tensor, head: QuantizedLinear, targets: Tensor, weight: Tensor,
                   want_grad: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """_chunked_loss's results through a quantized head, its vocabulary a block of rows at a time with a running
    log-sum-exp (flash attention's online softmax): each block is dequantized once per HEAD_CHUNK_BYTES of logits
    and serves both products, and no row of logits is ever whole."""
    positions = max(16, HEAD_CHUNK_BYTES // (head.block_rows * 4))
    parts = [_streamed_part(flat[s : s + positions], head, targets[s : s + positions], want_grad)
             for s in range(0, max(1, flat.shape[0]), positions)]  # no positions: one empty part
    nll = torch.cat([nll for nll, _, _ in parts])
    correct = flat.new_zeros(()) if want_grad else (torch.cat([best for _, best, _ in parts]) == targets).to(
        weight.dtype).mul(weight).sum()
    grad = torch.cat([g for _, _, g in parts]).mul_(weight[:, None]) if want_grad else None
    return nll, correct, grad


def _streamed_part(h: Tensor, head: QuantizedLinear, t: Tensor,
                   want_grad: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(nll, argmax (no gradient) or nothing, unweighted d nll / d h or nothing) for a few positions."""
    n = h.shape[0]
    top, total, picked = h.new_full((n,), -math.inf), h.new_zeros(n), h.new_zeros(n)
    best, best_at = h.new_full((n,), -math.inf), torch.zeros_like(t)
    out, target_rows = (h.new_zeros(h.shape), h.new_zeros(h.shape)) if want_grad else (None, None)
    hq = h.to(head.dtype)
    for a, rows, scale in head.row_blocks():
        logits = (hq @ rows.T).to(h.dtype)                                # [n, block]
        if scale is not None:
            logits.mul_(scale.to(h.dtype))
        at = t - a
        inside = (at >= 0) & (at < rows.shape[0])
        at = at.clamp(0, rows.shape[0] - 1)
        picked = torch.where(inside, logits.gather(1, at[:, None])[:, 0], picked)
        block_top, block_at = logits.max(1)
        if not want_grad:
            best_at = torch.where(block_top > best, block_at + a, best_at)
            best = torch.maximum(best, block_top)
        new_top = torch.maximum(top, block_top)
        rescale = (top - new_top).exp_()
        e = logits.sub_(new_top[:, None]).exp_()
        total = total.mul_(rescale).add_(e.sum(1))
        top = new_top
        if want_grad:
            w_t = rows[at] if scale is None else rows[at] * scale[at, None].to(rows.dtype)
            target_rows = torch.where(inside[:, None], w_t.to(h.dtype), target_rows)
            e = e if scale is None else e.mul_(scale.to(e.dtype))
            out.mul_(rescale[:, None]).add_((e.to(head.dtype) @ rows).to(h.dtype))
    nll = top + total.log() - picked
    if not want_grad:
        return nll, best_at, None
    return nll, None, out.div_(total[:, None]).sub_(target_rows)


class _FrozenHeadLoss(torch.autograd.Function):
    """Sum of weighted cross-entropy through a frozen head, the number of correct argmax predictions (only
    when no gradient is wanted) and the loss at each position. With a gradient, d loss / d hidden is worked
    out during the forward pass and kept for backward (the size of `hidden`, not of the logits)."""

    @staticmethod
    def forward(ctx, hidden: Tensor, head: Head, targets: Tensor, weight: Tensor, want_grad: bool):
        flat = hidden.reshape(-1, hidden.shape[-1])
        targets, weight = targets.reshape(-1), weight.reshape(-1).to(hidden.dtype)
        if want_grad and _flash_fits(flat, head):
            (nll, grad), correct = _flash_loss(flat, head, targets, weight), flat.new_zeros(())
        elif isinstance(head, QuantizedLinear):
            nll, correct, grad = _streamed_loss(flat, head, targets, weight, want_grad)
        else:
            nll, correct, grad = _chunked_loss(flat, head, targets, weight, want_grad)
        if grad is not None:
            ctx.save_for_backward(grad)
        ctx.shape = hidden.shape
        ctx.mark_non_differentiable(correct, nll)
        return (nll * weight).sum(), correct, nll.view(hidden.shape[:-1])

    @staticmethod
    def backward(ctx, grad_total: Tensor, grad_correct: Tensor | None, grad_nll: Tensor | None):
        (grad,) = ctx.saved_tensors
        return (grad * grad_total).view(ctx.shape), None, None, None, None


def head_loss(hidden: Tensor, head: nn.Linear | QuantizedLinear, targets: Tensor,
              weight: Tensor) -> tuple[Tensor, Tensor | None]:
    """(sum(cross_entropy(head(hidden), targets) * weight), correct argmax predictions weighted alike; None
    when a gradient is wanted). hidden [B, T, C]; targets [B, T] (valid ids everywhere, 0 at padding);
    weight [B, T]. The head must be frozen when a gradient is wanted: only d loss / d hidden is computed."""
    want_grad = torch.is_grad_enabled() and hidden.requires_grad
    if want_grad and any(p.requires_grad for p in head.parameters()):
        raise ValueError("head_loss is for a frozen head; this head requires a gradient")
    total, correct, _ = _FrozenHeadLoss.apply(hidden, _operand(head), targets, weight, want_grad)
    return total, None if want_grad else correct


def batch_loss(model, batch, state) -> tuple[Tensor, Tensor | None]:
    """(sum of cross-entropy over the batch's trained tokens, number of correct argmax predictions; None
    when training). `model` is an RWKV, `batch` a data.Batch, `state` a RecurrentState or None (zeros)."""
    hidden, _ = model.hidden(batch.inputs, state, batch.mask)
    return head_loss(hidden, model.head, batch.targets, batch.loss_mask.to(hidden.dtype))


@torch.no_grad()
def windowed_batch_loss(model, batch, state, chunk: int) -> tuple[Tensor, Tensor]:
    """batch_loss without a graph, read `chunk` positions at a time with the recurrent state carried from one
    window to the next: the same sums, with the memory of one window whatever the length (validation under a
    memory budget)."""
    loss_sum = right = torch.zeros((), dtype=torch.float64, device=batch.inputs.device)
    for t in range(0, batch.inputs.shape[1], chunk):
        part = batch.window(t, t + chunk)
        hidden, state = model.hidden(part.inputs, state, part.mask)
        loss, correct = head_loss(hidden, model.head, part.targets, part.loss_mask.to(hidden.dtype))
        loss_sum = loss_sum + loss.double()
        right = right + correct.double()
        del hidden, loss, correct
        release_free_heap()
    return loss_sum, right


@torch.no_grad()
def token_losses(model, batch, state) -> Tensor:
    """Cross-entropy at every position [B, T] (padding included: mask it with batch.loss_mask)."""
    hidden, _ = model.hidden(batch.inputs, state, batch.mask)
    return _FrozenHeadLoss.apply(hidden, _operand(model.head), batch.targets, batch.loss_mask, False)[2]


ALL_BOUNDARIES_UP_TO = 16  # chunks for which chunked_backward keeps every boundary state


def boundary_stride(n_chunks: int, all_up_to: int = ALL_BOUNDARIES_UP_TO) -> int:
    """Every how many chunks chunked_backward keeps the recurrent state in its first pass: all of them up to
    `all_up_to` chunks; beyond, about every sqrt(n)-th (the others are recomputed a segment at a time, one more
    forward pass without a graph), so that ~2 sqrt(n) states exist at once rather than n: a 64k-token sample in
    chunks of 256 keeps 32 states of the 0.1B shape (77 MB), not 256 (614 MB)."""
    return 1 if n_chunks <= all_up_to else math.isqrt(n_chunks)


def boundaries_kept(n_chunks: int, all_up_to: int = ALL_BOUNDARIES_UP_TO) -> int:
    """The most boundary states chunked_backward holds at once for `n_chunks` chunks."""
    stride = boundary_stride(n_chunks, all_up_to)
    return -(-n_chunks // stride) + (stride if stride > 1 else 0)


class StateFile:
    """Recurrent states kept in an anonymous file (gone when closed, or when the process dies) rather than in
    memory: chunked_backward's boundary states under a tight budget, written once and read back once each.
    The operating system's page cache holds them while memory is free and gives it back when it is not; a
    process's RSS never counts it."""

    def __init__(self, folder: str | os.PathLike):
        self._folder = os.fspath(folder)
        self._file = tempfile.TemporaryFile(dir=folder)
        self._where: dict[int, list[tuple[int, torch.dtype, torch.Size]]] = {}
        self._end = 0

    def put(self, key: int, state) -> None:
        parts = []
        for t in state.tensors():
            raw = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
            try:
                _write_at(self._file.fileno(), memoryview(raw), self._end)
            except OSError as e:  # a full disk: name the folder, which the bare write cannot
                why = f"{e.strerror or e} (writing the states at the time chunks' boundaries to a file here)"
                raise OSError(e.errno, why, self._folder) from None
            parts.append((self._end, t.dtype, t.shape))
            self._end += raw.nbytes
        self._where[key] = parts

    def pop(self, key: int):
        from .model.common import RecurrentState

        tensors = []
        for offset, dtype, shape in self._where.pop(key):
            t = torch.empty(shape, dtype=dtype)
            _read_at(self._file.fileno(), memoryview(t.reshape(-1).view(torch.uint8).numpy()), offset)
            tensors.append(t)
        return RecurrentState(*tensors)

    def close(self) -> None:
        self._file.close()


def _write_at(fd: int, data: memoryview, offset: int) -> None:
    while data:
        done = os.pwrite(fd, data, offset)
        data, offset = data[done:], offset + done


def _read_at(fd: int, into: memoryview, offset: int) -> None:
    while into:
        done = os.preadv(fd, [into], offset)
        if done == 0:
            raise OSError("a boundary state file ended early: it was truncated while the step ran")
        into, offset = into[done:], offset + done


def chunked_backward(model, batch, state, chunk: int, scale: float = 1.0,
                     all_boundaries_up_to: int = ALL_BOUNDARIES_UP_TO,
                     spill_to: str | os.PathLike | None = None) -> Tensor:
    """The loss sum of `batch` from `state`, and its exact gradient (times `scale`) sent back through `state`,
    with forward and backward run `chunk` positions at a time: the activations of one chunk exist at once,
    whatever the length of the samples. Not truncated backpropagation: every position's loss reaches the state.

    1. A forward pass without a graph keeps the recurrent state (all layers) at the start of every segment of
       boundary_stride(n, all_boundaries_up_to) chunks (every chunk, for up to 16 by default); with
       `spill_to` (a folder), at the start of every chunk, in a StateFile there instead of in memory.
    2. From the last segment back: recompute the states at its chunks' starts from the segment's (no graph);
       then from its last chunk back, rerun the chunk from its start state with a graph and backward its loss
       together with the gradient the later chunks sent to its final state; the gradient of its initial state
       goes on to the chunk before. The first chunk starts from `state` itself, so the gradient reaches
       whatever made it (the learned state). Returns the loss sum, detached."""
    starts = list(range(0, batch.inputs.shape[1], chunk))
    n = len(starts)
    stride = 1 if spill_to is not None else boundary_stride(n, all_boundaries_up_to)
    kept = StateFile(spill_to) if spill_to is not None else _StatesInMemory()
    try:
        _first_pass(model, batch, state, starts, chunk, stride, kept)
        return _backward_pass(model, batch, state, starts, chunk, stride, kept, scale)
    finally:
        kept.close()


class _StatesInMemory(dict):
    """StateFile's interface over a dict."""

    put = dict.__setitem__

    def close(self) -> None:
        self.clear()


def _advance(model, batch, s, start: int, chunk: int):
    """The state after the chunk at `start` from its start state s, without a graph."""
    part = batch.window(start, start + chunk)
    return model.hidden(part.inputs, s, part.mask)[1]


@torch.no_grad()
def _first_pass(model, batch, state, starts: list[int], chunk: int, stride: int, kept) -> None:
    """Keep (in memory or a StateFile) the state at the start of every `stride`-th chunk."""
    n, s = len(starts), state.detach()
    for i in range(0, n, stride):
        kept.put(i, s)
        for j in range(i, min(i + stride, n - 1)):
            s = _advance(model, batch, s, starts[j], chunk)


def _backward_pass(model, batch, state, starts: list[int], chunk: int, stride: int, kept, scale: float) -> Tensor:
    from .model.common import RecurrentState, backward_from

    n = len(starts)
    total = torch.zeros((), dtype=torch.float64)
    carried: tuple[Tensor, ...] | None = None  # d loss(later chunks) / d (this chunk's final state)
    for first in reversed(range(0, n, stride)):
        segment = range(first, min(first + stride, n))
        boundaries = {first: kept.pop(first)}
        with torch.no_grad():
            for i in segment[:-1]:
                boundaries[i + 1] = _advance(model, batch, boundaries[i], starts[i], chunk)
        for i in reversed(segment):
            part = batch.window(starts[i], starts[i] + chunk)
            begin = boundaries.pop(i)
            start = state if i == 0 else RecurrentState(*(t.requires_grad_() for t in begin.tensors()))
            hidden, final = model.hidden(part.inputs, start, part.mask)
            # hand the C heap's free pages back after the forward and after the backward: the freed temporaries'
            # holes stay resident otherwise (a 1.5B step of 32-token chunks: 0.39 GiB over the weights, 0.28 with)
            release_free_heap()
            loss, _ = head_loss(hidden, model.head, part.targets, part.loss_mask.to(hidden.dtype))
            total += loss.detach().double().cpu()
            outputs, grads = [loss * scale], [torch.ones_like(loss)]
            for t, g in zip(final.tensors(), carried, strict=True) if carried is not None else ():
                if t.requires_grad:
                    outputs.append(t)
                    grads.append(g)
            # only the lists hold the final state and its gradient now: each goes once the backward pass has used
            # it (two states' worth less at the peak)
            del hidden, final, loss
            carried = None
            backward_from(outputs, grads)
            if i > 0:
                carried = tuple(t.grad if t.grad is not None else torch.zeros_like(t) for t in start.tensors())
            del begin, start
            release_free_heap()
    return total

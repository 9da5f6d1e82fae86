"""One optimisation step, the same for the trainer, the dry run's timing and the benchmark.

Every step sees the same global batch whatever the number of processes: the samples are picked from the step
number alone, each rank takes its slice, and the loss is normalised by the trained tokens of the whole global
batch, so one process with grad_accum 2 and two processes give the same state.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data import Batch, Dataset, collate
from ..loss import batch_loss, chunked_backward
from ..model import EncodedState, LearnedState
from ..model.common import RecurrentState
from ..model.memory import StepPlan
from .adam import Adam
from .config import TrainConfig
from .distributed import SINGLE, Distributed

Learned = LearnedState | EncodedState
LossFn = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]  # (model, batch, state) -> (loss sum, _)


@dataclass
class StepResult:
    loss: float  # mean cross-entropy per trained token of the global batch
    grad_norm: float  # before clipping
    tokens: int  # input tokens of the global batch
    problem: str | None = None  # why the step's numbers are not finite; the update is then not to be kept


def train_step(model, learned: Learned, opt: Adam, micro: list[Batch],
               ddp: Distributed = SINGLE, grad_clip: float = 1.0, *, loss_fn: LossFn | None = None,
               time_chunk: int | None = None, spill_to: str | os.PathLike | None = None) -> StepResult:
    """Forward and backward over this rank's micro-batches, the gradient summed over ranks and clipped, then
    the update. A non-finite loss or gradient skips the update; a non-finite result of it is reported too.
    With `time_chunk`, longer batches run forward and backward that many positions at a time, with the exact
    gradient (loss.chunked_backward; with `spill_to`, a folder, the states at the chunks' boundaries wait in a
    file there): memory of one chunk, whatever the context length."""
    loss_fn = loss_fn or batch_loss
    counts = ddp.sum_(torch.tensor([sum(b.n_trained for b in micro), sum(int(b.mask.sum()) for b in micro)],
                                   dtype=torch.float64))
    n_global, n_inputs = max(int(counts[0]), 1), int(counts[1])
    opt.zero_grad(set_to_none=False)
    loss_sum = torch.zeros((), dtype=torch.float64)
    for batch in micro:
        if time_chunk:  # shorter batches too: one chunk, with the heap's free pages handed back as in the others
            loss_sum += chunked_backward(model, batch, learned(), time_chunk, 1 / n_global, spill_to=spill_to)
            continue
        loss, _ = loss_fn(model, batch, learned())
        (loss / n_global).backward()
        loss_sum += loss.detach().double().cpu()
    for p in learned.parameters():
        ddp.sum_(p.grad)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(learned.parameters(), grad_clip))
    loss_value = float(ddp.sum_(loss_sum)) / n_global
    problem = non_finite(loss_value, grad_norm)
    if problem is None:
        opt.step()
        if not all_finite(learned, opt):
            problem = "after the update the learned state is not finite"
    return StepResult(loss_value, grad_norm, n_inputs, problem)


def boundary_folder(plan: StepPlan, out: Path | None) -> Path | str | None:
    """Where train_step's `spill_to` points for `plan`: nowhere when the boundary states stay in memory; else the
    run's folder `out` (created), or for a run that writes nowhere (a dry run's step, train_state without out=)
    the system's temporary folder: the file has no name and goes with the step."""
    if not plan.boundaries_in_file:
        return None
    if out is None:
        return tempfile.gettempdir()
    out.mkdir(parents=True, exist_ok=True)
    return out


def new_learned(cfg: TrainConfig, spec, device: torch.device, dtype: torch.dtype = torch.float32,
                ) -> tuple[Learned, Adam]:
    """A zero state to learn (plain or through a state encoder) and its Adam; each parameter group carries
    an `lr_scale` relative to the schedule's learning rate."""
    if cfg.state_encoder:
        learned = EncodedState(spec, cfg.full_state).to(device=device, dtype=dtype)
        encoder = learned.encoder_parameters()
        rest = [p for p in learned.parameters() if all(p is not q for q in encoder)]
        groups = [{"params": encoder, "lr_scale": cfg.encoder_lr_scale}]
        groups += [{"params": rest, "lr_scale": 1.0}] if rest else []
    else:
        learned = LearnedState(spec, cfg.full_state).to(device=device, dtype=dtype)
        groups = [{"params": list(learned.parameters()), "lr_scale": 1.0}]
    opt = Adam(groups, lr=cfg.lr_init, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps)
    return learned, opt


def set_lr(opt: Adam, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr * group["lr_scale"]


def total_steps(cfg: TrainConfig, n_samples: int, world: int = 1) -> int:
    """cfg.steps, or as many as `cfg.epochs` passes over the data take."""
    return cfg.steps or max(1, math.ceil(cfg.epochs * n_samples / global_batch_size(cfg, world)))


def global_batch_size(cfg: TrainConfig, world: int = 1) -> int:
    return cfg.micro_bsz * cfg.grad_accum * world


def rank_batches(data: Dataset, step: int, cfg: TrainConfig, ddp: Distributed, device: torch.device) -> list[Batch]:
    """This rank's micro-batches of step `step`: its slice of the global batch, grad_accum batches of micro_bsz."""
    indices = global_batch_indices(step, len(data), global_batch_size(cfg, ddp.world), cfg.seed)
    per_rank = cfg.micro_bsz * cfg.grad_accum
    mine = indices[ddp.rank * per_rank : (ddp.rank + 1) * per_rank]
    return [collate([data[i] for i in mine[j : j + cfg.micro_bsz]]).to(device)
            for j in range(0, len(mine), cfg.micro_bsz)]


def _order(n: int, epoch: int, seed: int) -> list[int]:
    """The sample order of one epoch: a permutation that depends only on the seed and the epoch."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()


def global_batch_indices(step: int, n: int, global_bsz: int, seed: int) -> list[int]:
    """Which samples make up optimizer step `step`: position step * global_bsz of an endless sequence of
    per-epoch permutations. Recomputed from the step alone, so resuming needs no saved iterator."""
    out = []
    pos = step * global_bsz
    while len(out) < global_bsz:
        epoch, offset = divmod(pos, n)
        order = _order(n, epoch, seed)
        take = min(global_bsz - len(out), n - offset)
        out += order[offset : offset + take]
        pos += take
    return out


def non_finite(loss: float, grad_norm: float) -> str | None:
    """Which of a step's numbers is NaN or infinite, if one is (checked before the optimizer uses them)."""
    if not math.isfinite(loss):
        return f"the loss is {loss}"
    if not math.isfinite(grad_norm):
        return f"the gradient norm is {grad_norm}"
    return None


@torch.no_grad()
def all_finite(learned: Learned, opt: Adam) -> bool:
    """No NaN or infinity in the learned state, in what makes it (a state encoder) or in the optimizer's moments."""
    made: RecurrentState = learned()
    tensors = [made.wkv, made.att_x, made.ffn_x, *learned.parameters()]
    tensors += [t for s in opt.state.values() for k, t in s.items() if k != "step" and isinstance(t, torch.Tensor)]
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())  # one device sync, not one each

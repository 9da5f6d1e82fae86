"""`--memory-budget` for the whole `rwkv-state train` process, from start to exit (CPU).

Two checks, one before and one after the model is loaded:
- `check_before_loading`: the least this run can take (this process now, the weights as the model will hold
  them, the smallest step by formula, run_slack) against the budget; a budget below it is refused, naming the
  smallest that would do, before a byte of the model is read.
- `plan`: once the model is loaded and the data read, the step's plan (model.memory.plan_step, from a probe of
  the model itself): the longest time chunk and the fewest recomputed blocks that keep the estimated peak
  within the budget less run_slack. Still too little: refused, naming the least it measured.
benchmarks/memory_budget.py measures the result from outside the process, start-up to exit.
"""

from __future__ import annotations

import math
import re

import torch

from .. import wkv
from ..checkpoint import ModelSpec
from ..errors import InvalidOptionError, option
from ..loss import training_logits_bytes
from ..model import COPY_BLOCK_BYTES, RWKV, memory, quant
from ..wkv import cpu as wkv_cpu
from .config import TrainConfig

GIB = 2**30
# what a run holds beyond the model, its data and one step: the optimizer (the learned state's gradient and Adam's
# two moments, run_slack) and RUN_SLACK: a checkpoint or export being written and the step's run-to-run spread
# (+-30 MB). Validation reads the step's time chunks without a graph and hands its freed pages back. Measured from
# outside by benchmarks/memory_budget.py and benchmarks/scale.py, 0.1B to 1.5B shapes, every kind of matrices.
RUN_SLACK = 32 << 20
# what a loaded model holds beyond its weights once the plan's probe has run: the modules, the heap's slack around
# its small fp32 tensors, the CPU kernels' library (measured 15-23 MiB on the 0.1B, 0.4B and 1.5B shapes with fp32,
# bf16, int8 and nf4 matrices, after the loading's temporaries are freed; a quantized model's scratch apart)
LOAD_EXTRA = 32 << 20
# the least a refusal names is this much above the least it found: this process's RSS before loading varies by a
# few MiB between runs, and a run at the named least must not be refused in turn
NAMED_SPREAD = 16 << 20
# floats per channel, layer and token a block saves for its backward (measured on L12 D768 RWKV-7, the most of
# v5.2, v6 and v7): 26.6 with the CPU WKV kernels (they keep their inputs and a state every 16 steps), 51.8 with the
# chunked torch WKV (it keeps its intermediates)
ACT_FLOATS = {"kernels": 28, "torch": 52}
QUANT_BYTES = {"int8": 1.0, "nf4": 0.5625}  # bytes per weight with the scales (model/quant.py)
_LINEAR = re.compile(r"^(head|blocks\.\d+\.(att|ffn)\.(receptance|key|value|output|gate))\.weight$")


def dtype_of(precision: str) -> torch.dtype:
    """The dtype a run's matrices are held in for --precision (the state and its maths stay fp32 either way)."""
    return torch.bfloat16 if precision == "bf16" else torch.float32


def held_weight_bytes(weights: dict[str, torch.Tensor], precision: str, quant: str | None) -> int:
    """Bytes the model will hold for these checkpoint tensors (model.build_model's rules): the matrices in
    `precision` or quantized, the embedding never widened, everything else fp32."""
    matrix = QUANT_BYTES[quant] if quant else dtype_of(precision).itemsize
    total = 0.0
    for name, t in weights.items():
        if name.endswith(".time_state"):
            continue
        if _LINEAR.match(name):
            total += t.numel() * matrix
        elif name == "emb.weight":
            total += t.numel() * min(t.element_size(), dtype_of(precision).itemsize)
        else:
            total += t.numel() * 4
    return int(total)


def smallest_budget(cfg: TrainConfig, spec: ModelSpec, weights: dict[str, torch.Tensor]) -> int:
    """The least --memory-budget this run can take, in bytes, before the model is loaded: this process now, the
    weights as held, what loading adds, and the larger of loading's transient (the file's pages of a tensor
    being copied, model.COPY_BLOCK_BYTES at most) and the leanest step (every block recomputed, in the time chunk
    and with the boundary states that need least), a quantized model's dequantizing buffers; then run_slack.
    budget.plan's estimate after loading stays below it, so a budget this allows is not refused later."""
    logits = training_logits_bytes(dtype_of(cfg.precision), cfg.quant is not None)
    per_token = ACT_FLOATS["kernels" if _cpu_kernels(cfg) else "torch"] * spec.n_embd * 4
    step = min(memory.step_bytes(spec, cfg.micro_bsz, chunk, cfg.ctx_len, spec.n_layer, per_token, logits, in_file)
               for chunk, in_file in memory.step_ways(cfg.ctx_len, cfg.time_chunk))
    scratch = quant.scratch_bytes(cfg.quant, _matrix_shapes(weights), dtype_of(cfg.precision)) if cfg.quant else 0
    loaded = memory.rss_bytes() + held_weight_bytes(weights, cfg.precision, cfg.quant) + LOAD_EXTRA + scratch
    return int(loaded + max(step, COPY_BLOCK_BYTES) + run_slack(spec))


def _matrix_shapes(weights: dict[str, torch.Tensor]) -> list[tuple[int, int]]:
    return [tuple(t.shape) for name, t in weights.items() if _LINEAR.match(name)]


def run_slack(spec: ModelSpec) -> int:
    """What a run holds at a step's peak beyond the step: RUN_SLACK and the optimizer (the learned state's
    gradient and Adam's two moments: 3 states, 7 MB at the 0.1B shape, 37 MB at 1.5B)."""
    return RUN_SLACK + 3 * memory.state_bytes(spec)


def _cpu_kernels(cfg: TrainConfig) -> bool:
    """Whether the run's WKV will be the CPU kernels (building them now if this is their first use)."""
    return cfg.kernel == "auto" and wkv.backend() in ("auto", "cpu") and wkv_cpu.load() is not None


def _refusal(cfg: TrainConfig, least: float, why: str) -> InvalidOptionError:
    gib = math.ceil((least + NAMED_SPREAD) / GIB * 100) / 100  # rounded up to 0.01 GiB
    hint = "" if cfg.quant else f", or {option('quant', 'nf4')} to hold the matrices in less"
    return InvalidOptionError(f"{option('memory_budget', cfg.memory_budget)}: {why}; the least that would work is "
                              f"{option('memory_budget', gib)}{hint}")


def check_before_loading(cfg: TrainConfig, spec: ModelSpec, weights: dict[str, torch.Tensor]) -> None:
    """Refuse a budget below smallest_budget before the model is loaded (CPU only; no budget: nothing)."""
    if cfg.memory_budget is None or cfg.grad_checkpoint:
        return
    least = smallest_budget(cfg, spec, weights)
    if cfg.memory_budget * GIB < least:
        held = held_weight_bytes(weights, cfg.precision, cfg.quant)
        raise _refusal(cfg, least, f"this run needs more: the weights as held take {held / GIB:.2f} GiB and this "
                                   f"process {memory.rss_bytes() / GIB:.2f} GiB before loading")


def eval_batch(cfg: TrainConfig) -> int:
    """Validation's batch: at least 4 sequences at once (faster), but no more than a step's under a budget (a
    no-grad pass of 4 x ctx tokens outgrew a step of 1 x 64 recomputed ones: the run's peak, 0.1B shape)."""
    return cfg.micro_bsz if cfg.memory_budget is not None else max(cfg.micro_bsz, 4)


def plan(model: RWKV, cfg: TrainConfig, device: torch.device) -> memory.StepPlan:
    """How each step runs: every block recomputed with grad_checkpoint; on the CPU the plan that keeps the whole
    run within memory_budget (or, with none, the memory free now); elsewhere as configured."""
    cfg.validate()  # a direct caller gets the same refusal as train()
    L = model.spec.n_layer
    if cfg.grad_checkpoint or device.type != "cpu":
        return memory.StepPlan(L if cfg.grad_checkpoint else 0, cfg.time_chunk, math.nan, True)
    budget = cfg.memory_budget * GIB if cfg.memory_budget is not None else memory.default_budget()
    if budget is None:
        return memory.StepPlan(0, cfg.time_chunk, math.nan, True)
    step = memory.plan_step(model, cfg.micro_bsz, cfg.ctx_len, budget - run_slack(model.spec), cfg.time_chunk)
    if not step.fits and cfg.memory_budget is not None:
        chunk = step.time_chunk or cfg.ctx_len
        why = (f"with {model.spec.name} loaded, a step does not fit even with every block recomputed, {chunk} "
               "tokens at a time")
        raise _refusal(cfg, step.estimate + run_slack(model.spec), why)
    return step

"""What `rwkv-state train` prints around a run: the dry run's check and estimate, and the closing summary."""

from __future__ import annotations

import math
import time

import torch

from ..model.memory import StepPlan
from . import budget
from .config import EXPORT_NAMES, TrainConfig
from .distributed import SINGLE, pick_device
from .loop import Inputs, TrainResult, _recomputing, load_for_run
from .step import boundary_folder, global_batch_size, new_learned, rank_batches, total_steps, train_step

GREEN, RESET = "\x1b[1;32m", "\x1b[0m"
_USES = {"pth": "RWKV Runner (state-models/), RWKV-PEFT, rwkv pip via pip_state",
         "ai00": "Ai00: [[state]] in Config.toml"}


def dry_run(cfg: TrainConfig, color: bool = True) -> str:
    """Check model, tokenizer and data as a run would, time one real step, and describe a rendered sample,
    the memory, the steps and the time the run should take. Writes nothing. color: mark the trained tokens
    with ANSI colour (a terminal) or else with [[ ]]."""
    cfg.validate()
    cfg.require("model", "data")
    device = pick_device(cfg.device)
    model, inputs = load_for_run(cfg, device)
    step = budget.plan(model, cfg, device)
    seconds, tokens = _time_one_step(model, cfg, inputs, device, step)
    spec, data, val = model.spec, inputs.data, inputs.val
    total = total_steps(cfg, len(data))
    per_step = global_batch_size(cfg)
    how = "set by steps" if cfg.steps else f"{cfg.epochs:g} epochs x {len(data)} samples / {per_step} per step"
    sample = data[0]
    lines = [
        f"model      {spec.name} ({spec.arch}, {spec.dims()}, vocab {spec.vocab_size})",
        f"tokenizer  {inputs.tokenizer.name}",
        f"data       {len(data)} samples, {data.n_tokens} tokens, {data.n_trained_tokens} trained"
        + (f", {data.n_truncated} truncated to {cfg.ctx_len + 1}" if data.n_truncated else ""),
        f"val data   {len(val)} samples, {val.n_trained_tokens} trained tokens" if val else "val data   none",
        _memory_line(model, cfg, step),
        f"steps      {total} ({how})",
        f"time       about {_duration(seconds * total)} at {tokens / seconds:.0f} tokens/s on this machine "
        f"(one step measured: {seconds:.2f} s)",
        f"sample     {sample.source} (trained tokens {'in green' if color else 'between [[ and ]]'}):",
        _render(sample.tokens, sample.mask, inputs.tokenizer, color),
    ]
    return "\n".join(lines)


def _time_one_step(model, cfg: TrainConfig, inputs: Inputs, device: torch.device,
                   step: StepPlan) -> tuple[float, int]:
    """Seconds and input tokens of one real optimisation step (the first global batch), on a throwaway state."""
    with _recomputing(model, step.recompute):
        learned, opt = new_learned(cfg, model.spec, device, model.ln_out.weight.dtype)
        micro = rank_batches(inputs.data, 0, cfg, SINGLE, device)
        started = time.perf_counter()
        r = train_step(model, learned, opt, micro, SINGLE, cfg.grad_clip, time_chunk=step.time_chunk,
                       spill_to=boundary_folder(step, None))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return max(time.perf_counter() - started, 1e-9), r.tokens


def _memory_line(model, cfg: TrainConfig, step: StepPlan) -> str:
    """The weights the model holds and, on the CPU, the run's planned peak (budget.plan: what train will do)."""
    held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) / 2**20
    if math.isnan(step.estimate):
        return f"memory     weights {held:.0f} MiB (the peak is planned on the CPU without grad_checkpoint only)"
    chunk = f", {step.time_chunk} tokens at a time" if step.time_chunk else ""
    peak = (step.estimate + budget.run_slack(model.spec)) / 2**20
    return (f"memory     about {peak:.0f} MiB at the peak (weights {held:.0f} "
            f"MiB; {step.recompute} of {model.spec.n_layer} blocks recomputed{chunk})")


def _duration(seconds: float) -> str:
    minutes = seconds / 60
    if minutes < 1:
        return "1 min or less"
    return f"{minutes:.0f} min" if minutes < 120 else f"{minutes / 60:.1f} h"


def _render(tokens: list[int], mask: list[int], tokenizer, color: bool) -> str:
    """The sample's text with its trained tokens marked: green on a terminal, [[...]] in a file or pipe."""
    opening, closing = (GREEN, RESET) if color else ("[[", "]]")
    parts, inside = [], False
    for tok, m in zip(tokens, mask, strict=True):
        if bool(m) != inside:
            parts.append(opening if m else closing)
            inside = bool(m)
        parts.append(tokenizer.decode([tok]))
    return "".join(parts + ([closing] if inside else []))


def summary(result: TrainResult, cfg: TrainConfig) -> str:
    """The one screen printed at the end of a run: what came out, where, and how to use it."""
    out = result.out
    state_file = out / "state.safetensors"
    lines = [
        "",
        f"{'Interrupted' if result.interrupted else 'Done'}: {result.steps} steps, {result.tokens} tokens, "
        f"{result.tokens_per_second:.0f} tokens/s",
    ]
    if result.best_val is not None:
        lines.append(f"validation loss: best {result.best_val:.4f}, last {result.final_val.loss:.4f}")
    lines.append(f"state:    {state_file}" + (f"  (best: {out / 'best.safetensors'})" if result.best_val else ""))
    lines += [f"export:   {out / EXPORT_NAMES[fmt]}   # {_USES[fmt]}" for fmt in cfg.export if fmt in _USES]
    lines.append(f"metrics:  {out / 'metrics.jsonl'}, {out / 'loss.png'}, config: {out / 'config.toml'}")
    if result.interrupted:
        lines.append(f"resume:   rwkv-state train --config {out / 'config.toml'} --resume")
    lines.append("use it:")
    lines += [f"  rwkv-state export {state_file} --format {fmt} -o {EXPORT_NAMES[fmt]}   # {use}"
              for fmt, use in _USES.items() if fmt not in cfg.export]
    lines.append(f"  python: from rwkv_state_hub import RWKV, State; model = RWKV.from_pretrained({cfg.model!r}); "
                 f"state = State.from_pretrained({str(state_file)!r})")
    return "\n".join(lines)

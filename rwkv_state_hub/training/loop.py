"""State tuning: learn the initial recurrent state of a frozen RWKV model.

`train(cfg)` (the command line: the model is a path in the config) and `train_state(model, data)` (a notebook:
the model is already loaded) set up, then share `_fit`: the loop below, which reads top to bottom as
schedule -> step -> log -> validate -> checkpoint. One process or many (`torchrun`); Ctrl-C finishes the step,
saves and returns; a step whose numbers are not finite stops the run before anything of it is saved.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import wkv
from ..checkpoint import read_checkpoint
from ..data import Dataset, load_dataset
from ..errors import InvalidDataError, InvalidOptionError, TrainingDiverged, option
from ..evaluate import EvalResult, evaluate
from ..files import release_free_heap
from ..fingerprint import file_fingerprint
from ..formats import export_state, save_native
from ..model import RWKV, build_model
from ..model.memory import StepPlan
from ..model.quant import matrix_dtype, quantization
from ..plot import plot_losses
from ..state import State
from ..tokenizer import Tokenizer, get_tokenizer, release_world_vocab
from ..wkv import cuda as cuda_wkv
from . import budget, checkpointing, tracking
from .adam import Adam
from .checkpointing import CHECKPOINT, Progress
from .config import EXPORT_NAMES, TrainConfig, lr_at
from .distributed import Distributed, is_main_thread, pick_device
from .step import Learned, boundary_folder, new_learned, rank_batches, set_lr, total_steps, train_step


@dataclass
class TrainResult:
    out: Path | None  # None: train_state without out=, nothing was written
    state: State
    steps: int
    tokens: int
    final_val: EvalResult | None
    best_val: float | None
    interrupted: bool = False
    tokens_per_second: float = 0.0


@dataclass
class Inputs:
    """What a run reads besides the model: the tokenizer and the data, checked in full before any step."""

    tokenizer: Tokenizer
    data: Dataset
    val: Dataset | None


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> TrainResult:
    """Run state tuning as configured (the model: the .pth at cfg.model); returns where the results are."""
    cfg.validate()
    cfg.require("model", "data")
    tracking.require(cfg.report_to)
    device = pick_device(cfg.device)
    ddp = Distributed.from_env(device)
    torch.manual_seed(cfg.seed)
    model, inputs = load_for_run(cfg, device)
    return _fit(model, cfg, Path(cfg.out), ddp, device, resume, progress, inputs)


def train_state(model: RWKV, data, config: TrainConfig | None = None, *, out: str | os.PathLike | None = None,
                val_data=None, progress: bool = True, resume: bool = False) -> State:
    """Learn a state for an already loaded `model` and return it. `data` (and `val_data`): a path, a list of
    paths, or a list of records as a .jsonl line holds them ({"text": ...}, {"messages": [...]}, ...).
    The config's model, data, val_data and out fields are not used (the arguments say them), nor its precision
    and device: the state is learned on the model's device, in its compute dtype. Nothing is written unless
    `out` is given; then exactly what `rwkv-state train` writes, and `resume=True` continues the run there."""
    if resume and out is None:
        raise InvalidOptionError(f"{option('resume', True)} continues a run saved in a folder; pass {option('out')}")
    cfg = replace(config or TrainConfig(), model=model.spec.path or model.spec.name, out=str(out or "."),
                  precision="bf16" if matrix_dtype(model.head) == torch.bfloat16 else "fp32",
                  quant=quantization(model))
    with tempfile.TemporaryDirectory(prefix="rwkv-state-records-") as tmp:
        cfg = replace(cfg, data=_as_paths(data, "data", Path(tmp)), val_data=_as_paths(val_data, "val_data", Path(tmp)))
        cfg.validate()
        cfg.require("data")
        tracking.require(cfg.report_to)
        device = model.ln_out.weight.device
        torch.manual_seed(cfg.seed)
        result = _fit(model, cfg, Path(out) if out is not None else None, Distributed.from_env(device), device,
                      resume, progress)
    return result.state


def load_for_run(cfg: TrainConfig, device: torch.device) -> tuple[RWKV, Inputs]:
    """The frozen model of cfg.model in cfg.precision on `device` (its matrices quantized with cfg.quant) and the
    data, as a run (and its dry run) loads them: the fingerprint's pass over the file while nothing else maps it
    (cached once done), then the data (bad data stops sooner, and its memory counts), then the memory budget's
    check, and only then the model."""
    file_fingerprint(cfg.model)
    spec, weights = read_checkpoint(cfg.model)  # memory-mapped: nothing of the model is read yet
    inputs = load_inputs(cfg, spec)
    if device.type == "cpu" and cfg.memory_budget is not None:
        release_world_vocab()  # counted in the budget, and not needed again by the run
        release_free_heap()
    if device.type == "cpu":
        budget.check_before_loading(cfg, spec, weights)
    dtype = budget.dtype_of(cfg.precision)
    return build_model(spec, weights, dtype=dtype, device=device, quant=cfg.quant), inputs


def load_inputs(cfg: TrainConfig, spec) -> Inputs:
    """The tokenizer and every sample of the training and validation data (a bad line stops here)."""
    tokenizer = get_tokenizer(cfg.tokenizer, spec)
    data = load_dataset(cfg.data, tokenizer, cfg.ctx_len, spec.vocab_size)
    val = load_dataset(cfg.val_data, tokenizer, cfg.ctx_len, spec.vocab_size) if cfg.val_data else None
    return Inputs(tokenizer, data, val)


def wkv_backend(cfg: TrainConfig, device: torch.device) -> str | None:
    """The WKV backend the run asks for (None: the default, wkv's "auto"). kernel="cuda" on a CUDA device builds
    (or finds) the kernels now; elsewhere one line says why not."""
    if cfg.kernel == "torch":
        return "chunked"
    if cfg.kernel == "cuda" and device.type == "cuda":
        cuda_wkv.load()
        return "cuda"
    if cfg.kernel == "cuda":
        cuda_wkv.tell(f"{option('kernel', 'cuda')} with {option('device', device.type)}")
    return None


@dataclass
class _Run:
    """Everything the loop body touches, so that each part of it is one short call."""

    cfg: TrainConfig
    model: RWKV
    inputs: Inputs
    learned: Learned
    opt: Adam
    out: Path | None
    ddp: Distributed
    device: torch.device
    plan: StepPlan  # how each step runs (budget.plan)
    progress: Progress = field(default_factory=Progress)
    metrics: list[dict] = field(default_factory=list)
    saved_step: int | None = None  # the step of the last checkpoint written or resumed from
    trackers: tracking.Trackers | None = None

    @property
    def writes(self) -> bool:
        return self.out is not None and self.ddp.main

    def save_checkpoint(self) -> None:
        if self.writes:
            checkpointing.save(self.out, self.cfg, self.learned, self.opt, self.progress)
        if self.out is not None:
            self.saved_step = self.progress.step

    def validate(self) -> dict:
        """Validation loss and accuracy over every rank's share of the held-out data; keeps the best state."""
        val = self.inputs.val
        mine = [val[i] for i in range(self.ddp.rank, len(val), self.ddp.world)]
        r = evaluate(self.model, mine, self.learned().detach(), batch_size=budget.eval_batch(self.cfg),
                     device=self.device, time_chunk=self.plan.time_chunk)
        sums = self.ddp.sum_(torch.tensor([r.loss * r.n_tokens, r.accuracy * r.n_tokens, r.n_tokens],
                                          dtype=torch.float64))
        n = max(float(sums[2]), 1.0)
        loss, accuracy = float(sums[0]) / n, float(sums[1]) / n
        self.progress.final_val = loss
        if self.progress.best_val is None or loss < self.progress.best_val:
            self.progress.best_val = loss
            if self.writes:
                save_native(self.state("best"), self.out / "best.safetensors")
        release_free_heap()  # validation's freed logits stay resident otherwise, under the next step's peak
        return {"val_loss": loss, "val_accuracy": accuracy}

    def log(self, entry: dict) -> None:
        self.metrics.append(entry)
        if self.writes:
            checkpointing.log_metrics(self.out, entry)
        if self.trackers is not None:
            self.trackers.log({k: v for k, v in entry.items() if k != "step"}, entry["step"])

    def diverged(self, step: int, why: str) -> TrainingDiverged:
        """The error that stops a run before a non-finite number reaches a checkpoint or a state file."""
        if self.out is None:
            kept = "nothing was saved"
        elif self.saved_step is not None:
            kept = f"the last good checkpoint, {self.out / CHECKPOINT} (step {self.saved_step}), is kept"
        else:
            kept = "no checkpoint had been written yet"
        where = f" in a new {option('out')}" if self.out is not None else ""
        return TrainingDiverged(f"step {step}: {why}; stopped without saving it, {kept}. Try a lower "
                                f"{option('lr_init')} (now {self.cfg.lr_init:g}){where}")

    def state(self, which: str) -> State:
        cfg, p = self.cfg, self.progress
        summary = {
            "method": "state-tuning" + (" (state encoder)" if cfg.state_encoder else ""),
            "which": which,
            "steps": p.step,
            "tokens_seen": p.tokens,
            "best_val_loss": p.best_val,
            "final_val_loss": p.final_val,
            "data_sha256": self.inputs.data.sha256,
            "data_files": [Path(f).name for f in cfg.data],
            "hyperparameters": {k: v for k, v in asdict(cfg).items()
                                if k not in ("model", "data", "val_data", "out", "report_to")},
        }
        state = State.from_learned(self.learned, self.model.spec, tokenizer=self.inputs.tokenizer.name,
                                   training=summary)
        state.metrics = list(self.metrics)  # the history: save_pretrained draws loss.png from it
        return state


def _fit(model: RWKV, cfg: TrainConfig, out: Path | None, ddp: Distributed, device: torch.device, resume: bool,
         show: bool, inputs: Inputs | None = None) -> TrainResult:
    """Load the data (unless given), then train `model`'s state as configured: what train() and train_state()
    share."""
    backend = wkv_backend(cfg, device)
    inputs = inputs or load_inputs(cfg, model.spec)
    step = budget.plan(model, cfg, device)
    with _recomputing(model, step.recompute):
        learned, opt = new_learned(cfg, model.spec, device, model.ln_out.weight.dtype)
        run = _Run(cfg, model, inputs, learned, opt, out, ddp, device, step)
        if out is not None:
            run.progress, run.metrics = checkpointing.start(out, cfg, learned, opt, resume, ddp.main)
            run.saved_step = run.progress.step if resume and (out / CHECKPOINT).exists() else None
        total = total_steps(cfg, len(inputs.data), ddp.world)
        if ddp.main and cfg.report_to:
            run.trackers = tracking.Trackers(cfg, out, out.name if out is not None else model.spec.name)
        started, tokens_before = time.perf_counter(), run.progress.tokens
        try:
            with _ctrl_c_stops() as stop, _wkv_backend(backend):
                _loop(run, total, stop, show)
        finally:
            if run.trackers is not None:
                run.trackers.close()
        speed = (run.progress.tokens - tokens_before) / max(time.perf_counter() - started, 1e-9)
        return _finish(run, total, speed)


def _loop(run: _Run, total: int, stop: dict, show: bool) -> None:
    cfg, p = run.cfg, run.progress
    bar = tqdm(total=total, initial=p.step, desc="state tuning", unit="step", disable=not (show and run.ddp.main))
    spill_to = boundary_folder(run.plan, run.out)
    started, tokens_before = time.perf_counter(), p.tokens
    try:
        while p.step < total:
            lr = lr_at(p.step, total, cfg)
            set_lr(run.opt, lr)
            micro = rank_batches(run.inputs.data, p.step, cfg, run.ddp, run.device)
            r = train_step(run.model, run.learned, run.opt, micro, run.ddp, cfg.grad_clip,
                           time_chunk=run.plan.time_chunk, spill_to=spill_to)
            if r.problem is not None:
                raise run.diverged(p.step + 1, r.problem)
            p.step, p.tokens = p.step + 1, p.tokens + r.tokens
            speed = (p.tokens - tokens_before) / max(time.perf_counter() - started, 1e-9)
            entry = {"step": p.step, "loss": r.loss, "lr": lr, "grad_norm": r.grad_norm, "tokens": p.tokens,
                     "tokens_per_s": speed}
            if run.inputs.val is not None and (p.step % cfg.val_every == 0 or p.step == total):
                entry.update(run.validate())
            run.log(entry)
            bar.set_postfix(loss=f"{r.loss:.3f}", lr=f"{lr:.3g}", tok_s=f"{speed:.0f}")
            bar.update(1)
            if p.step % cfg.save_every == 0 or p.step == total:
                run.save_checkpoint()
            if run.ddp.any(stop["requested"]):
                run.save_checkpoint()
                break
    finally:
        bar.close()


def _finish(run: _Run, total: int, speed: float) -> TrainResult:
    """The final state, and with an output folder its files: state, exports, loss plot."""
    p = run.progress
    state = run.state("final")
    if run.writes:
        save_native(state, run.out / "state.safetensors")
        for fmt in run.cfg.export:
            export_state(state, run.out / EXPORT_NAMES[fmt], fmt)
        plot_losses(run.metrics, run.out / "loss.png", title=f"{run.model.spec.name}: state tuning")
    run.ddp.barrier()
    final = EvalResult(p.final_val, 0.0, 0) if p.final_val is not None else None
    return TrainResult(run.out, state, p.step, p.tokens, final, p.best_val, p.step < total, speed)


@contextmanager
def _ctrl_c_stops() -> Iterator[dict]:
    """While training, the first Ctrl-C asks the loop to finish its step, save and stop; a second one aborts.
    Every rank installs it: torchrun passes Ctrl-C to each worker, and they stop together."""
    stop = {"requested": False}
    if not is_main_thread():
        yield stop
        return

    def on_sigint(signum, frame):
        if stop["requested"]:
            raise KeyboardInterrupt
        stop["requested"] = True

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


@contextmanager
def _wkv_backend(name: str | None) -> Iterator[None]:
    previous = wkv.set_backend(name)
    try:
        yield
    finally:
        wkv.set_backend(previous)


@contextmanager
def _recomputing(model: RWKV, layers: int) -> Iterator[None]:
    """The model recomputes `layers` blocks for this run only: a notebook's model is left as it was."""
    before = model.recompute_layers
    model.recompute_layers = layers
    try:
        yield
    finally:
        model.recompute_layers = before


def _as_paths(data, name: str, tmp: Path) -> list[str]:
    """Paths as given, or records (dicts) written to a .jsonl in `tmp` so that load_dataset reads them as it
    reads any file (its messages then name records.jsonl:N, N counting from 1)."""
    if data is None:
        return []
    items = [data] if isinstance(data, str | os.PathLike | dict) else list(data)
    records = [x for x in items if isinstance(x, dict)]
    if not records:
        return [os.fspath(x) if isinstance(x, os.PathLike) else x for x in items]
    if len(records) != len(items):
        raise InvalidDataError(f"{name}: give either paths or records (dicts), not both")
    path = tmp / f"{name}-records.jsonl"
    lines = []
    for i, record in enumerate(records):
        try:
            lines.append(json.dumps(record, allow_nan=False) + "\n")  # ASCII: data.py judges any surrogate
        except (TypeError, ValueError) as e:
            raise InvalidDataError(f"{name}[{i}]: not a record a .jsonl line can hold ({e})") from None
    path.write_text("".join(lines), encoding="utf-8")
    return [str(path)]


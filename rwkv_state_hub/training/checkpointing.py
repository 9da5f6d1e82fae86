"""A run's folder: its checkpoint (state, optimizer, step, RNG), written atomically every `save_every` steps,
and what resuming from it checks, so that a run killed at any moment continues exactly where it stopped.

The checkpoint is read as untrusted (`checkpoint.load_untrusted`: weights only, no code runs); a truncated,
foreign or edited one gets one line naming it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..checkpoint import load_untrusted
from ..errors import InvalidCheckpointError, InvalidOptionError, ModelMismatchError, OutputExistsError, option
from ..files import atomic_torch_save, atomic_write_bytes
from .adam import Adam
from .config import TrainConfig
from .step import Learned, all_finite

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"


@dataclass
class Progress:
    """How far a run got; saved in the checkpoint as a plain dict."""

    step: int = 0
    tokens: int = 0
    best_val: float | None = None
    final_val: float | None = None


def start(out: Path, cfg: TrainConfig, learned: Learned, opt: Adam, resume: bool,
          main: bool = True) -> tuple[Progress, list[dict]]:
    """Resume the run in `out` (into `learned` and `opt`) or start a new one there; returns the progress and
    the metrics logged so far. A folder that holds a run is only continued, never overwritten."""
    progress, metrics = Progress(), []
    if resume and (out / CHECKPOINT).exists():
        progress = load(out / CHECKPOINT, cfg, learned, opt)
        metrics = [m for m in read_metrics(out) if m["step"] <= progress.step]
    elif main and (out / CHECKPOINT).exists():
        raise OutputExistsError(f"{out}: holds a run already; pass {option('resume', True)} to continue it or "
                                f"choose another {option('out')}")
    if main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / "config.toml", cfg.to_toml().encode())
        atomic_write_bytes(out / METRICS, "".join(json.dumps(m) + "\n" for m in metrics).encode())
    return progress, metrics


def save(out: Path, cfg: TrainConfig, learned: Learned, opt: Adam, progress: Progress) -> None:
    ck = {"learned": learned.state_dict(), "optimizer": opt.state_dict(), "rng": torch.get_rng_state(),
          "run": asdict(progress), "config": asdict(cfg)}
    atomic_torch_save(out / CHECKPOINT, ck)


def log_metrics(out: Path, entry: dict) -> None:
    with open(out / METRICS, "a") as f:
        f.write(json.dumps(entry) + "\n")


def _fresh() -> str:
    return f"start a new {option('out')}"


def load(path: Path, cfg: TrainConfig, learned: Learned, opt: Adam) -> Progress:
    """Load an interrupted run's checkpoint into `learned` and `opt`; returns its progress."""
    ck = _read(path)
    if ck["config"] != asdict(cfg):
        changed = sorted(str(k) for k in ck["config"] if ck["config"][k] != asdict(cfg).get(k))
        raise InvalidOptionError(f"{path}: made with other options ({', '.join(changed)[:200]}); "
                                 f"resume with the same configuration or {_fresh()}")
    try:
        learned.load_state_dict(ck["learned"])
        opt.load_state_dict(ck["optimizer"])
        torch.set_rng_state(ck["rng"])
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
        reason = " ".join(str(e).split())[:160] or type(e).__name__
        raise ModelMismatchError(f"{path}: does not fit this run ({reason}); {_fresh()}") from None
    for p in learned.parameters():
        state = opt.state.get(p)
        if state is None:  # Adam starts a parameter's moments at its first step
            continue
        moments = [state.get(k) for k in ("exp_avg", "exp_avg_sq")]
        if any(not isinstance(m, torch.Tensor) or m.shape != p.shape for m in moments) or not (
                isinstance(state.get("step"), torch.Tensor) and state["step"].numel() == 1):
            raise InvalidCheckpointError(f"{path}: the optimizer's record does not match the learned state; "
                                         f"{_fresh()}")
    if not all_finite(learned, opt):
        raise InvalidCheckpointError(f"{path}: the learned state or the optimizer's moments are not finite; "
                                     f"{_fresh()}")
    return Progress(**ck["run"])


def _read(path: Path) -> dict:
    """The checkpoint's parts, each of the type `save` writes."""
    try:
        ck, _ = load_untrusted(path)  # the checkpoint reader's bounds: cost set by the file's bytes
    except InvalidCheckpointError as e:
        raise InvalidCheckpointError(f"{e}; {_fresh()}") from None
    parts = {"learned": dict, "optimizer": dict, "rng": torch.Tensor, "run": dict, "config": dict}
    if not isinstance(ck, dict) or any(not isinstance(ck.get(k), kind) for k, kind in parts.items()):
        raise InvalidCheckpointError(f"{path}: not a checkpoint of rwkv-state train (expected {', '.join(parts)}); "
                                     f"{_fresh()}")
    run = ck["run"]
    counts_ok = all(type(run.get(k)) is int and 0 <= run[k] <= 2**62 for k in ("step", "tokens"))
    losses_ok = all(run.get(k) is None or type(run.get(k)) is float for k in ("best_val", "final_val"))
    if not (counts_ok and losses_ok) or set(run) != set(asdict(Progress())):
        shown = json.dumps(run, default=str)
        raise InvalidCheckpointError(f"{path}: damaged progress record (run = {shown[:80]}); {_fresh()}")
    return ck


def read_metrics(out: Path) -> list[dict]:
    """The metrics logged so far; a line torn by a crash is skipped, not the whole history."""
    try:
        lines = (out / METRICS).read_text().splitlines()
    except OSError:
        return []
    metrics = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("step"), int):
            metrics.append(entry)
    return metrics

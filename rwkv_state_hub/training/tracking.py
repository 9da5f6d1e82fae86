"""Experiment tracking: `report_to=["tensorboard"]` (or trackio, wandb) logs every step's numbers there too.

Each tracker is optional and imported only when asked for; one that is not installed is refused before any
work, with the command that installs it. Only the main rank reports.
"""

from __future__ import annotations

import importlib
from dataclasses import asdict
from pathlib import Path
from types import ModuleType
from typing import Any

from ..errors import InvalidOptionError, option
from .config import TrainConfig

PROJECT = "rwkv-state-hub"
_MODULES = {"trackio": "trackio", "wandb": "wandb", "tensorboard": "torch.utils.tensorboard"}
_PACKAGES = {"trackio": "trackio", "wandb": "wandb", "tensorboard": "tensorboard"}


def require(names: list[str]) -> dict[str, ModuleType]:
    """Import each tracker asked for; a missing one is one line saying how to install it."""
    modules = {}
    for name in names:
        try:
            modules[name] = importlib.import_module(_MODULES[name])
        except ImportError:
            raise InvalidOptionError(f"{option('report_to', names)}: {name} is not installed; "
                                     f"pip install {_PACKAGES[name]}") from None
    return modules


class Trackers:
    """The trackers of one run; `log` sends one step's numbers to each."""

    def __init__(self, cfg: TrainConfig, out: Path | None, run_name: str):
        self._runs: list[Any] = []
        settings = {k: v for k, v in asdict(cfg).items() if v is not None}
        for name, module in require(cfg.report_to).items():
            self._runs.append(_OPEN[name](module, settings, out, run_name))

    def log(self, numbers: dict[str, float], step: int) -> None:
        for run in self._runs:
            run.log(numbers, step)

    def close(self) -> None:
        for run in self._runs:
            run.close()


class _TensorBoard:
    def __init__(self, module: ModuleType, settings: dict, out: Path | None, run_name: str):
        self.writer = module.SummaryWriter(log_dir=str(out / "tensorboard") if out is not None else None)
        self.writer.add_text("config", "\n".join(f"    {k} = {v!r}" for k, v in settings.items()))

    def log(self, numbers: dict[str, float], step: int) -> None:
        for key, value in numbers.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    def __init__(self, module: ModuleType, settings: dict, out: Path | None, run_name: str):
        self.run = module.init(project=PROJECT, name=run_name, config=settings,
                               dir=str(out) if out is not None else None)

    def log(self, numbers: dict[str, float], step: int) -> None:
        self.run.log(numbers, step=step)

    def close(self) -> None:
        self.run.finish()


class _Trackio:
    def __init__(self, module: ModuleType, settings: dict, out: Path | None, run_name: str):
        self.module = module
        module.init(project=PROJECT, name=run_name, config=settings)

    def log(self, numbers: dict[str, float], step: int) -> None:
        self.module.log(numbers, step=step)

    def close(self) -> None:
        self.module.finish()


_OPEN = {"tensorboard": _TensorBoard, "wandb": _Wandb, "trackio": _Trackio}

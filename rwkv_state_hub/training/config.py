"""Every option of a training run, and the one place where each option's rules live.

A bad value costs one line before any work (not a traceback after the model is loaded, or a run that ends
"Done" with an untrained or non-finite state). The line names the option as the user wrote it: the key of a
`--config` file, the flag on the command line, the field in Python.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

from .._version import __version__
from ..errors import InvalidOptionError, option
from ..tokenizer import check_tokenizer_name

EXPORT_NAMES = {"pth": "state.pth", "ai00": "state.st", "safetensors": "state.safetensors"}
TRACKERS = ("trackio", "wandb", "tensorboard")
KERNELS = ("auto", "torch", "cuda")
PRECISIONS = ("fp32", "bf16")
QUANT_KINDS = ("int8", "nf4")  # model/quant.py KINDS (tests/test_quant.py keeps them equal)
INT_MAX = 2**31 - 1  # no count or length of ours needs more; larger ones overflow torch and numpy int32
SEED_MAX = 2**32 - 1
EPOCHS_MAX = 1e6
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
_LIST_FIELDS = ("data", "val_data", "export", "report_to")


@dataclass
class TrainConfig:
    """Every option of `rwkv-state train`; also what a `--config run.toml` file may set. `train_state` takes
    the model and the data as arguments, so there `TrainConfig(steps=200)` is a whole configuration."""

    model: str | None = None  # the base model's .pth (train(); train_state takes a loaded model)
    data: list[str] = field(default_factory=list)
    out: str = "runs/state"
    val_data: list[str] = field(default_factory=list)
    tokenizer: str | None = None
    ctx_len: int = 512
    micro_bsz: int = 1
    grad_accum: int = 1
    epochs: float = 1.0
    steps: int | None = None  # overrides epochs
    lr_init: float = 1.0
    lr_final: float = 0.01
    warmup_steps: int = 10
    beta1: float = 0.9
    beta2: float = 0.99
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    precision: str = "fp32"
    quant: str | None = None  # the frozen matrices stored as int8 or nf4 (matmuls in `precision`; state fp32)
    grad_checkpoint: bool = False
    memory_budget: float | None = None  # GiB of peak RSS (CPU); None: recompute only if RAM would run out
    time_chunk: int | None = None  # exact long context: forward/backward this many tokens at a time (None: whole)
    full_state: bool = False
    state_encoder: bool = False  # learn the state through a per-layer MLP (training only)
    encoder_lr_scale: float = 0.03  # the encoder's learning rate relative to lr_init
    seed: int = 42
    val_every: int = 50
    save_every: int = 50
    device: str = "auto"
    kernel: str = "auto"  # WKV: auto = C++ kernels on CPU, torch on GPU (CUDA kernels unverified); torch; cuda
    export: list[str] = field(default_factory=list)
    report_to: list[str] = field(default_factory=list)  # experiment trackers: trackio, wandb, tensorboard

    # which fields came from a config file (field -> file name), so that an error names them as written there
    _origin: ClassVar[dict[str, str]] = {}

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str | None = None,
                  file_keys: Collection[str] | None = None) -> TrainConfig:
        """A validated config from options and/or a config file. source: the file's name; file_keys: the keys
        that came from it (default: all of them when there is a source)."""
        where = source or "options"
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(k) for k in set(d) - known)
        if unknown:
            raise InvalidOptionError(f"{where}: unknown option {unknown[0][:80]!r}")
        for key in _LIST_FIELDS:
            if isinstance(d.get(key), str):
                d = {**d, key: [x for x in d[key].split(",") if x] if key in ("export", "report_to") else [d[key]]}
        cfg = cls(**d)
        if source is not None:
            cfg._origin = {key: source for key in (d if file_keys is None else file_keys)}
        return cfg.validate()

    def validate(self) -> TrainConfig:
        """Check every field's type and range; raises InvalidOptionError naming the first bad one."""
        for f in fields(self):
            value = getattr(self, f.name)
            kind, check = _RULES[f.name]
            why = _type_problem(kind, value)
            if why is None and value is not None and check is not None:
                why = check(value)
            if why is not None:
                raise InvalidOptionError(f"{self._label(f.name, value)}: {why}")
        return self

    def require(self, *names: str) -> None:
        """Fields that this use needs though the config alone may leave them out (train() needs a model path)."""
        for name in names:
            if not getattr(self, name):
                raise InvalidOptionError(f"{option(name)} is required")

    def _label(self, key: str, value: Any) -> str:
        """The option as the user wrote it: `run.toml: ctx_len = "512"`, `--ctx-len 0` or `ctx_len=0`."""
        if key in self._origin:
            return f"{self._origin[key]}: {key} = {_shown(value)}"
        if isinstance(value, str) and len(value) > 80:
            value = value[:77] + "..."
        text = option(key, value)
        text = text if text.isprintable() else text.encode("unicode_escape").decode()
        return text if len(text) <= 100 else text[:97] + "..."

    def to_toml(self) -> str:
        """The resolved configuration as TOML, so `--config out/config.toml` repeats the run."""
        lines = [f"# rwkv-state-hub {__version__}: the resolved configuration of this run"]
        for key, value in asdict(self).items():
            if value is not None:
                lines.append(f"{key} = {json.dumps(value)}")
        return "\n".join(lines) + "\n"


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warmup from 1% of lr_init, then a geometric decay to lr_final at the last step
    (RWKV-LM and RWKV-PEFT schedule the state's learning rate the same way)."""
    if step < cfg.warmup_steps:
        return cfg.lr_init * (0.01 + 0.99 * step / cfg.warmup_steps)
    span = max(total - 1 - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    return cfg.lr_init * math.exp(math.log(cfg.lr_final / cfg.lr_init) * progress)


def _shown(value: Any) -> str:
    """A value on one short line, spelled as in TOML."""
    if isinstance(value, float) and not math.isfinite(value):
        text = str(value)  # nan, inf, -inf
    else:
        text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


_TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "expected an integer"),
    "number": (lambda v: isinstance(v, int | float) and not isinstance(v, bool), "expected a number"),
    "bool": (lambda v: isinstance(v, bool), "expected true or false"),
    "text": (lambda v: isinstance(v, str | os.PathLike) and os.fspath(v) != "", "expected a non-empty string"),
    "texts": (lambda v: isinstance(v, list) and all(isinstance(x, str | os.PathLike) and os.fspath(x) for x in v),
              "expected a list of non-empty strings"),
}


def _type_problem(kind: str, value: Any) -> str | None:
    """Why a value is not of its field's kind ("int?" also allows None); None when it is."""
    if value is None:
        return None if kind.endswith("?") else "is required"
    kind = kind.rstrip("?")
    ok, expected = _TYPES[kind]
    if not ok(value):
        return expected
    if kind in ("int", "number") and not _finite(value):
        return "must be a finite number"
    return None


def _between(low: float, high: float | None = None, low_open: bool = False, high_open: bool = False,
             hint: Callable[[], str] = str) -> Callable[[Any], str | None]:
    """A range check whose message says which end was crossed (hint: words added at the low end, composed
    when the message is, so that they name options in the reader's dialect)."""
    def check(v: float) -> str | None:
        if v < low or (low_open and v == low):
            return f"must be {'greater than' if low_open else 'at least'} {low}{hint()}"
        if high is not None and (v > high or (high_open and v == high)):
            return f"must be {'less than' if high_open else 'at most'} {high}"
        return None
    return check


def _one_of(choices: Collection[str]) -> Callable[[Any], str | None]:
    return lambda v: None if v in choices else f"choose from {', '.join(choices)}"


def _each_of(choices: Collection[str], what: str) -> Callable[[list], str | None]:
    def check(values: list) -> str | None:
        bad = next((v for v in values if v not in choices), None)
        return None if bad is None else f"unknown {what} {bad!r}; choose from {', '.join(choices)}"
    return check


def _lr_hint() -> str:
    return f" (the decay is geometric; use a small {option('lr_final')} such as 1e-4 for 'almost zero')"


_COUNT = _between(1, INT_MAX)
# field -> (kind, check of a value of that kind); the one place where a training option's rules live
_RULES: dict[str, tuple[str, Callable[[Any], str | None] | None]] = {
    "model": ("text?", None),
    "data": ("texts", None),
    "out": ("text", None),
    "val_data": ("texts", None),
    "tokenizer": ("text?", check_tokenizer_name),
    "ctx_len": ("int", _COUNT),
    "micro_bsz": ("int", _COUNT),
    "grad_accum": ("int", _COUNT),
    "epochs": ("number", _between(0, EPOCHS_MAX, low_open=True)),
    "steps": ("int?", _between(1, INT_MAX, hint=lambda: f" (or leave it out to use {option('epochs')})")),
    "lr_init": ("number", _between(0, low_open=True, hint=_lr_hint)),
    "lr_final": ("number", _between(0, low_open=True, hint=_lr_hint)),
    "warmup_steps": ("int", _between(0, INT_MAX)),
    "beta1": ("number", _between(0, 1, high_open=True)),
    "beta2": ("number", _between(0, 1, high_open=True)),
    "adam_eps": ("number", _between(0, low_open=True)),
    "grad_clip": ("number", _between(0, low_open=True)),
    "precision": ("text", _one_of(PRECISIONS)),
    "quant": ("text?", _one_of(QUANT_KINDS)),
    "grad_checkpoint": ("bool", None),
    "memory_budget": ("number?", _between(0, low_open=True, hint=lambda: " GiB")),
    "time_chunk": ("int?", _between(16, INT_MAX, hint=lambda: " tokens")),
    "full_state": ("bool", None),
    "state_encoder": ("bool", None),
    "encoder_lr_scale": ("number", _between(0, low_open=True)),
    "seed": ("int", _between(0, SEED_MAX)),
    "val_every": ("int", _COUNT),
    "save_every": ("int", _COUNT),
    "device": ("text", lambda v: None if _DEVICE.fullmatch(str(v)) else "choose auto, cpu, cuda or cuda:N"),
    "kernel": ("text", _one_of(KERNELS)),
    "export": ("texts", _each_of(EXPORT_NAMES, "format")),
    "report_to": ("texts", _each_of(TRACKERS, "tracker")),
}

"""State tuning: learn the initial recurrent state of a frozen RWKV model.

One loop for one process or many (`torchrun`: data-parallel, gloo on CPU, NCCL on CUDA). Every
optimizer step sees the same global batch whatever the number of processes, so the result does not
depend on how the work was split. A checkpoint (state, optimizer, step, RNG) is written atomically
every `save_every` steps; `resume=True` continues exactly where it stopped.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import time
from collections.abc import Callable, Collection
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from . import __version__, wkv
from .checkpoint import load_untrusted, read_checkpoint
from .data import Dataset, collate, load_dataset
from .errors import StateHubError
from .evaluate import EvalResult, batch_loss, evaluate
from .files import atomic_torch_save, atomic_write_bytes
from .formats import export_state, save_native
from .model import EncodedState, LearnedState, build_model, memory
from .model.common import HEAD_CHUNK_BYTES
from .plot import plot_losses
from .state import State
from .tokenizer import check_tokenizer_name, get_tokenizer
from .wkv import cuda as cuda_wkv

CHECKPOINT = "checkpoint.pt"
EXPORT_NAMES = {"pth": "state.pth", "ai00": "state.st", "safetensors": "state.safetensors"}
KERNELS = ("auto", "torch", "cuda")
PRECISIONS = ("fp32", "bf16")
INT_MAX = 2**31 - 1  # no count or length of ours needs more; larger ones overflow torch and numpy int32
SEED_MAX = 2**32 - 1
EPOCHS_MAX = 1e6
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
_LR_HINT = " (the decay is geometric; use a small --lr-final such as 1e-4 for 'almost zero')"


@dataclass
class TrainConfig:
    """Every option of `rwkv-state train`; also what a `--config run.toml` file may set."""

    model: str
    data: list[str]
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
    grad_checkpoint: bool = False
    memory_budget: float | None = None  # GiB of peak RSS (CPU); None: recompute only if RAM would run out
    full_state: bool = False
    state_encoder: bool = False  # learn the state through a per-layer MLP (training only)
    encoder_lr_scale: float = 0.03  # the encoder's learning rate relative to --lr-init
    seed: int = 42
    val_every: int = 50
    save_every: int = 50
    device: str = "auto"
    kernel: str = "auto"  # WKV: auto = torch (until the CUDA kernels are verified on hardware), torch, cuda
    export: list[str] = field(default_factory=list)

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
            raise StateHubError(f"{where}: unknown option {unknown[0][:80]!r}")
        missing = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING
                   and f.name not in d]
        if missing:
            raise StateHubError(f"{where}: {missing[0]} is required")
        for key in ("data", "val_data"):
            if isinstance(d.get(key), str):
                d = {**d, key: [d[key]]}
        if isinstance(d.get("export"), str):
            d = {**d, "export": [x for x in d["export"].split(",") if x]}
        cfg = cls(**d)
        if source is not None:
            cfg._origin = {key: source for key in (d if file_keys is None else file_keys)}
        return cfg.validate()

    def validate(self) -> TrainConfig:
        """Check every field's type and range before any work, so a bad value costs one line, not a traceback
        after the model is loaded (or, worse, a run that ends "Done" with an untrained or non-finite state)."""
        for f in fields(self):
            value = getattr(self, f.name)
            kind, check = _RULES[f.name]
            why = _type_problem(kind, value)
            if why is None and value is not None and check is not None:
                why = check(value)
            if why is not None:
                raise StateHubError(f"{self._label(f.name, value)}: {why}")
        return self

    def _label(self, key: str, value: Any) -> str:
        """The option as the user wrote it: `run.toml: ctx_len = "512"` or `--ctx-len 0`."""
        if key in self._origin:
            return f"{self._origin[key]}: {key} = {_shown(value, toml=True)}"
        return f"--{key.replace('_', '-')} {_shown(value, toml=False)}"

    def to_toml(self) -> str:
        """The resolved configuration as TOML, so `--config out/config.toml` repeats the run."""
        lines = [f"# rwkv-state-hub {__version__}: the resolved configuration of this run"]
        for key, value in asdict(self).items():
            if value is not None:
                lines.append(f"{key} = {json.dumps(value)}")
        return "\n".join(lines) + "\n"


def _shown(value: Any, toml: bool) -> str:
    """A value on one short line: TOML spelling for a config file, the command line's for an option."""
    if isinstance(value, float) and not math.isfinite(value):
        text = str(value)  # nan, inf, -inf: TOML and click spell them alike
    elif toml:
        text = json.dumps(value, ensure_ascii=False, default=str)
    else:
        text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
        text = text if text.isprintable() else json.dumps(text)
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
             hint: str = "") -> Callable[[Any], str | None]:
    """A range check whose message says which end was crossed."""
    def check(v: float) -> str | None:
        if v < low or (low_open and v == low):
            return f"must be {'greater than' if low_open else 'at least'} {low}{hint}"
        if high is not None and (v > high or (high_open and v == high)):
            return f"must be {'less than' if high_open else 'at most'} {high}"
        return None
    return check


def _one_of(choices: Collection[str]) -> Callable[[Any], str | None]:
    return lambda v: None if v in choices else f"choose from {', '.join(choices)}"


def _each_of(choices: Collection[str]) -> Callable[[list], str | None]:
    def check(values: list) -> str | None:
        bad = next((v for v in values if v not in choices), None)
        return None if bad is None else f"unknown format {bad!r}; choose from {', '.join(choices)}"
    return check


_COUNT = _between(1, INT_MAX)
# field -> (kind, check of a value of that kind); the one place where a training option's rules live
_RULES: dict[str, tuple[str, Callable[[Any], str | None] | None]] = {
    "model": ("text", None),
    "data": ("texts", lambda v: None if v else "name at least one data file"),
    "out": ("text", None),
    "val_data": ("texts", None),
    "tokenizer": ("text?", check_tokenizer_name),
    "ctx_len": ("int", _COUNT),
    "micro_bsz": ("int", _COUNT),
    "grad_accum": ("int", _COUNT),
    "epochs": ("number", _between(0, EPOCHS_MAX, low_open=True)),
    "steps": ("int?", _between(1, INT_MAX, hint=" (or leave it out to use --epochs)")),
    "lr_init": ("number", _between(0, low_open=True, hint=_LR_HINT)),
    "lr_final": ("number", _between(0, low_open=True, hint=_LR_HINT)),
    "warmup_steps": ("int", _between(0, INT_MAX)),
    "beta1": ("number", _between(0, 1, high_open=True)),
    "beta2": ("number", _between(0, 1, high_open=True)),
    "adam_eps": ("number", _between(0, low_open=True)),
    "grad_clip": ("number", _between(0, low_open=True)),
    "precision": ("text", _one_of(PRECISIONS)),
    "grad_checkpoint": ("bool", None),
    "memory_budget": ("number?", _between(0, low_open=True, hint=" GiB")),
    "full_state": ("bool", None),
    "state_encoder": ("bool", None),
    "encoder_lr_scale": ("number", _between(0, low_open=True)),
    "seed": ("int", _between(0, SEED_MAX)),
    "val_every": ("int", _COUNT),
    "save_every": ("int", _COUNT),
    "device": ("text", lambda v: None if _DEVICE.fullmatch(str(v)) else "choose auto, cpu, cuda or cuda:N"),
    "kernel": ("text", _one_of(KERNELS)),
    "export": ("texts", _each_of(EXPORT_NAMES)),
}


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warmup from 1% of lr_init, then a geometric decay to lr_final at the last step
    (RWKV-LM and RWKV-PEFT schedule the state's learning rate the same way)."""
    if step < cfg.warmup_steps:
        return cfg.lr_init * (0.01 + 0.99 * step / cfg.warmup_steps)
    span = max(total - 1 - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    return cfg.lr_init * math.exp(math.log(cfg.lr_final / cfg.lr_init) * progress)


class _Distributed:
    """Rank and world size; a no-op in a single process."""

    def __init__(self, device: torch.device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        if self.world > 1 and not dist.is_initialized():
            # gloo for the small CPU-side sums (token counts, losses, the stop flag), NCCL for CUDA tensors
            dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def _pick_device(name: str) -> torch.device:
    """auto: CUDA when there is one. Under torchrun each process takes the GPU of its LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise StateHubError("--device cuda: no CUDA device is available (use --device cpu)")
    device = torch.device(name)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


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


@dataclass
class TrainResult:
    out: Path
    state: State
    steps: int
    tokens: int
    final_val: EvalResult | None
    best_val: float | None
    interrupted: bool = False
    tokens_per_second: float = 0.0


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> TrainResult:
    """Run state tuning as configured; returns where the results are. Ctrl-C saves and returns.
    A step whose loss, gradient or state is not finite stops the run with one line; nothing it made is saved."""
    cfg.validate()
    device = _pick_device(cfg.device)
    ddp = _Distributed(device)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    use_cuda_kernels = cfg.kernel == "cuda" and device.type == "cuda"
    if use_cuda_kernels:
        cuda_wkv.load()  # build (or find) the kernels now; where they cannot run, one line says why
    elif cfg.kernel == "cuda":
        cuda_wkv.tell(f"--kernel cuda with --device {device.type}")

    spec, weights = read_checkpoint(cfg.model)
    model = build_model(spec, weights, dtype=torch.bfloat16 if cfg.precision == "bf16" else torch.float32,
                        device=device)
    model.gradient_checkpointing = cfg.grad_checkpoint
    del weights  # the model holds all it uses: a checkpoint whose tensors were widened is unmapped now
    tokenizer = get_tokenizer(cfg.tokenizer, spec)
    data = load_dataset(cfg.data, tokenizer, cfg.ctx_len, spec.vocab_size)
    if device.type == "cpu" and not cfg.grad_checkpoint:
        model.recompute_layers = _recompute_for_budget(model, cfg)
    val = load_dataset(cfg.val_data, tokenizer, cfg.ctx_len, spec.vocab_size) if cfg.val_data else None

    global_bsz = cfg.micro_bsz * cfg.grad_accum * ddp.world
    total = cfg.steps or max(1, math.ceil(cfg.epochs * len(data) / global_bsz))
    if cfg.state_encoder:
        learned = EncodedState(spec, cfg.full_state).to(device)
        encoder = learned.encoder_parameters()
        groups = [{"params": encoder, "lr_scale": cfg.encoder_lr_scale}]
        rest = [p for p in learned.parameters() if all(p is not q for q in encoder)]
        groups += [{"params": rest, "lr_scale": 1.0}] if rest else []
    else:
        learned = LearnedState(spec, cfg.full_state).to(device)
        groups = [{"params": list(learned.parameters()), "lr_scale": 1.0}]
    opt = torch.optim.Adam(groups, lr=cfg.lr_init, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps)
    run = {"step": 0, "tokens": 0, "best_val": None, "final_val": None}
    metrics: list[dict] = []

    saved = {"step": None}  # the step of the last checkpoint written or resumed from: kept if a step diverges
    if resume and (out / CHECKPOINT).exists():
        run = _resume(out / CHECKPOINT, cfg, learned, opt)
        saved["step"] = run["step"]
        metrics = [m for m in _read_metrics(out) if m["step"] <= run["step"]]
    elif ddp.main:
        if (out / CHECKPOINT).exists() and not resume:
            raise StateHubError(f"{out}: holds a run already; pass --resume to continue it or choose another --out")
        out.mkdir(parents=True, exist_ok=True)
    if ddp.main:
        atomic_write_bytes(out / "config.toml", cfg.to_toml().encode())
        atomic_write_bytes(out / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in metrics).encode())

    def save_checkpoint() -> None:
        if ddp.main:
            ck = {"learned": learned.state_dict(), "optimizer": opt.state_dict(), "rng": torch.get_rng_state(),
                  "run": run, "config": asdict(cfg)}
            atomic_torch_save(out / CHECKPOINT, ck)
        saved["step"] = run["step"]

    def validate() -> EvalResult | None:
        if val is None:
            return None
        mine = [val[i] for i in range(ddp.rank, len(val), ddp.world)]
        r = evaluate(model, mine, learned().detach(), batch_size=max(cfg.micro_bsz, 4), device=device)
        sums = ddp.sum_(torch.tensor([r.loss * r.n_tokens, r.accuracy * r.n_tokens, r.n_tokens], dtype=torch.float64))
        n = max(float(sums[2]), 1.0)
        return EvalResult(float(sums[0]) / n, float(sums[1]) / n, int(sums[2]))

    stop = {"requested": False}
    previous_handler = None
    if _is_main_thread():  # every rank: torchrun passes Ctrl-C to each worker, and they stop together
        def on_sigint(signum, frame):  # first Ctrl-C: finish the step, save, stop; second: abort
            if stop["requested"]:
                raise KeyboardInterrupt
            stop["requested"] = True
        previous_handler = signal.signal(signal.SIGINT, on_sigint)

    previous_kernel = wkv.set_backend("cuda" if use_cuda_kernels else None)
    bar = tqdm(total=total, initial=run["step"], desc="state tuning", unit="step", disable=not (progress and ddp.main))
    started, tokens_at_start = time.perf_counter(), run["tokens"]
    try:
        while run["step"] < total:
            step = run["step"]
            lr = lr_at(step, total, cfg)
            for group in opt.param_groups:
                group["lr"] = lr * group["lr_scale"]
            indices = global_batch_indices(step, len(data), global_bsz, cfg.seed)
            mine = indices[ddp.rank * cfg.micro_bsz * cfg.grad_accum : (ddp.rank + 1) * cfg.micro_bsz * cfg.grad_accum]
            micro = [collate([data[i] for i in mine[j : j + cfg.micro_bsz]]).to(device)
                     for j in range(0, len(mine), cfg.micro_bsz)]
            counts = ddp.sum_(torch.tensor([sum(b.n_trained for b in micro), sum(int(b.mask.sum()) for b in micro)],
                                           dtype=torch.float64))
            n_global, n_inputs = int(counts[0]), int(counts[1])
            opt.zero_grad(set_to_none=False)
            loss_sum = torch.zeros((), dtype=torch.float64)
            for batch in micro:
                loss, _ = batch_loss(model, batch, learned())
                (loss / max(n_global, 1)).backward()
                loss_sum += loss.detach().double().cpu()
            for p in learned.parameters():
                ddp.sum_(p.grad)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(learned.parameters(), cfg.grad_clip))
            loss_value = float(ddp.sum_(loss_sum)) / max(n_global, 1)
            _stop_unless_finite(step + 1, _non_finite(loss_value, grad_norm), cfg, out, saved["step"])
            opt.step()
            diverged = None if _all_finite(learned, opt) else "after the update the learned state is not finite"
            _stop_unless_finite(step + 1, diverged, cfg, out, saved["step"])
            run["step"] = step + 1
            run["tokens"] += n_inputs
            entry = {"step": run["step"], "loss": loss_value, "lr": lr, "grad_norm": grad_norm, "tokens": run["tokens"]}
            if val is not None and (run["step"] % cfg.val_every == 0 or run["step"] == total):
                r = validate()
                entry.update(val_loss=r.loss, val_accuracy=r.accuracy)
                run["final_val"] = r.loss
                if run["best_val"] is None or r.loss < run["best_val"]:
                    run["best_val"] = r.loss
                    if ddp.main:
                        best = _to_state(learned, spec, cfg, data, tokenizer.name, run, "best")
                        save_native(best, out / "best.safetensors")
            metrics.append(entry)
            if ddp.main:
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(entry) + "\n")
            elapsed = time.perf_counter() - started
            bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.3g}",
                            tok_s=f"{(run['tokens'] - tokens_at_start) / max(elapsed, 1e-9):.0f}")
            bar.update(1)
            if run["step"] % cfg.save_every == 0 or run["step"] == total:
                save_checkpoint()
            if _any(ddp, stop["requested"]):
                save_checkpoint()
                break
    finally:
        bar.close()
        wkv.set_backend(previous_kernel)
        if previous_handler is not None:
            signal.signal(signal.SIGINT, previous_handler)

    interrupted = run["step"] < total
    state = _to_state(learned, spec, cfg, data, tokenizer.name, run, "final")
    if ddp.main:
        save_native(state, out / "state.safetensors")
        for fmt in cfg.export:
            export_state(state, out / EXPORT_NAMES[fmt], fmt)
        plot_losses(metrics, out / "loss.png", title=f"{spec.name}: state tuning")
    ddp.barrier()
    seconds = time.perf_counter() - started
    final = EvalResult(run["final_val"], 0.0, 0) if run["final_val"] is not None else None
    speed = (run["tokens"] - tokens_at_start) / max(seconds, 1e-9)
    return TrainResult(out, state, run["step"], run["tokens"], final, run["best_val"], interrupted, speed)


def _recompute_for_budget(model, cfg: TrainConfig) -> int:
    """How many blocks recompute their activations so that a step stays within --memory-budget (or, with
    none given, within the memory the machine has free): 0 when everything fits."""
    cfg.validate()  # a direct caller gets the same refusal as train()
    budget = cfg.memory_budget * 2**30 if cfg.memory_budget is not None else memory.default_budget()
    if budget is None:
        return 0
    return memory.plan_recompute(model, cfg.micro_bsz, cfg.ctx_len, budget)


def _non_finite(loss: float, grad_norm: float) -> str | None:
    """Which of a step's numbers is NaN or infinite, if one is (checked before the optimizer uses them)."""
    if not math.isfinite(loss):
        return f"the loss is {loss}"
    if not math.isfinite(grad_norm):
        return f"the gradient norm is {grad_norm}"
    return None


@torch.no_grad()
def _all_finite(learned: LearnedState | EncodedState, opt: torch.optim.Optimizer) -> bool:
    """No NaN or infinity in the learned state, in what makes it (a state encoder) or in the optimizer's moments."""
    made = learned()
    tensors = [made.wkv, made.att_x, made.ffn_x, *learned.parameters()]
    tensors += [t for s in opt.state.values() for k, t in s.items() if k != "step" and isinstance(t, torch.Tensor)]
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())  # one device sync, not one each


def _stop_unless_finite(step: int, why: str | None, cfg: TrainConfig, out: Path, saved: int | None) -> None:
    """Stop the run before a non-finite number reaches a checkpoint or a state file."""
    if why is None:
        return
    kept = (f"the last good checkpoint, {out / CHECKPOINT} (step {saved}), is kept" if saved is not None
            else "no checkpoint had been written yet")
    raise StateHubError(f"step {step}: {why}; stopped without saving it, {kept}. Try a lower --lr-init "
                        f"(now {cfg.lr_init:g}) in a new --out")


def _resume(path: Path, cfg: TrainConfig, learned: LearnedState | EncodedState, opt: torch.optim.Optimizer) -> dict:
    """Load an interrupted run's checkpoint into `learned` and `opt`; returns its progress record. A truncated,
    foreign or edited file gets one line naming it."""
    ck = _read_resume_checkpoint(path)
    if ck["config"] != asdict(cfg):
        changed = sorted(str(k) for k in ck["config"] if ck["config"][k] != asdict(cfg).get(k))
        raise StateHubError(f"{path}: made with other options ({', '.join(changed)[:200]}); "
                            "resume with the same configuration or start a new --out")
    try:
        learned.load_state_dict(ck["learned"])
        opt.load_state_dict(ck["optimizer"])
        torch.set_rng_state(ck["rng"])
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
        reason = " ".join(str(e).split())[:160] or type(e).__name__
        raise StateHubError(f"{path}: does not fit this run ({reason}); start a new --out") from None
    for p in learned.parameters():
        state = opt.state.get(p)
        if state is None:  # Adam starts a parameter's moments at its first step
            continue
        moments = [state.get(k) for k in ("exp_avg", "exp_avg_sq")]
        if any(not isinstance(m, torch.Tensor) or m.shape != p.shape for m in moments) or not (
                isinstance(state.get("step"), torch.Tensor) and state["step"].numel() == 1):
            raise StateHubError(f"{path}: the optimizer's record does not match the learned state; start a new --out")
    if not _all_finite(learned, opt):
        raise StateHubError(f"{path}: the learned state or the optimizer's moments are not finite; start a new --out")
    return ck["run"]


def _read_resume_checkpoint(path: Path) -> dict:
    """The checkpoint's parts, each of the type train() writes (torch.load with weights_only: no code runs)."""
    try:
        ck, _ = load_untrusted(path)  # the checkpoint reader's bounds: cost set by the file's bytes
    except StateHubError as e:
        raise StateHubError(f"{e}; start a new --out") from None
    parts = {"learned": dict, "optimizer": dict, "rng": torch.Tensor, "run": dict, "config": dict}
    if not isinstance(ck, dict) or any(not isinstance(ck.get(k), kind) for k, kind in parts.items()):
        raise StateHubError(f"{path}: not a checkpoint of rwkv-state train (expected {', '.join(parts)}); "
                            "start a new --out")
    run = ck["run"]
    counts_ok = all(type(run.get(k)) is int and 0 <= run[k] <= 2**62 for k in ("step", "tokens"))
    losses_ok = all(run.get(k) is None or type(run.get(k)) is float for k in ("best_val", "final_val"))
    if not (counts_ok and losses_ok):
        raise StateHubError(f"{path}: damaged progress record (run = {_shown(run, toml=True)}); start a new --out")
    return ck


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _any(ddp: _Distributed, flag: bool) -> bool:
    """Stop together: one rank's Ctrl-C stops every rank at the same step."""
    return bool(ddp.sum_(torch.tensor([float(flag)])).item()) if ddp.world > 1 else flag


def _read_metrics(out: Path) -> list[dict]:
    """The metrics logged so far; a line torn by a crash is skipped, not the whole history."""
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
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


def _to_state(
    learned: LearnedState | EncodedState, spec, cfg: TrainConfig, data: Dataset, tokenizer: str, run: dict, which: str
) -> State:
    summary = {
        "method": "state-tuning" + (" (state encoder)" if cfg.state_encoder else ""),
        "which": which,
        "steps": run["step"],
        "tokens_seen": run["tokens"],
        "best_val_loss": run["best_val"],
        "final_val_loss": run["final_val"],
        "data_sha256": data.sha256,
        "data_files": [Path(p).name for p in cfg.data],
        "hyperparameters": {k: v for k, v in asdict(cfg).items() if k not in ("model", "data", "val_data", "out")},
    }
    return State.from_learned(learned, spec, tokenizer=tokenizer, training=summary)


def dry_run(cfg: TrainConfig) -> str:
    """Check model, tokenizer and data; describe one rendered sample and the cost. Trains nothing."""
    cfg.validate()
    spec, _ = read_checkpoint(cfg.model)
    tokenizer = get_tokenizer(cfg.tokenizer, spec)
    data = load_dataset(cfg.data, tokenizer, cfg.ctx_len, spec.vocab_size)
    val = load_dataset(cfg.val_data, tokenizer, cfg.ctx_len, spec.vocab_size) if cfg.val_data else None
    sample = data[0]
    rendered = []
    for tok, m in zip(sample.tokens, sample.mask, strict=True):
        piece = tokenizer.decode([tok])
        rendered.append(f"\x1b[1;32m{piece}\x1b[0m" if m else piece)
    longest = max(len(data[i].tokens) for i in range(min(len(data), 1000))) - 1
    B, T, C, L = cfg.micro_bsz, min(cfg.ctx_len, longest), spec.n_embd, spec.n_layer
    weight_bytes = spec.n_params * (2 if cfg.precision == "bf16" else 4)
    # activations kept for the backward pass: ~52 floats per channel per layer per token (measured, v6 and v7),
    # and one chunk of logits (the head and the loss run in chunks); see model.memory for the exact probe
    act_bytes = B * T * L * C * 52 * 4 // (L if cfg.grad_checkpoint else 1) + 2 * HEAD_CHUNK_BYTES
    lines = [
        f"model      {spec.name} ({spec.arch}, {spec.dims()}, vocab {spec.vocab_size})",
        f"tokenizer  {tokenizer.name}",
        f"data       {len(data)} samples, {data.n_tokens} tokens, {data.n_trained_tokens} trained"
        + (f", {data.n_truncated} truncated to {cfg.ctx_len + 1}" if getattr(data, "n_truncated", 0) else ""),
        f"val data   {len(val)} samples, {val.n_trained_tokens} trained tokens" if val else "val data   none",
        f"memory     about {(weight_bytes + act_bytes) / 2**20:.0f} MiB (weights {weight_bytes / 2**20:.0f} MiB)",
        f"sample     {sample.source} (trained tokens in green):",
        "".join(rendered),
    ]
    return "\n".join(lines)


def summary(result: TrainResult, cfg: TrainConfig) -> str:
    """The one screen printed at the end of a run: what came out and how to use it."""
    out = result.out
    lines = [
        "",
        f"{'Interrupted' if result.interrupted else 'Done'}: {result.steps} steps, {result.tokens} tokens, "
        f"{result.tokens_per_second:.0f} tokens/s",
    ]
    if result.best_val is not None:
        lines.append(f"validation loss: best {result.best_val:.4f}, last {result.final_val.loss:.4f}")
    lines += [
        f"state:    {out / 'state.safetensors'}" + (f"  (best: {out / 'best.safetensors'})" if result.best_val else ""),
        f"metrics:  {out / 'metrics.jsonl'}, {out / 'loss.png'}, config: {out / 'config.toml'}",
    ]
    if result.interrupted:
        lines.append(f"resume:   rwkv-state train --config {out / 'config.toml'} --resume")
    lines += [
        "use it:",
        f"  rwkv-state export {out / 'state.safetensors'} --format pth -o state.pth   "
        "# RWKV Runner (state-models/), RWKV-PEFT, rwkv pip via pip_state",
        f"  rwkv-state export {out / 'state.safetensors'} --format ai00 -o state.st   # Ai00: [[state]] in Config.toml",
        "  python: from rwkv_state_hub import load_model, load_state; "
        f"model = load_model({cfg.model!r}); state = load_state({str(out / 'state.safetensors')!r})",
    ]
    return "\n".join(lines)

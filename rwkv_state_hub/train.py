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
import signal
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from . import __version__, wkv
from .checkpoint import read_checkpoint
from .data import Dataset, collate, load_dataset
from .errors import StateHubError
from .evaluate import EvalResult, batch_loss, evaluate
from .files import atomic_write, atomic_write_bytes
from .formats import export_state, save_native
from .model import EncodedState, LearnedState, build_model, memory
from .model.common import HEAD_CHUNK_BYTES
from .plot import plot_losses
from .state import State
from .tokenizer import get_tokenizer
from .wkv import cuda as cuda_wkv

CHECKPOINT = "checkpoint.pt"
EXPORT_NAMES = {"pth": "state.pth", "ai00": "state.st", "safetensors": "state.safetensors"}
KERNELS = ("auto", "torch", "cuda")


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

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise StateHubError(f"{source}: unknown option {unknown[0]!r}")
        for key in ("data", "val_data"):
            if isinstance(d.get(key), str):
                d = {**d, key: [d[key]]}
        if isinstance(d.get("export"), str):
            d = {**d, "export": [x for x in d["export"].split(",") if x]}
        return cls(**d)

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
    """Run state tuning as configured; returns where the results are. Ctrl-C saves and returns."""
    device = _pick_device(cfg.device)
    ddp = _Distributed(device)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    if cfg.precision not in ("fp32", "bf16"):
        raise StateHubError(f"--precision {cfg.precision}: choose fp32 or bf16")
    if not (cfg.lr_init > 0 and cfg.lr_final > 0):
        raise StateHubError(f"--lr-init {cfg.lr_init} / --lr-final {cfg.lr_final}: both must be > 0 "
                            "(the decay is geometric; use a small --lr-final such as 1e-4 for 'almost zero')")
    if cfg.steps is not None and cfg.steps < 1:
        raise StateHubError(f"--steps {cfg.steps}: must be at least 1 (or leave it out to use --epochs)")
    for fmt in cfg.export:
        if fmt not in EXPORT_NAMES:
            raise StateHubError(f"--export {fmt}: choose from {', '.join(EXPORT_NAMES)}")
    if cfg.kernel not in KERNELS:
        raise StateHubError(f"--kernel {cfg.kernel}: choose from {', '.join(KERNELS)}")
    _check_memory_budget(cfg)
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

    if resume and (out / CHECKPOINT).exists():
        ck = torch.load(out / CHECKPOINT, map_location="cpu", weights_only=True)
        if ck["config"] != asdict(cfg):
            changed = sorted(k for k in ck["config"] if ck["config"][k] != asdict(cfg).get(k))
            raise StateHubError(f"{out / CHECKPOINT}: made with other options ({', '.join(changed)}); "
                                "resume with the same configuration or start a new --out")
        learned.load_state_dict(ck["learned"])
        opt.load_state_dict(ck["optimizer"])
        torch.set_rng_state(ck["rng"])
        run = ck["run"]
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
            atomic_write(out / CHECKPOINT, lambda p: torch.save(ck, p))

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
            opt.step()
            loss_value = float(ddp.sum_(loss_sum)) / max(n_global, 1)
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
    _check_memory_budget(cfg)
    budget = cfg.memory_budget * 2**30 if cfg.memory_budget is not None else memory.default_budget()
    if budget is None:
        return 0
    return memory.plan_recompute(model, cfg.micro_bsz, cfg.ctx_len, budget)


def _check_memory_budget(cfg: TrainConfig) -> None:
    """Checked before anything is loaded, and also where the budget goes unused (--grad-checkpoint, a GPU)."""
    if cfg.memory_budget is not None and not cfg.memory_budget > 0:
        raise StateHubError(f"--memory-budget {cfg.memory_budget}: must be a positive number of GiB")


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

"""Pretrain the bundled example RWKV-7 on the CPU: a small byte-level model of several distinct styles of text.

A model whose next byte depends on the style of its context is what lets a state select and hold a style.
Everything is fixed by this script: the data list (examples/pretrain/sources.toml, text from Debian packages),
the seed, the shape and the number of steps. It trains with rwkv_state_hub's own model code (every weight made
trainable, a plain cross-entropy over the logits), saves an exact-resume checkpoint every few minutes and on
Ctrl-C (run the same command again to continue), and at the end writes the model in BlinkDL's official
layout in bf16, prints the held-out loss per byte of every style, and checks that the `rwkv` pip package
computes the same logits from the file.

    apt-get install bible-kjv dict-jargon dict-devil python3.11-doc libpython3.11-stdlib
    .venv/bin/python examples/pretrain_example_model.py --steps 1000      # the real run (resumable)
    .venv/bin/python examples/pretrain_example_model.py --tiny --steps 50 # a quick check of the whole path
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path

os.environ.setdefault("RWKV_JIT_ON", "0")  # the rwkv pip package reads these at import
os.environ.setdefault("RWKV_CUDA_ON", "0")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from pretrain.corpus import Mixture, build_data, eval_windows, load_styles, style_sha256  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

from rwkv_state_hub.checkpoint import spec_from_state_dict  # noqa: E402
from rwkv_state_hub.errors import StateHubError  # noqa: E402
from rwkv_state_hub.files import atomic_torch_save, atomic_write_bytes  # noqa: E402
from rwkv_state_hub.model import RWKV, build_model, load_model, v7  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
VOCAB = 256  # bytes
HEAD_SIZE = 64


@dataclass
class Config:
    """Everything that decides the trained weights; a checkpoint resumes only under the same values."""

    n_layer: int = 4
    n_embd: int = 256
    ctx: int = 512
    batch: int = 8
    steps: int = 1000
    lr: float = 2e-3
    lr_final: float = 1e-4
    warmup: int = 50
    weight_decay: float = 0.01
    seed: int = 0
    bf16: bool = True  # bf16 matrix products (see bf16_matmuls): ~30% faster than fp32 on our 2-core CPU


TINY = {"n_layer": 2, "n_embd": 64, "ctx": 64, "batch": 4, "warmup": 2}  # --tiny: a model of ~0.2 MB, for checks


def lora_rank(n_embd: int, factor: float) -> int:
    """RWKV-LM's suggested LoRA widths for RWKV-7 (max(32, factor * sqrt(C)) rounded to a multiple of 32)."""
    return max(32, round(factor * n_embd**0.5 / 32) * 32)


def init_weights(n_layer: int, n_embd: int, seed: int) -> dict[str, Tensor]:
    """A fresh RWKV-7 in the official layout, fp32, initialised as RWKV-LM's RWKV-v7 train_temp does (our own
    code, its values): per-channel token-shift mixes and decay curves that vary with depth, zero output and
    FFN value matrices (each block starts as the identity), orthogonal matrices, a tiny embedding."""
    g = torch.Generator().manual_seed(seed)
    C, N, L = n_embd, HEAD_SIZE, n_layer
    ch = torch.arange(C, dtype=torch.float64)
    ramp = ch / (C - 1) - 0.5                                  # -0.5 .. 0.5 over the channels
    zigzag = ((ch % N) - (N - 1) / 2) / ((N - 1) / 2)
    zigzag = zigzag * zigzag.abs()                             # -1 .. 1 within each head

    def ortho(rows: int, cols: int, gain: float) -> Tensor:
        return nn.init.orthogonal_(torch.empty(rows, cols), gain=gain, generator=g)

    def vec(t: Tensor) -> Tensor:
        return t.float().reshape(1, 1, C)

    sd = {"emb.weight": torch.empty(VOCAB, C).uniform_(-1e-4, 1e-4, generator=g)}
    for i in range(L):
        b, a, f = f"blocks.{i}.", f"blocks.{i}.att.", f"blocks.{i}.ffn."
        depth, shallow = i / max(1, L - 1), 1.0 - i / L       # 0 -> 1 and 1 -> ~0 over the layers
        for ln in ("ln0", "ln1", "ln2") if i == 0 else ("ln1", "ln2"):
            sd[b + ln + ".weight"], sd[b + ln + ".bias"] = torch.ones(C), torch.zeros(C)
        for name, power in (("r", 0.2), ("w", 0.9), ("k", 0.7), ("v", 0.7), ("a", 0.9), ("g", 0.2)):
            sd[a + f"x_{name}"] = vec(1.0 - (ch / C) ** (power * shallow))
        sd[a + "w0"] = vec(-6 + 6 * (ch / (C - 1)) ** (1 + depth**0.3) + 0.5 + zigzag * 2.5)
        sd[a + "a0"] = vec(-0.19 + zigzag * 0.3 + ramp * 0.4)
        if i > 0:
            sd[a + "v0"] = vec(0.73 - ramp * 0.4)
        for name, factor in (("w", 2.5), ("a", 2.5), ("v", 1.7), ("g", 5.0)):
            if name != "v" or i > 0:
                rank = lora_rank(C, factor)
                sd[a + f"{name}1"], sd[a + f"{name}2"] = torch.zeros(C, rank), ortho(rank, C, 0.1)
        sd[a + "k_k"], sd[a + "k_a"] = vec(0.71 - ramp * 0.1), vec(torch.full((C,), 1.02))
        sd[a + "r_k"] = torch.full((C // N, N), -0.04)
        sd[a + "receptance.weight"], sd[a + "key.weight"] = ortho(C, C, 1.0), ortho(C, C, 0.1)
        sd[a + "value.weight"], sd[a + "output.weight"] = ortho(C, C, 1.0), torch.zeros(C, C)
        sd[a + "ln_x.weight"], sd[a + "ln_x.bias"] = torch.full((C,), ((1 + i) / L) ** 0.7), torch.zeros(C)
        sd[f + "x_k"] = vec(1.0 - (ch / C) ** (shallow**4))
        sd[f + "key.weight"], sd[f + "value.weight"] = ortho(4 * C, C, 1.0), torch.zeros(C, 4 * C)
    sd["ln_out.weight"], sd["ln_out.bias"] = torch.ones(C), torch.zeros(C)
    sd["head.weight"] = ortho(VOCAB, C, 0.5 * math.sqrt(VOCAB / C) if VOCAB > C else 0.5)
    return sd


def trainable_model(weights: dict[str, Tensor]) -> RWKV:
    """Our (frozen by design) model with every weight made trainable: state tuning freezes them, we do not."""
    model = build_model(spec_from_state_dict(weights), weights)
    for p in model.parameters():
        p.requires_grad_(True)
    return model.train()


def official_weights(model: RWKV, shapes: dict[str, torch.Size], dtype: torch.dtype) -> dict[str, Tensor]:
    """The model's weights back in the checkpoint's key layout and shapes (the model stores [1, 1, C] as [C])."""
    params = dict(model.named_parameters())
    if params.keys() != shapes.keys():
        raise RuntimeError(f"model and checkpoint keys differ: {sorted(params.keys() ^ shapes.keys())[:5]}")
    return {k: params[k].detach().reshape(shape).to(dtype).contiguous() for k, shape in shapes.items()}


def make_optimizer(model: RWKV, cfg: Config) -> torch.optim.AdamW:
    """AdamW as RWKV-LM groups it: weight decay on the matrices only, the decay base w0 at twice the lr."""
    groups: dict[str, list] = {"decay": [], "plain": [], "w0": []}
    for name, p in model.named_parameters():
        key = "w0" if name.endswith("att.w0") else "decay" if name.endswith(".weight") and p.dim() == 2 else "plain"
        groups[key].append(p)
    return torch.optim.AdamW([
        {"params": groups["decay"], "weight_decay": cfg.weight_decay, "lr_scale": 1.0},
        {"params": groups["plain"], "weight_decay": 0.0, "lr_scale": 1.0},
        {"params": groups["w0"], "weight_decay": 0.0, "lr_scale": 2.0},
    ], lr=cfg.lr, betas=(0.9, 0.99), eps=1e-8)


def lr_at(step: int, cfg: Config) -> float:
    """Linear warmup, then cosine from lr to lr_final at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr_final + 0.5 * (cfg.lr - cfg.lr_final) * (1 + math.cos(math.pi * min(1.0, progress)))


@contextmanager
def bf16_matmuls(enabled: bool) -> Iterator[None]:
    """bf16 autocast for the matrix products, the WKV recurrence kept in fp32 (its chunked form scales by
    decays of up to e^G, and its state chains through every chunk; RWKV-LM's kernels also keep the state in
    fp32). The library has no switch for this, so v7's wkv7 is wrapped while the context lasts."""
    if not enabled:
        yield
        return
    inner = v7.wkv7

    def wkv7_fp32(*args: Tensor) -> tuple[Tensor, Tensor]:
        with torch.autocast("cpu", enabled=False):
            return inner(*args)

    v7.wkv7 = wkv7_fp32
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yield
    finally:
        v7.wkv7 = inner


def byte_loss(model: RWKV, tokens: Tensor, bf16: bool = False) -> Tensor:
    """Mean cross-entropy (nats per byte) of predicting tokens[:, 1:] from tokens[:, :-1]."""
    with bf16_matmuls(bf16):
        logits, _ = model(tokens[:, :-1])
    return F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())


class Stop:
    """Ctrl-C / SIGTERM ask the loop to stop after the current step and save; a second one stops at once."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum: int, _frame) -> None:
        self.reason = signal.Signals(signum).name
        self.restore()

    def restore(self) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)


@dataclass
class Run:
    """Where one named run keeps its files, and what it has done so far."""

    cfg: Config
    folder: Path
    data_sha: dict[str, str]
    step: int = 0
    wall_s: float = 0.0  # training time, summed over every resumed session

    @property
    def ckpt(self) -> Path:
        return self.folder / "checkpoint.pt"

    def save(self, model: RWKV, opt: torch.optim.Optimizer) -> None:
        atomic_torch_save(self.ckpt, {"config": asdict(self.cfg), "data": self.data_sha, "step": self.step,
                                      "wall_s": self.wall_s, "model": model.state_dict(),
                                      "optimizer": opt.state_dict()})

    @property
    def log(self) -> Path:
        return self.folder / "log.jsonl"

    def trim_log(self) -> None:
        """Drop loss-log lines past the checkpoint (a run killed between saves): they will be logged again."""
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        self.log.write_text("".join(line + "\n" for line in lines if json.loads(line)["step"] <= self.step))

    def resume(self, model: RWKV, opt: torch.optim.Optimizer) -> None:
        """Continue from the checkpoint if there is one; refuse one made with other settings or data."""
        if not self.ckpt.exists():
            self.trim_log()
            return
        saved = torch.load(self.ckpt, weights_only=True, map_location="cpu")
        changed = [f"{k} {saved['config'].get(k)} -> {v}" for k, v in asdict(self.cfg).items()
                   if saved["config"].get(k) != v]
        if saved["data"] != self.data_sha:
            changed.append("the training text")
        if changed:
            raise StateHubError(f"{self.ckpt}: made with other settings ({'; '.join(changed)}); "
                                f"delete it or choose another --run-dir")
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        self.step, self.wall_s = saved["step"], saved["wall_s"]
        self.trim_log()
        print(f"resuming {self.ckpt} at step {self.step} ({self.wall_s / 60:.1f} min trained so far)")


def train_step(model: RWKV, opt: torch.optim.Optimizer, tokens: Tensor, lr: float, bf16: bool) -> float:
    """One AdamW step on one batch, gradients clipped to norm 1 as RWKV-LM does; returns the loss."""
    for group in opt.param_groups:
        group["lr"] = lr * group["lr_scale"]
    loss = byte_loss(model, tokens, bf16)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.item()


def train(run: Run, model: RWKV, opt: torch.optim.Optimizer, mixture: Mixture, save_every_s: float,
          stop_after: int | None) -> str | None:
    """Step until cfg.steps (None) or until stopped (the reason: SIGINT, SIGTERM, --stop-after), saving a
    checkpoint every save_every_s seconds and when it stops. Appends the mean loss of every 10 steps to
    log.jsonl."""
    cfg, first, wall_before = run.cfg, run.step, run.wall_s
    stop, log, recent = Stop(), run.log.open("a"), []
    bar = tqdm(total=cfg.steps, initial=run.step, unit="step", dynamic_ncols=True)
    started = last_save = time.monotonic()
    try:
        while run.step < cfg.steps:
            recent.append(train_step(model, opt, mixture.batch(run.step, cfg.batch), lr_at(run.step, cfg), cfg.bf16))
            run.step += 1
            now = time.monotonic()
            run.wall_s = wall_before + now - started
            tok_s = (run.step - first) * cfg.batch * cfg.ctx / max(1e-9, now - started)
            bar.update(1)
            bar.set_postfix(loss=f"{sum(recent[-20:]) / len(recent[-20:]):.3f}", tok_s=f"{tok_s:.0f}")
            if run.step % 10 == 0 or run.step == cfg.steps:
                log.write(json.dumps({"step": run.step, "loss": round(sum(recent) / len(recent), 4),
                                      "lr": lr_at(run.step - 1, cfg), "wall_s": round(run.wall_s, 1)}) + "\n")
                log.flush()
                recent = []
            halt = stop.reason or (stop_after is not None and run.step - first >= stop_after)
            if halt or now - last_save >= save_every_s or run.step == cfg.steps:
                run.save(model, opt)
                last_save = now
            if halt:
                reason = stop.reason or "--stop-after"
                print(f"\nstopped at step {run.step} ({reason}); checkpoint {run.ckpt}; run the same command to go on")
                return reason
        return None
    finally:
        stop.restore()
        bar.close()
        log.close()


@torch.no_grad()
def held_out_loss(model: RWKV, text: bytes, ctx: int, windows: int) -> float:
    """Mean loss per byte (nats) over fixed windows of a held-out text, from the zero state."""
    batches = eval_windows(text, ctx, windows).split(8)
    return sum(byte_loss(model, b).item() * len(b) for b in batches) / sum(len(b) for b in batches)


@torch.no_grad()
def greedy(model: RWKV, prompt: bytes, n: int) -> bytes:
    """Greedy continuation of a prompt, byte by byte in RNN mode."""
    logits, state = model(torch.tensor([list(prompt)]))
    out = []
    for _ in range(n):
        out.append(int(logits[0, -1].argmax()))
        logits, state = model(torch.tensor([[out[-1]]]), state)
    return bytes(out)


@torch.no_grad()
def pip_difference(path: Path, text: bytes) -> float:
    """Max |our logits - the rwkv pip package's| (both fp32) over a text read from the written file."""
    from rwkv_state_hub.pip_bridge import load_pip_model

    tokens = list(text)
    ours, _ = load_model(path, dtype=torch.float32)(torch.tensor([tokens]))
    theirs, _ = load_pip_model(path, "cpu fp32").forward(tokens, None, full_output=True)
    return (ours[0] - theirs).abs().max().item()


def report(path: Path, cfg: Config, styles: dict[str, dict[str, dict[str, bytes]]], windows: int) -> dict:
    """Held-out loss per byte of every style (pretrained and kept out), a greedy continuation of each style's
    first held-out bytes, and the pip check: all computed from the written file."""
    model = load_model(path, dtype=torch.float32)  # bf16 weights widened exactly: the logits pip computes
    losses, samples = {}, {}
    for role, group in styles.items():
        for name, text in group.items():
            label = name if role == "pretrain" else f"{name} (kept out)"
            losses[label] = round(held_out_loss(model, text["val"], cfg.ctx, windows), 4)
            prompt = text["val"][:64]
            samples[label] = (prompt + b"|" + greedy(model, prompt, 120)).decode("utf-8", errors="replace")
    first = next(iter(styles["pretrain"].values()))["val"][: min(cfg.ctx, 256)]
    return {"held_out_loss_per_byte": losses, "pip_max_abs_logit_diff": pip_difference(path, first),
            "greedy_samples": samples}


def describe_data(data_dir: Path, styles: dict[str, dict[str, dict[str, bytes]]]) -> list:
    """Print (and return) what the run trains on: sources.json when the data was built from packages."""
    manifest = data_dir / "sources.json"
    record = json.loads(manifest.read_text()) if manifest.exists() else [
        {"name": n, "role": role, "train_bytes": len(t["train"]), "val_bytes": len(t["val"])}
        for role, group in styles.items() for n, t in group.items()]
    print(f"data: {data_dir}")
    for s in record:
        origin = ", ".join(f"{k} {v}" for k, v in s.get("packages", {}).items()) or "given"
        print(f"  {s['role']:<8} {s['name']:<8} {s['train_bytes']:>9,} + {s['val_bytes']:>7,} held-out bytes  "
              f"{s.get('licence', '')}  [{origin}]")
    return record


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, default=REPO / "runs" / "pretrain-data",
                   help="extracted text, DIR/pretrain/STYLE/{train,val}.txt and DIR/states/STYLE/...; built from "
                        "the installed packages of examples/pretrain/sources.toml when DIR/pretrain is missing")
    p.add_argument("--out", type=Path,
                   help="the model file (default rwkv_state_hub/examples/models/rwkv7-example-L<n>-D<c>.pth)")
    p.add_argument("--run-dir", type=Path, help="checkpoint, loss log, summary (default runs/pretrain/<model>)")
    p.add_argument("--tiny", action="store_true", help=f"a tiny shape for quick checks: {TINY}")
    for f in fields(Config):
        kind = argparse.BooleanOptionalAction if f.type == "bool" else None
        p.add_argument("--" + f.name.replace("_", "-"), default=None, action=kind,
                       type=None if kind else {"int": int, "float": float}[f.type], help=f"default {f.default}")
    p.add_argument("--save-minutes", type=float, default=10.0, help="checkpoint every N minutes (default 10)")
    p.add_argument("--stop-after", type=int, help="stop, saving a checkpoint, after this many steps this session")
    p.add_argument("--eval-windows", type=int, default=32, help="held-out windows of ctx bytes per style")
    return p.parse_args(argv)


def config_from(args: argparse.Namespace) -> Config:
    given = {f.name: getattr(args, f.name) for f in fields(Config) if getattr(args, f.name) is not None}
    cfg = Config(**((TINY if args.tiny else {}) | given))
    positive = ("n_layer", "n_embd", "ctx", "batch", "steps", "lr")
    bad = [f"--{k.replace('_', '-')} {getattr(cfg, k)} must be > 0" for k in positive if getattr(cfg, k) <= 0]
    if cfg.n_embd % HEAD_SIZE:
        bad.append(f"--n-embd {cfg.n_embd} must be a multiple of the head size {HEAD_SIZE}")
    if not 0 <= cfg.lr_final <= cfg.lr or cfg.warmup < 0 or cfg.weight_decay < 0:
        bad.append("need 0 <= --lr-final <= --lr, --warmup >= 0 and --weight-decay >= 0")
    if args.eval_windows <= 0 or args.save_minutes <= 0 or (args.stop_after is not None and args.stop_after <= 0):
        bad.append("--eval-windows, --save-minutes and --stop-after must be > 0")
    if bad:
        raise StateHubError("; ".join(bad))
    return cfg


def pretrain(args: argparse.Namespace) -> int:
    cfg = config_from(args)
    if not (args.data_dir / "pretrain").is_dir():
        print(f"building {args.data_dir} from the installed packages of examples/pretrain/sources.toml")
        build_data(args.data_dir)
    styles = {role: load_styles(args.data_dir, role) for role in ("pretrain", "states")}
    sources = describe_data(args.data_dir, styles)
    out = args.out or REPO / "rwkv_state_hub/examples/models" / f"rwkv7-example-L{cfg.n_layer}-D{cfg.n_embd}.pth"
    run = Run(cfg, args.run_dir or REPO / "runs" / "pretrain" / out.stem,
              {name: style_sha256(args.data_dir / "pretrain" / name) for name in styles["pretrain"]})
    run.folder.mkdir(parents=True, exist_ok=True)
    weights = init_weights(cfg.n_layer, cfg.n_embd, cfg.seed)
    shapes = {k: v.shape for k, v in weights.items()}
    model = trainable_model(weights)
    opt = make_optimizer(model, cfg)
    run.resume(model, opt)
    mixture = Mixture({name: t["train"] for name, t in styles["pretrain"].items()}, cfg.ctx, cfg.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: RWKV-7, {n_params:,} parameters ({2 * n_params / 1e6:.1f} MB in bf16); {cfg}")
    stopped = train(run, model, opt, mixture, args.save_minutes * 60, args.stop_after)
    if stopped:
        return 130 if stopped.startswith("SIG") else 0
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(out, official_weights(model, shapes, torch.bfloat16))
    summary = {"model": str(out), "parameters": n_params, "config": asdict(cfg), "steps": run.step,
               "tokens": run.step * cfg.batch * cfg.ctx, "wall_minutes": round(run.wall_s / 60, 1),
               "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "load_average": os.getloadavg(),
               "data": sources, **report(out, cfg, styles, args.eval_windows)}
    atomic_write_bytes(run.folder / "summary.json", (json.dumps(summary, indent=1) + "\n").encode())
    print(f"wrote {out}: {run.step} steps, {summary['tokens']:,} bytes seen, {summary['wall_minutes']} min of training")
    print("held-out loss per byte (nats), from the zero state:")
    for name, loss in summary["held_out_loss_per_byte"].items():
        print(f"  {name:<20} {loss:.4f}")
    print(f"max |our logits - rwkv pip's| (fp32): {summary['pip_max_abs_logit_diff']:.2e}")
    for name, text in summary["greedy_samples"].items():
        print(f"--- {name}: the first 64 held-out bytes | greedy\n{text}")
    print(f"summary: {run.folder / 'summary.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return pretrain(args)
    except StateHubError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""What the training benchmarks share: a random RWKV-7 of a named shape, random token samples, and one
`rwkv-state train` process measured from outside.

Peak RSS is the whole process's, start-up to exit: a small parent runs the one child and reads
getrusage(RUSAGE_CHILDREN), so nothing of the benchmark's own memory is counted.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from rwkv_state_hub.random_model import random_checkpoint, save_checkpoint

SHAPES = {"0.1b": dict(n_layer=12, n_embd=768), "0.4b": dict(n_layer=24, n_embd=1024),
          "1.5b": dict(n_layer=24, n_embd=2048)}
VOCAB = 65536
# the matrices' kind -> train's --precision and --quant
KINDS = {"fp32": ("fp32", None), "bf16": ("bf16", None), "int8": ("bf16", "int8"), "nf4": ("bf16", "nf4")}
REPO = Path(__file__).resolve().parents[1]
_MEASURE = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, rc)")


def random_model(shape: str, folder: Path) -> Path:
    """A bf16 random RWKV-7 checkpoint of `shape` (vocab 65536, head size 64), as the official ones are stored."""
    model = folder / f"rwkv7-{shape}-shape.pth"
    save_checkpoint(random_checkpoint("v7", seed=0, dtype=torch.bfloat16, head_size=64, vocab_size=VOCAB,
                                      **SHAPES[shape]), model)
    return model


def token_samples(folder: Path, ctx: int, samples: int) -> Path:
    """A .jsonl of `samples` random samples of `ctx` tokens, every token trained on."""
    path = folder / f"tokens-{ctx}x{samples}.jsonl"
    g = torch.Generator().manual_seed(ctx)
    with path.open("w") as f:
        for _ in range(samples):
            tokens = torch.randint(0, VOCAB, (ctx,), generator=g).tolist()
            f.write(json.dumps({"tokens": tokens, "mask": [1] * ctx}) + "\n")
    return path


@dataclass
class Run:
    """One measured `rwkv-state train` process."""

    peak_mib: float
    metrics: dict | None  # the last line of metrics.jsonl; None when it failed
    error: str  # the last line it printed on failure ('' when it succeeded): a refusal names the least budget
    stderr: str

    @property
    def ok(self) -> bool:
        return self.metrics is not None


def kind_options(kind: str) -> list[str]:
    """train's options for matrices of `kind` (KINDS)."""
    precision, quant = KINDS[kind]
    return ["--precision", precision, *(["--quant", quant] if quant else [])]


def least_named(run: Run) -> float | None:
    """The least --memory-budget (GiB) a refused run named, or None when it was not refused for memory."""
    found = re.search(r"the least that would work is --memory-budget ([0-9.]+)", run.error)
    return float(found.group(1)) if found else None


def train(args: list[str], out: Path, env: dict[str, str] | None = None) -> Run:
    """Run `rwkv-state train --out out *args` in its own process with an empty model-hash cache (each run pays
    what a first run pays) and measure its whole peak RSS."""
    cmd = [sys.executable, "-m", "rwkv_state_hub.cli", "train", "--out", str(out), *args]
    env = {**os.environ, **(env or {}), "RWKV_STATE_HUB_CACHE": str(out) + "-cache"}
    proc = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], capture_output=True, text=True, env=env, cwd=REPO)
    kib, rc = proc.stdout.split()[-2:]
    if rc != "0":
        lines = proc.stderr.strip().splitlines() or [f"exit status {rc}"]
        return Run(int(kib) / 1024, None, lines[-1], proc.stderr)
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    return Run(int(kib) / 1024, last, "", proc.stderr)

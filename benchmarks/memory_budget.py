"""Does `rwkv-state train --memory-budget B` hold for the whole process? One run: for budgets from the weights
+ 0.5 GiB up, the whole `rwkv-state train` process's peak RSS (start-up, loading, data, steps, validation,
checkpoint and exports), read from outside, against B; and a budget too small, refused before loading.

    .venv/bin/python benchmarks/memory_budget.py                  # random RWKV-7 of the 0.1B shape, fp32
    .venv/bin/python benchmarks/memory_budget.py --precision bf16 --ctx 2048

Each run is its own process (measured as benchmarks/quant.py does: the parent's getrusage of its one child).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quant import MEASURE, REPO, SHAPES, random_model  # noqa: E402

from rwkv_state_hub.checkpoint import read_checkpoint  # noqa: E402
from rwkv_state_hub.training.budget import GIB, held_weight_bytes  # noqa: E402


def run(model: Path, data: Path, out: Path, args, budget: float | None) -> tuple[float, str, float | None]:
    """(peak RSS MiB, the last line it printed on error or '', tokens/s) of one `rwkv-state train` process."""
    cmd = [sys.executable, "-m", "rwkv_state_hub.cli", "train", "--model", str(model), "--data", str(data),
           "--val-data", str(data), "--out", str(out), "--steps", str(args.steps), "--ctx-len", str(args.ctx),
           "--precision", args.precision, "--save-every", "1", "--val-every", str(args.steps), "--seed", "1",
           "--export", "pth,ai00", *(["--memory-budget", f"{budget:.3f}"] if budget else [])]
    env = {**os.environ, "RWKV_STATE_HUB_CACHE": str(out) + "-cache"}  # each run hashes the model, as a first run does
    proc = subprocess.run([sys.executable, "-c", MEASURE, *cmd], capture_output=True, text=True, env=env, cwd=REPO)
    kib, rc = proc.stdout.split()[-2:]
    if rc != "0":
        return int(kib) / 1024, proc.stderr.strip().splitlines()[-1], None
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    return int(kib) / 1024, "", last["tokens_per_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=SHAPES, default="0.1b")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--above", type=float, nargs="+", default=[0.5, 1.0, 1.2, 1.5, 2.0],
                   help="budgets to try, in GiB above the weights as held")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model, data = random_model(args.shape, folder, args.ctx, 2 * args.steps)
        held = held_weight_bytes(read_checkpoint(model)[1], args.precision, None) / GIB
        print(f"random RWKV-7 of the {args.shape.upper()} shape, --precision {args.precision}: weights held "
              f"{held:.2f} GiB; ctx {args.ctx}, micro-batch 1, {args.steps} steps, validation, a checkpoint each "
              "step, pth and ai00 exports")
        print(f"{'--memory-budget GiB':>20} {'peak RSS MiB':>13} {'peak / budget':>14} {'tokens/s':>9}  result")
        for above in [None, 0.1, *args.above]:
            budget = None if above is None else held + above
            peak, error, speed = run(model, data, folder / f"run-{above}", args, budget)
            shown = "none" if budget is None else f"{budget:.2f} (w+{above})"
            ratio = "" if budget is None else f"{peak / (budget * 1024):.2f}"
            result = error or ("within" if budget is None or peak <= budget * 1024 else "EXCEEDED")
            rate = f"{speed:.1f}" if speed else "-"
            print(f"{shown:>20} {peak:>13.0f} {ratio:>14} {rate:>9}  {result}", flush=True)


if __name__ == "__main__":
    main()

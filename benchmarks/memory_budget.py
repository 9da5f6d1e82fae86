"""Does `rwkv-state train --memory-budget B` hold for the whole process? One run: for each kind of matrices, a
budget too small (refused before loading, naming the least that would work), a run at exactly that least, and
budgets from the weights + 0.5 GiB up; each the whole `rwkv-state train` process's peak RSS (start-up, loading,
data, steps, validation, checkpoint and exports), read from outside, against B.

    .venv/bin/python benchmarks/memory_budget.py                  # random RWKV-7 of the 0.1B shape, every kind
    .venv/bin/python benchmarks/memory_budget.py --shape 0.4b --kinds fp32,nf4 --ctx 2048

Each run is its own process (benchmarks/measured.py: the parent's getrusage of its one child).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import measured  # noqa: E402
from measured import KINDS, SHAPES, Run, least_named  # noqa: E402

from rwkv_state_hub.checkpoint import read_checkpoint  # noqa: E402
from rwkv_state_hub.training.budget import GIB, held_weight_bytes  # noqa: E402


def run(model: Path, data: Path, out: Path, args, kind: str, budget: float | None) -> Run:
    """One measured `rwkv-state train` process: steps, validation, a checkpoint each step and two exports."""
    return measured.train(["--model", str(model), "--data", str(data), "--val-data", str(data),
                           "--steps", str(args.steps), "--ctx-len", str(args.ctx), *measured.kind_options(kind),
                           "--save-every", "1", "--val-every", str(args.steps), "--seed", "1", "--export", "pth,ai00",
                           *(["--memory-budget", f"{budget:.3f}"] if budget else [])], out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=SHAPES, default="0.1b")
    p.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, from {', '.join(KINDS)}")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--above", type=float, nargs="*", default=[0.5, 1.0, 2.0],
                   help="budgets to try, in GiB above the weights as held")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = measured.random_model(args.shape, folder)
        data = measured.token_samples(folder, args.ctx, 2 * args.steps)
        weights = read_checkpoint(model)[1]
        print(f"random RWKV-7 of the {args.shape.upper()} shape (bf16 checkpoint); ctx {args.ctx}, micro-batch 1, "
              f"{args.steps} steps, validation, a checkpoint each step, pth and ai00 exports")
        print(f"{'matrices':<8} {'held GiB':>8} {'--memory-budget GiB':>22} {'peak RSS MiB':>13} {'peak / budget':>14} "
              f"{'tokens/s':>9}  result")
        for kind in args.kinds.split(","):
            held = held_weight_bytes(weights, *KINDS[kind]) / GIB
            budgets: list[tuple[str, float | None]] = [("none", None), ("w+0.1", held + 0.1)]
            for label, budget in budgets + [(f"w+{a:g}", held + a) for a in args.above]:
                r = run(model, data, folder / f"run-{kind}-{label}", args, kind, budget)
                shown = "none" if budget is None else f"{budget:.2f} ({label})"
                ratio = "" if budget is None else f"{r.peak_mib / (budget * 1024):.2f}"
                result = r.error[-110:] or ("within" if budget is None or r.peak_mib <= budget * 1024 else "EXCEEDED")
                rate = f"{r.metrics['tokens_per_s']:.1f}" if r.ok else "-"
                print(f"{kind:<8} {held:>8.2f} {shown:>22} {r.peak_mib:>13.0f} {ratio:>14} {rate:>9}  {result}",
                      flush=True)
                least = least_named(r) if label == "w+0.1" else None
                if least is not None:  # the named least itself: it must run, within it
                    r = run(model, data, folder / f"run-{kind}-least", args, kind, least)
                    result = r.error[-110:] or ("within" if r.peak_mib <= least * 1024 else "EXCEEDED")
                    rate = f"{r.metrics['tokens_per_s']:.1f}" if r.ok else "-"
                    print(f"{kind:<8} {held:>8.2f} {f'{least:.2f} (named least)':>22} {r.peak_mib:>13.0f} "
                          f"{r.peak_mib / (least * 1024):>14.2f} {rate:>9}  {result}", flush=True)


if __name__ == "__main__":
    main()

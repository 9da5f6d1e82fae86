"""Which model fits your machine, and how long an epoch takes: `rwkv-state train` on RWKV-7 of the 0.1B, 0.4B
and 1.5B shapes with fp32, bf16, int8 and nf4 matrices, tokens/s and whole-process peak RSS with and without
`--memory-budget` (the weights as held + 1 GiB, or where that is refused the least the refusal names), then
long contexts (16k, 64k) under that budget. One run.

    .venv/bin/python benchmarks/scale.py --png docs/scale.png          # everything: about an hour on 2 cores
    .venv/bin/python benchmarks/scale.py --shapes 0.1b --kinds bf16,nf4 --long-ctx 16384

Every figure is one `rwkv-state train` process on a random bf16 checkpoint of the shape (vocab 65536, head
size 64) and random tokens, measured as benchmarks/quant.py does: peak RSS is the process's whole peak read
from outside (the parent's getrusage of its one child), tokens/s the run's own over all its steps. A budget
that cannot be met is refused before loading, naming the least that would work: the table shows that name and
the run at it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import measured  # noqa: E402
from measured import KINDS, SHAPES, Run, least_named  # noqa: E402

from rwkv_state_hub.bench import matmul_gflops  # noqa: E402
from rwkv_state_hub.checkpoint import read_checkpoint  # noqa: E402
from rwkv_state_hub.plot import save_bar_charts  # noqa: E402
from rwkv_state_hub.training.budget import GIB, held_weight_bytes  # noqa: E402

HEADROOM_GIB = 1.0
EPOCH_TOKENS = 10_000_000


def train(model: Path, data: Path, out: Path, kind: str, ctx: int, steps: int, budget: float | None) -> Run:
    """One measured `rwkv-state train` process with the matrices of `kind`, under `budget` GiB if given."""
    return measured.train(["--model", str(model), "--data", str(data), "--steps", str(steps), "--ctx-len", str(ctx),
                           "--warmup-steps", "0", "--save-every", str(steps), "--seed", "1",
                           *measured.kind_options(kind),
                           *(["--memory-budget", f"{budget:.3f}"] if budget else [])], out)


def cell(r: Run) -> str:
    if not r.ok:
        least = least_named(r)
        return f"w+{HEADROOM_GIB:g} refused, named {least:g}" if least is not None else f"failed: {r.error[-80:]}"
    return f"{r.metrics['tokens_per_s']:.1f} tok/s, {r.peak_mib / 1024:.2f} GiB"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, from {', '.join(SHAPES)}")
    p.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, from {', '.join(KINDS)}")
    p.add_argument("--steps", type=int, default=3, help="steps of each ctx-512 run")
    p.add_argument("--long-ctx", default="16384,65536", help="context lengths run for one step under the budget")
    p.add_argument("--long-shapes", default="0.1b", help="the shapes that run the long contexts")
    p.add_argument("--long-kinds", default="bf16", help="the kinds of matrices that run the long contexts")
    p.add_argument("--png", help="draw tokens/s and peak RSS per shape and kind into this PNG")
    args = p.parse_args()
    shapes, kinds = args.shapes.split(","), args.kinds.split(",")
    long_ctx = [int(c) for c in args.long_ctx.split(",") if c]
    print(f"{torch.get_num_threads()} threads, matmul fp32 {matmul_gflops(torch.float32):.0f} GFLOP/s, bf16 "
          f"{matmul_gflops(torch.bfloat16):.0f} GFLOP/s; ctx 512, micro-batch 1, {args.steps} steps; budget = "
          f"weights as held + {HEADROOM_GIB:g} GiB; an epoch of {EPOCH_TOKENS / 1e6:g} M tokens at the budget's speed")
    header = ["shape", "matrices", "weights held GiB", "no budget", "budget GiB (w+1, or the least named)",
              "with the budget", "hours / epoch"]
    header += [f"ctx {c} under the budget" for c in long_ctx]
    print("| " + " | ".join(header) + " |")
    print("|---" * len(header) + "|")
    chart: dict[str, dict[str, dict[str, Run]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for shape in shapes:
            model, data = measured.random_model(shape, folder), measured.token_samples(folder, 512, args.steps)
            weights = read_checkpoint(model)[1]
            for kind in kinds:
                held = held_weight_bytes(weights, *KINDS[kind]) / GIB
                budget = held + HEADROOM_GIB
                run = f"{shape}-{kind}"
                free = train(model, data, folder / f"{run}-free", kind, 512, args.steps, None)
                lean = train(model, data, folder / f"{run}-lean", kind, 512, args.steps, budget)
                shown = f"{budget:.2f}"
                if least_named(lean) is not None:  # refused: then the least it named, which must run within itself
                    refusal, budget = cell(lean), least_named(lean)
                    lean = train(model, data, folder / f"{run}-least", kind, 512, args.steps, budget)
                    shown = f"{refusal}; {budget:.2f}"
                long_runs = shape in args.long_shapes.split(",") and kind in args.long_kinds.split(",")
                longs = [train(model, measured.token_samples(folder, c, 1), folder / f"{run}-{c}", kind, c, 1, budget)
                         if long_runs else None for c in long_ctx]
                hours = f"{EPOCH_TOKENS / lean.metrics['tokens_per_s'] / 3600:.1f}" if lean.ok else "-"
                chart.setdefault(shape, {})[kind] = {"free": free, "lean": lean}
                cells = [shape.upper(), kind, f"{held:.2f}", cell(free), shown, cell(lean), hours]
                cells += [cell(r) if r else "-" for r in longs]
                print("| " + " | ".join(cells) + " |", flush=True)
            del weights
    if args.png:
        save_scale_png(chart, kinds, args.png)
        print(f"wrote {args.png}")


def save_scale_png(chart: dict[str, dict[str, dict[str, Run]]], kinds: list[str], path: str) -> None:
    """Bar charts, one group per shape and one bar per kind: tokens/s and peak RSS without a budget, and peak
    RSS under the budget (no bar where the budget was refused)."""
    def values(run: str, field: str) -> dict[str, list[float]]:
        def one(r: Run) -> float:
            return 0.0 if not r.ok else r.metrics["tokens_per_s"] if field == "speed" else r.peak_mib / 1024
        return {shape.upper(): [one(by_kind[kind][run]) for kind in kinds] for shape, by_kind in chart.items()}

    save_bar_charts([("tokens/s at ctx 512, no budget", values("free", "speed")),
                     ("peak RSS GiB of the whole process, no budget", values("free", "memory")),
                     ("peak RSS GiB under the budget", values("lean", "memory"))], kinds, path)


if __name__ == "__main__":
    main()

"""`rwkv-state train --quant int8|nf4` against bf16 training, in one run: tokens/s and whole-process peak RSS.

    .venv/bin/python benchmarks/quant.py --shape 0.1b            # random RWKV-7 of the 0.1B shape
    .venv/bin/python benchmarks/quant.py --shape 1.5b --steps 2 --grad-checkpoint   # L24 D2048: takes a while
    .venv/bin/python benchmarks/quant.py --model rwkv_state_hub/examples/models/tiny-rwkv-7v0-834K.pth --steps 60

Each configuration is one `rwkv-state train` process (--precision bf16, ctx 512 by default); its peak RSS is
that process's whole peak, read from outside (the parent's getrusage of its child, one child per measurement);
tokens/s is the run's own (metrics.jsonl), over all its steps. A random model (--shape) trains on random tokens;
with --model, on --data, and then every trained state is evaluated on --val-data with the bf16 model and with
each quantized one: the states are the base model's, whichever model trained them.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import measured  # noqa: E402
from measured import REPO, SHAPES  # noqa: E402

CONFIGS = {"bf16": [], "int8": ["--quant", "int8"], "nf4": ["--quant", "nf4"]}


def train_one(config: str, model: Path, data: list[str], out: Path, args) -> dict:
    """One measured `rwkv-state train` process: its tokens/s and peak RSS."""
    run = measured.train(
        ["--model", str(model), *[arg for path in data for arg in ("--data", path)], "--steps", str(args.steps),
         "--ctx-len", str(args.ctx), "--precision", "bf16", "--save-every", str(args.steps),
         "--val-every", str(args.steps), "--seed", "1", *CONFIGS[config],
         *(["--grad-checkpoint"] if args.grad_checkpoint else []),
         *(["--time-chunk", str(args.time_chunk)] if args.time_chunk else [])],
        out, {"OMP_NUM_THREADS": str(args.threads)} if args.threads else None)
    if not run.ok:
        raise RuntimeError(f"{config} failed:\n{run.stderr[-3000:]}")
    return {"tokens_per_s": run.metrics["tokens_per_s"], "peak_rss_mib": run.peak_mib, "loss": run.metrics["loss"]}


def held_out_losses(model: Path, val: list[str], runs: dict[str, Path], ctx: int) -> dict[str, dict[str, float]]:
    """The held-out loss of each trained state (rows) on the bf16 model and each quantized one (columns)."""
    from rwkv_state_hub.data import load_dataset
    from rwkv_state_hub.evaluate import evaluate
    from rwkv_state_hub.formats import load_state
    from rwkv_state_hub.model import load_model

    table: dict[str, dict[str, float]] = {name: {} for name in ["zero state", *runs]}
    for on in CONFIGS:
        m = load_model(model, dtype=torch.bfloat16, quant=None if on == "bf16" else on)
        samples = load_dataset(val, m.tokenizer, ctx, m.spec.vocab_size)
        table["zero state"][on] = evaluate(m, samples).loss
        for name, out in runs.items():
            table[name][on] = evaluate(m, samples, load_state(out / "state.safetensors").to_recurrent()).loss
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=SHAPES, default="0.1b")
    p.add_argument("--model", help="A real .pth instead of a random model (then --data and --val-data are used).")
    p.add_argument("--data", nargs="+", default=[str(REPO / "examples" / "data" / "train.jsonl")])
    p.add_argument("--val-data", nargs="+", default=[str(REPO / "examples" / "data" / "val.jsonl")])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the training processes [default: torch's]")
    p.add_argument("--grad-checkpoint", action="store_true", help="Recompute every layer (the least memory).")
    p.add_argument("--time-chunk", type=int, help="Passed to train: forward and backward this many tokens at a time.")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if args.model:
            model, data, what = Path(args.model), args.data, Path(args.model).name
        else:
            model = measured.random_model(args.shape, folder)
            data = [str(measured.token_samples(folder, args.ctx, args.steps))]
            what = f"random RWKV-7 of the {args.shape.upper()} shape {SHAPES[args.shape]}, bf16 checkpoint"
        threads = args.threads or torch.get_num_threads()
        lean = (", --grad-checkpoint" if args.grad_checkpoint else "") + (
            f", --time-chunk {args.time_chunk}" if args.time_chunk else "")
        print(f"{what}; ctx {args.ctx}, micro-batch 1, {args.steps} steps, {threads} threads, --precision bf16{lean}")
        print(f"{'config':<6} {'tokens/s':>9} {'x bf16':>7} {'peak RSS MiB':>13} {'x bf16':>7} {'last loss':>10}")
        results, runs = {}, {}
        for config in CONFIGS:
            runs[config] = folder / f"run-{config}"
            r = results[config] = train_one(config, model, data, runs[config], args)
            base = results["bf16"]
            print(f"{config:<6} {r['tokens_per_s']:>9.1f} {r['tokens_per_s'] / base['tokens_per_s']:>6.2f}x "
                  f"{r['peak_rss_mib']:>13.0f} {r['peak_rss_mib'] / base['peak_rss_mib']:>6.2f}x {r['loss']:>10.4f}",
                  flush=True)
        if args.model:
            table = held_out_losses(model, args.val_data, runs, args.ctx)
            print("\nheld-out loss (nats/token) of the state trained on ... (rows), evaluated on ... (columns)")
            print(f"{'trained on':<12}" + "".join(f"{on:>10}" for on in CONFIGS))
            for name, row in table.items():
                print(f"{name:<12}" + "".join(f"{row[on]:>10.4f}" for on in CONFIGS))


if __name__ == "__main__":
    main()

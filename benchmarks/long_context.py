"""Exact long-context state tuning: peak memory of a whole `rwkv-state train` run against the context length,
with --time-chunk (forward and backward one chunk at a time, the full gradient) beside the plain backward.

    .venv/bin/python benchmarks/long_context.py                       # ctx 2048 .. 65536, chunk 512, 0.1B shape
    .venv/bin/python benchmarks/long_context.py --ctx 2048,16384 --plain 2048

Each run is one optimizer step on one sample of `ctx` tokens, in its own process; its peak RSS is measured from
outside (the parent's getrusage of its child), so start-up, data, the step and the exports all count. The
model is a random RWKV-7 of the 0.1B shape (L12 D768, vocab 65536), bf16 on disk as the official ones are.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import measured  # noqa: E402

from rwkv_state_hub.bench import SHAPE, matmul_gflops  # noqa: E402


def one_run(model: Path, data: Path, out: Path, ctx: int, chunk: int | None) -> tuple[float, float]:
    """(peak RSS in MiB of the whole training process, seconds) for one step at `ctx`."""
    started = time.perf_counter()
    run = measured.train(["--model", str(model), "--data", str(data), "--ctx-len", str(ctx), "--steps", "1",
                          "--micro-bsz", "1", "--warmup-steps", "0", *(["--time-chunk", str(chunk)] if chunk else [])],
                         out)
    if not run.ok:
        raise RuntimeError(f"ctx {ctx} chunk {chunk} failed:\n{run.stderr[-2000:]}")
    return run.peak_mib, time.perf_counter() - started


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ctx", default="2048,8192,16384,65536", help="context lengths with --time-chunk")
    p.add_argument("--plain", default="2048,8192", help="context lengths with the plain backward, for comparison")
    p.add_argument("--chunk", type=int, default=512)
    args = p.parse_args()
    chunked = [int(c) for c in args.ctx.split(",") if c]
    plain = [int(c) for c in args.plain.split(",") if c]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = measured.random_model("0.1b", tmp)
        data = tmp / "long.txt"  # one long document: windows of ctx tokens (the World tokenizer: ~4 bytes each)
        words = Path(__file__).read_text().split()
        data.write_text(" ".join(words[i % len(words)] for i in range(max(chunked + plain) * 2)))
        weights_mib = model.stat().st_size / 2**20 * 2  # fp32 in memory
        print(f"RWKV-7 {SHAPE}, fp32 weights {weights_mib:.0f} MiB; chunk {args.chunk}; "
              f"{torch.get_num_threads()} threads, matmul fp32 {matmul_gflops(torch.float32):.1f} GFLOP/s")
        print(f"{'ctx':>7} {'backward':<14} {'peak RSS MiB':>13} {'over weights':>13} {'seconds':>8}")
        runs = [(ctx, None) for ctx in plain] + [(ctx, args.chunk) for ctx in chunked]
        for ctx, chunk in runs:
            peak, seconds = one_run(model, data, tmp / f"run-{ctx}-{chunk}", ctx, chunk)
            kind = f"chunk {chunk}" if chunk else "plain"
            print(f"{ctx:>7} {kind:<14} {peak:>13.0f} {peak - weights_mib:>13.0f} {seconds:>8.1f}", flush=True)


if __name__ == "__main__":
    main()

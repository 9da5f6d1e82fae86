"""State-tuning speed on the CPU, side by side with a naive baseline, in one run.

    .venv/bin/python benchmarks/train_speed.py [--arch v7,v6] [--ctx 512] [--steps 3]

A random-weight RWKV of the 0.1B shape (L12 D768, head size 64, vocab 65536), saved in bf16 like the
official checkpoints and memory-mapped from disk, micro-batch 1. Each
configuration runs in a fresh process (so its peak RSS is its own) and does whole training steps
(forward, loss, backward to the state, Adam on the state):
    naive     the reference WKV loop with every weight requiring a gradient, fp32: what training code
              that does not special-case frozen weights costs
    ours fp32 the trainer's step: chunked WKV, frozen weights, head and loss in chunks
    ours bf16 the same with bf16 weights (the official checkpoints are bf16; the state maths stays fp32)
Useful work is counted as 4 x (non-embedding parameters) FLOPs per token (2 forward, 2 for the
backward to the inputs: frozen weights need no weight gradient), next to this machine's own matmul
GFLOP/s in the same dtype, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

from rwkv_state_hub.random_model import random_checkpoint, save_checkpoint


def matmul_gflops(dtype: torch.dtype, n: int = 1024, reps: int = 10) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def one_config(path: str, config: str, ctx: int, steps: int) -> dict:
    """Runs in its own process: load the model, time `steps` training steps after one warm-up step."""
    from rwkv_state_hub.data import Batch
    from rwkv_state_hub.evaluate import batch_loss
    from rwkv_state_hub.model import LearnedState, load_model

    os.environ["RWKV_STATE_HUB_WKV"] = "reference" if config == "naive" else "chunked"
    model = load_model(path, dtype=torch.bfloat16 if config == "ours bf16" else torch.float32)
    if config == "naive":
        for p in model.parameters():
            p.requires_grad_(True)
    non_embedding = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("emb."))
    learned = LearnedState(model.spec)
    opt = torch.optim.Adam(learned.parameters(), lr=1.0, betas=(0.9, 0.99), eps=1e-8)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 65536, (1, ctx + 1), generator=g)

    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    batch = Batch(inputs, targets, torch.ones(1, ctx), torch.ones(1, ctx, dtype=torch.bool), ctx)

    def step() -> None:
        opt.zero_grad()
        model.zero_grad(set_to_none=True)
        if config == "naive":  # full logits, as plain training code computes them
            logits, _ = model(inputs, learned())
            loss = torch.nn.functional.cross_entropy(logits[0], targets[0])
        else:  # the trainer's own loss: head and loss in chunks, recomputed in backward
            loss = batch_loss(model, batch, learned())[0] / ctx
        loss.backward()
        opt.step()

    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - t0) / steps
    return {
        "tokens_per_s": ctx / seconds,
        "seconds_per_step": seconds,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "gflops": 4 * non_embedding * ctx / seconds / 1e9,
        "non_embedding_params": non_embedding,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="v7,v6")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--one", nargs=2, metavar=("CHECKPOINT", "CONFIG"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one_config(args.one[0], args.one[1], args.ctx, args.steps)))
        return
    peak = {"fp32": matmul_gflops(torch.float32), "bf16": matmul_gflops(torch.bfloat16)}
    print(f"threads {torch.get_num_threads()}, ctx {args.ctx}, micro-batch 1, {args.steps} timed steps each; "
          f"this machine's matmul: fp32 {peak['fp32']:.1f} GFLOP/s, bf16 {peak['bf16']:.1f} GFLOP/s")
    print(f"{'arch':<5} {'config':<10} {'tokens/s':>9} {'x naive':>8} {'s/step':>8} {'peak RSS MiB':>13} "
          f"{'GFLOP/s':>8} {'% of matmul':>12}")
    for arch in args.arch.split(","):
        base = None
        with tempfile.TemporaryDirectory() as tmp:
            path = f"{tmp}/{arch}.pth"  # bf16 on disk, as the official checkpoints are
            sd = random_checkpoint(arch, n_layer=12, n_embd=768, head_size=64, vocab_size=65536, seed=0,
                                   dtype=torch.bfloat16)
            save_checkpoint(sd, path)
            del sd
            results = {}
            for config in ("naive", "ours fp32", "ours bf16"):
                out = subprocess.run([sys.executable, __file__, "--one", path, config, "--ctx", str(args.ctx),
                                      "--steps", str(args.steps)], capture_output=True, text=True, check=True)
                results[config] = json.loads(out.stdout.strip().splitlines()[-1])
        for config, r in results.items():
            base = base or r["tokens_per_s"]
            dtype = "bf16" if config.endswith("bf16") else "fp32"
            print(f"{arch:<5} {config:<10} {r['tokens_per_s']:>9.1f} {r['tokens_per_s'] / base:>7.2f}x "
                  f"{r['seconds_per_step']:>8.2f} {r['peak_rss_mib']:>13.0f} {r['gflops']:>8.1f} "
                  f"{100 * r['gflops'] / peak[dtype]:>11.1f}%", flush=True)


if __name__ == "__main__":
    main()

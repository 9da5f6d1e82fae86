"""State-tuning speed and memory on the CPU, side by side with a naive baseline, in one run.

    rwkv-state bench [--arch v7,v6] [--ctx 512] [--steps 3] [--configs naive,torch-fp32,fp32,...]
    (or .venv/bin/python benchmarks/train_speed.py with the same options)

A random-weight RWKV of the 0.1B shape (L12 D768, head size 64, vocab 65536), saved in bf16 like the
official checkpoints and memory-mapped from disk, micro-batch 1. Each configuration runs in a fresh
process (so its peak RSS is its own) and does whole training steps (forward, loss, backward to the
state, Adam on the state):
    naive      the reference WKV loop with every weight requiring a gradient, fp32, full logits: what
               training code that does not special-case frozen weights costs
    torch-fp32 the trainer's step with no C++ kernel: the WKV in chunked torch and the bf16 head's loss in torch
    torch-bf16 (the path before the CPU kernels, and the fallback where they cannot be built)
    fp32       the trainer's step: the WKV and the bf16 head's loss in the C++ CPU kernels (wkv/csrc/)
    bf16       the same with bf16 weights (the official checkpoints are bf16; the state maths stays fp32)
    lean-fp32  fp32 under a memory budget of "weights + 1 GiB", as `--memory-budget` does it: as many
    lean-bf16  layers' activations recomputed in the backward pass as the budget needs (model/memory.py)
Useful work is counted as 4 x (non-embedding parameters) FLOPs per token (2 forward, 2 for the
backward to the inputs: frozen weights need no weight gradient), next to this machine's own matmul
GFLOP/s in the same dtype, measured in the configuration's own process just before and just after its
timed steps (the best of those): this machine's speed drifts by up to 20% over minutes, so a rate measured
once at the start mismatches steps timed minutes later. Weights are n_params x the dtype's size.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

CONFIGS = ("naive", "torch-fp32", "fp32", "torch-bf16", "bf16", "lean-fp32", "lean-bf16")
SHAPE = dict(n_layer=12, n_embd=768, head_size=64, vocab_size=65536)  # RWKV 0.1B
LEAN_HEADROOM = 1 << 30  # the lean configs' aim: peak RSS at most the weights + 1 GiB


def matmul_gflops(dtype: torch.dtype, n: int = 1024, reps: int = 10, trials: int = 5) -> float:
    """This machine's own matmul rate in `dtype`: the ceiling the training step is measured against. The best
    of `trials` timings (a single one varies by up to 30% on a 2-core machine: the first is often slow)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(trials):
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 * reps / best / 1e9


def one_config(path: str, config: str, ctx: int, steps: int) -> dict:
    """Runs in its own process: load the model, time `steps` training steps after one warm-up step. Every
    configuration runs the trainer's own step (training.step.train_step); naive swaps in its loss."""
    from .data import Batch
    from .model import load_model
    from .model.memory import peak_rss_bytes, plan_recompute
    from .training import TrainConfig
    from .training.step import new_learned, train_step

    os.environ["RWKV_STATE_HUB_WKV"] = {"naive": "reference", "torch": "chunked"}.get(config.split("-")[0], "cpu")
    if config.startswith("torch"):
        from .wkv import cpu

        cpu.turn_off("the torch-* configurations")
    dtype = torch.bfloat16 if config.endswith("bf16") else torch.float32
    model = load_model(path, dtype=dtype)
    weights_bytes = model.spec.n_params * dtype.itemsize
    if config == "naive":
        for p in model.parameters():
            p.requires_grad_(True)
    non_embedding = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("emb."))
    learned, opt = new_learned(TrainConfig(), model.spec, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.spec.vocab_size, (1, ctx + 1), generator=g)
    batch = Batch(tokens[:, :-1], tokens[:, 1:], torch.ones(1, ctx), torch.ones(1, ctx, dtype=torch.bool), ctx)
    if config.startswith("lean"):  # as the trainer does under memory_budget
        model.recompute_layers = plan_recompute(model, 1, ctx, weights_bytes + LEAN_HEADROOM)
    loss_fn = _full_logits_loss if config == "naive" else None  # None: the trainer's own loss

    def step() -> None:
        train_step(model, learned, opt, [batch], loss_fn=loss_fn)

    step()
    ceiling = matmul_gflops(dtype)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - t0) / steps
    ceiling = max(ceiling, matmul_gflops(dtype))
    return {
        "tokens_per_s": ctx / seconds,
        "seconds_per_step": seconds,
        "peak_rss_mib": peak_rss_bytes() / 2**20,
        "weights_mib": weights_bytes / 2**20,
        "recompute_layers": model.recompute_layers,
        "gflops": 4 * non_embedding * ctx / seconds / 1e9,
        "matmul_gflops": ceiling,
        "non_embedding_params": non_embedding,
    }


def _full_logits_loss(model, batch, state) -> tuple[torch.Tensor, None]:
    """What plain training code computes: full logits, then the cross-entropy (weights' gradients dropped
    each step, as `zero_grad(set_to_none=True)` would)."""
    model.zero_grad(set_to_none=True)
    logits, _ = model(batch.inputs, state, batch.mask)
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch.targets, reduction="none")
    return (nll * batch.loss_mask).sum(), None


def run(archs: list[str], ctx: int = 512, steps: int = 3, configs: list[str] | None = None, out=print) -> list[dict]:
    """The side-by-side table: every configuration of every architecture, each in a fresh process.
    Returns the rows (also printed as they come)."""
    from .random_model import random_checkpoint, save_checkpoint

    configs = list(configs or CONFIGS)
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        raise ValueError(f"unknown configuration {unknown[0]!r}; choose from {', '.join(CONFIGS)}")
    peak = {"fp32": matmul_gflops(torch.float32), "bf16": matmul_gflops(torch.bfloat16)}
    out(f"threads {torch.get_num_threads()}, ctx {ctx}, micro-batch 1, {steps} timed steps each; "
        f"this machine's matmul at the start: fp32 {peak['fp32']:.1f} GFLOP/s, bf16 {peak['bf16']:.1f} GFLOP/s")
    out(kernel_build_line())
    out(f"{'arch':<5} {'config':<10} {'tokens/s':>9} {'x ' + configs[0]:>8} {'s/step':>7} {'peak RSS MiB':>13} "
        f"{'weights+1GiB':>13} {'recompute':>9} {'GFLOP/s':>8} {'matmul':>7} {'% of matmul':>12}")
    rows = []
    for arch in archs:
        base = None
        with tempfile.TemporaryDirectory() as tmp:
            path = f"{tmp}/{arch}.pth"  # bf16 on disk, as the official checkpoints are
            save_checkpoint(random_checkpoint(arch, seed=0, dtype=torch.bfloat16, **SHAPE), path)
            for config in configs:
                proc = subprocess.run([sys.executable, "-m", "rwkv_state_hub.bench", "--one", path, config,
                                       "--ctx", str(ctx), "--steps", str(steps)], capture_output=True, text=True)
                if proc.returncode:
                    raise RuntimeError(f"{arch} {config} failed:\n{proc.stderr[-2000:]}")
                r = {"arch": arch, "config": config, **json.loads(proc.stdout.strip().splitlines()[-1])}
                base = base or r["tokens_per_s"]
                r["x_first"] = r["tokens_per_s"] / base
                r["pct_of_matmul"] = 100 * r["gflops"] / r["matmul_gflops"]
                rows.append(r)
                target = r["weights_mib"] + LEAN_HEADROOM / 2**20
                recompute = f"{r['recompute_layers']}/{SHAPE['n_layer']}"
                out(f"{arch:<5} {config:<10} {r['tokens_per_s']:>9.1f} {r['x_first']:>7.2f}x "
                    f"{r['seconds_per_step']:>7.2f} {r['peak_rss_mib']:>13.0f} {target:>13.0f} {recompute:>9} "
                    f"{r['gflops']:>8.1f} {r['matmul_gflops']:>7.1f} {r['pct_of_matmul']:>11.1f}%")
    return rows


def kernel_build_line() -> str:
    """Builds (or loads the cached) CPU kernels here, before any timing, and says how long that took."""
    from .wkv import cpu

    t0 = time.perf_counter()
    module = cpu.load()
    seconds = time.perf_counter() - t0
    if module is None:
        return "CPU kernels: not available here (the kernel configurations run the torch path)"
    if cpu.LIBRARY.compile_seconds is None:
        return f"CPU kernels: a cached build, loaded in {seconds:.1f} s"
    return f"CPU kernels: compiled in {cpu.LIBRARY.compile_seconds:.1f} s (first use; cached after)"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="v7,v6", help="comma-separated: v5.2, v6, v7")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, from {', '.join(CONFIGS)}")
    ap.add_argument("--one", nargs=2, metavar=("CHECKPOINT", "CONFIG"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(one_config(args.one[0], args.one[1], args.ctx, args.steps)))
        return
    run(args.arch.split(","), args.ctx, args.steps, args.configs.split(","), out=lambda s: print(s, flush=True))


if __name__ == "__main__":
    main()

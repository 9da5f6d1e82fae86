"""State-tuning speed and memory on a GPU, ours side by side with a naive baseline, in one run.

    python benchmarks/gpu_speed.py [--models 7-0.1B,7-0.4B,7-1.5B,6-1.6B] [--ctx 1024] [--steps 3]

Random-weight RWKV models of the official shapes (vocab 65536, head size 64), saved in bf16 like the
official checkpoints, micro-batch 1, whole training steps (forward, loss, backward to the state, Adam on the
state). Each configuration runs in a fresh process, so its peak memory (torch.cuda.max_memory_allocated)
is its own:
    naive       every weight requires a gradient (as RWKV-LM's state training does), full logits, torch WKV
    ours torch  the trainer's step with the project's torch (chunked) WKV: frozen weights, head in chunks
    ours cuda   the same with the CUDA kernels of rwkv_state_hub/wkv/csrc/ (RWKV_STATE_HUB_WKV=cuda)
    fla         the same with flash-linear-attention's chunked RWKV-7 kernel (v7 only, when `fla` imports)
MFU counts 4 x (non-embedding parameters) FLOPs per token (2 forward, 2 for the backward to the inputs:
frozen weights need no weight gradient) against this GPU's bf16 matmul, measured in the same run, and
against the datasheet's dense bf16 peak where the GPU is known. Target (issue 11): peak memory at most the
bf16 weights + 1 GiB, and at least 35% MFU on the 1.5B/1.6B models. Published (RWKV-PEFT state tuning,
same settings): 7-0.1B 2.6 GB, 7-0.4B 3.1 GB, 7-1.5B 5.3 GB, 6-1.6B 5.8 GB.
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

from rwkv_state_hub.random_model import random_checkpoint, save_checkpoint

# name -> (architecture, layers, width); the official shapes
MODELS = {
    "7-0.1B": ("v7", 12, 768),
    "7-0.4B": ("v7", 24, 1024),
    "7-1.5B": ("v7", 24, 2048),
    "6-1.6B": ("v6", 24, 2048),
}
PUBLISHED_GB = {"7-0.1B": 2.6, "7-0.4B": 3.1, "7-1.5B": 5.3, "6-1.6B": 5.8}
CONFIGS = ("naive", "ours torch", "ours cuda", "fla")
DATASHEET_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12}  # dense bf16 FLOP/s (SXM)
VOCAB = 65536


def matmul_flops(n: int = 8192, reps: int = 20) -> float:
    """This GPU's bf16 matmul FLOP/s: the practical peak MFU is measured against."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def datasheet_flops() -> tuple[str, float | None]:
    name = torch.cuda.get_device_name()
    return name, next((f for key, f in DATASHEET_BF16.items() if key in name), None)


def fla_wkv7():
    """flash-linear-attention's chunked RWKV-7 in our signature (state [B, H, V, K] -> fla's [B, H, K, V])."""
    from fla.ops.rwkv7 import chunk_rwkv7

    def wkv7(r, k, v, log_w, a, b, state):
        y, final = chunk_rwkv7(r=r, w=log_w, k=k, v=v, a=a, b=b, scale=1.0,
                               initial_state=state.transpose(-1, -2).contiguous(), output_final_state=True)
        return y, final.transpose(-1, -2)

    return wkv7


def one_config(path: str, config: str, ctx: int, steps: int) -> dict:
    """Runs in its own process: load the model on the GPU, time `steps` training steps after a warm-up step."""
    from rwkv_state_hub import wkv
    from rwkv_state_hub.data import Batch
    from rwkv_state_hub.evaluate import batch_loss
    from rwkv_state_hub.model import LearnedState, load_model

    if config == "ours cuda":
        from rwkv_state_hub.wkv import cuda

        if cuda.load() is None:
            return {"skipped": str(cuda.LIBRARY.reason)}
        wkv.set_backend("cuda")
    if config == "fla":
        try:
            import rwkv_state_hub.model.v7 as v7

            v7.wkv7 = fla_wkv7()
        except ImportError as e:
            return {"skipped": f"flash-linear-attention not importable ({e})"}
    model = load_model(path, dtype=torch.bfloat16, device="cuda")
    if config == "naive":
        for p in model.parameters():
            p.requires_grad_(True)
    non_embedding = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("emb."))
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    learned = LearnedState(model.spec).cuda()
    opt = torch.optim.Adam(learned.parameters(), lr=1.0, betas=(0.9, 0.99), eps=1e-8)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (1, ctx + 1), generator=g).cuda()
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    ones = torch.ones(1, ctx, device="cuda")
    batch = Batch(inputs, targets, ones, ones.bool(), ctx)

    def step() -> float:
        opt.zero_grad()
        model.zero_grad(set_to_none=True)
        if config == "naive":
            logits, _ = model(inputs, learned())
            loss = torch.nn.functional.cross_entropy(logits[0].float(), targets[0])
        else:
            loss = batch_loss(model, batch, learned())[0] / ctx
        loss.backward()
        opt.step()
        return float(loss.detach())

    first_loss = step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / steps
    return {
        "tokens_per_s": ctx / seconds,
        "seconds_per_step": seconds,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "weights_gib": weight_bytes / 2**30,
        "flops_per_s": 4 * non_embedding * ctx / seconds,
        "first_loss": first_loss,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--one", nargs=2, metavar=("CHECKPOINT", "CONFIG"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        why = "torch is a CPU build" if torch.version.cuda is None else "no CUDA GPU is visible"
        sys.exit(f"gpu_speed: needs a CUDA GPU ({why}); benchmarks/train_speed.py measures the CPU")
    if args.one:
        print(json.dumps(one_config(args.one[0], args.one[1], args.ctx, args.steps)))
        return
    unknown = [m for m in args.models.split(",") if m not in MODELS]
    if unknown:
        sys.exit(f"gpu_speed: unknown model {unknown[0]!r}; choose from {', '.join(MODELS)}")
    peak = matmul_flops()
    gpu, sheet = datasheet_flops()
    print(f"{gpu}; bf16 matmul measured {peak / 1e12:.0f} TFLOP/s"
          + (f", datasheet dense bf16 {sheet / 1e12:.0f} TFLOP/s" if sheet else "")
          + f"; ctx {args.ctx}, micro-batch 1, bf16 weights, {args.steps} timed steps each")
    print(f"{'model':<7} {'config':<11} {'tokens/s':>9} {'s/step':>7} {'peak GiB':>9} {'weights+1':>10} "
          f"{'published':>10} {'MFU meas.':>10} {'MFU sheet':>10}  loss")
    for name in args.models.split(","):
        arch, n_layer, n_embd = MODELS[name]
        with tempfile.TemporaryDirectory() as tmp:
            path = f"{tmp}/{name}.pth"
            sd = random_checkpoint(arch, n_layer=n_layer, n_embd=n_embd, head_size=64, vocab_size=VOCAB, seed=0,
                                   dtype=torch.bfloat16)
            save_checkpoint(sd, path)
            del sd
            for config in args.configs.split(","):
                if config == "fla" and arch != "v7":
                    continue
                proc = subprocess.run([sys.executable, __file__, "--one", path, config, "--ctx", str(args.ctx),
                                       "--steps", str(args.steps)], capture_output=True, text=True,
                                      env={**os.environ, "PYTHONUNBUFFERED": "1"})
                lines = proc.stdout.strip().splitlines()
                if proc.returncode != 0 or not lines:
                    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                    print(f"{name:<7} {config:<11} failed: {tail}", flush=True)
                    continue
                r = json.loads(lines[-1])
                if "skipped" in r:
                    print(f"{name:<7} {config:<11} skipped: {r['skipped']}", flush=True)
                    continue
                budget = r["weights_gib"] + 1.0
                verdict = "ok" if r["peak_gib"] <= budget else "over"
                mfu_sheet = f"{100 * r['flops_per_s'] / sheet:>9.1f}%" if sheet else f"{'-':>10}"
                print(f"{name:<7} {config:<11} {r['tokens_per_s']:>9.0f} {r['seconds_per_step']:>7.3f} "
                      f"{r['peak_gib']:>9.2f} {budget:>6.2f} {verdict:<3} {PUBLISHED_GB[name]:>7.1f} GB "
                      f"{100 * r['flops_per_s'] / peak:>9.1f}% {mfu_sheet}  {r['first_loss']:.4f}", flush=True)


if __name__ == "__main__":
    main()

"""RWKV-7 WKV on CPU: the plain reference loop against the chunked `wkv7_fast`, forward + backward.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/wkv7_speed.py [--B 1 --T 512 --H 12 --N 64 --runs 7]

One layer's WKV (default B1 T512 H12 N64 fp32) with model-like random inputs (kk unit-norm, a = -kk,
b = kk * sigmoid(.), w = exp(-e^-0.5 sigmoid(.)) in [0.545, 1)); gradients to every input (r, k, v,
log_w, a, b and the initial state) from random upstream gradients on y and on the final state.
Prints the median wall-clock and process CPU time of several runs for each, the wall-clock speed-up
over the loop, and the largest
differences of y, of the final state and of the state gradient from the loop's.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F

from rwkv_state_hub.wkv.chunked7 import wkv7_fast
from rwkv_state_hub.wkv.reference import wkv7


def model_like_inputs(B: int, T: int, H: int, N: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rn(*shape):
        return torch.randn(*shape, generator=g)

    r, k, v = rn(B, T, H, N), rn(B, T, H, N), rn(B, T, H, N)
    kk = F.normalize(rn(B, T, H, N), dim=-1)
    iclr = torch.sigmoid(rn(B, T, H, N))
    log_w = -math.exp(-0.5) * torch.sigmoid(rn(B, T, H, N))
    state = rn(B, H, N, N) * 0.5
    return [r, k, v, log_w, -kk, kk * iclr, state]


def fwd_bwd(fn, xs, gy, gs):
    leaves = [x.detach().clone().requires_grad_(True) for x in xs]
    y, s = fn(*leaves)
    torch.autograd.backward([y, s], [gy, gs])
    return y.detach(), s.detach(), [x.grad for x in leaves]


def median_ms(fn, xs, gy, gs, runs: int) -> tuple[float, float]:
    """Median wall-clock and median process CPU time (all threads), in ms."""
    fwd_bwd(fn, xs, gy, gs)  # warm-up
    wall, cpu = [], []
    for _ in range(runs):
        t0, c0 = time.perf_counter(), time.process_time()
        fwd_bwd(fn, xs, gy, gs)
        wall.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.process_time() - c0) * 1e3)
    return statistics.median(wall), statistics.median(cpu)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--T", type=int, default=512)
    ap.add_argument("--H", type=int, default=12)
    ap.add_argument("--N", type=int, default=64)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--chunks", type=int, nargs="+", default=[16, 32, 64])
    args = ap.parse_args()
    B, T, H, N = args.B, args.T, args.H, args.N
    xs = model_like_inputs(B, T, H, N)
    g = torch.Generator().manual_seed(1)
    gy, gs = torch.randn(B, T, H, N, generator=g), torch.randn(B, H, N, N, generator=g)

    print(f"RWKV-7 WKV fwd+bwd (grads to r,k,v,log_w,a,b,state), B{B} T{T} H{H} N{N} fp32, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.runs}, "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cpus")
    y_ref, s_ref, g_ref = fwd_bwd(wkv7, xs, gy, gs)
    t_ref, c_ref = median_ms(wkv7, xs, gy, gs, args.runs)
    print(f"{'method':<22}{'wall ms':>9}{'cpu ms':>9}{'speed-up':>10}{'max|dy|':>12}{'max|dS_T|':>12}"
          f"{'max|dgrad_s0|':>15}{'max rel dgrad (all)':>21}")
    print(f"{'reference loop':<22}{t_ref:>9.1f}{c_ref:>9.1f}{1.0:>9.2f}x{'-':>12}{'-':>12}{'-':>15}{'-':>21}")
    for c in args.chunks:
        def fn(*a, c=c):
            return wkv7_fast(*a, chunk=c)

        y, s, gr = fwd_bwd(fn, xs, gy, gs)
        t, ct = median_ms(fn, xs, gy, gs, args.runs)
        rel = max(((g1 - g0).abs().max() / g0.abs().max()).item() for g0, g1 in zip(g_ref, gr, strict=True))
        print(f"{f'wkv7_fast chunk={c}':<22}{t:>9.1f}{ct:>9.1f}{t_ref / t:>9.2f}x"
              f"{(y - y_ref).abs().max().item():>12.2e}{(s - s_ref).abs().max().item():>12.2e}"
              f"{(gr[6] - g_ref[6]).abs().max().item():>15.2e}{rel:>21.2e}")
    print(f"(scale: max|y| {y_ref.abs().max().item():.3g}, max|S_T| {s_ref.abs().max().item():.3g}, "
          f"max|grad_s0| {g_ref[6].abs().max().item():.3g})")


if __name__ == "__main__":
    main()

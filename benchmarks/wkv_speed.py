"""One layer's WKV on the CPU: the plain reference loop against the chunked form and the C++ kernels, fwd + bwd.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/wkv_speed.py --arch v7 [--B 1 --T 512 --H 12 --N 64 --runs 7]

One layer's WKV (default B1 T512 H12 N64 fp32) with model-like random inputs:
    v5.2 / v6  a time-varying decay log_w = -exp(d + 0.5 * noise), d per channel uniform in [-6, 2.5]
               (w from ~0.9975 down to ~1e-5 per step), u ~ 0.5 * randn (v5.2 runs the same kernel)
    v7         kk unit-norm, a = -kk, b = kk * sigmoid(.), w = exp(-e^-0.5 sigmoid(.)) in [0.545, 1)
Gradients go to every input (the initial state included) from random upstream gradients on y and on
the final state. Prints the median wall-clock and process CPU time of several runs for each, the
wall-clock speed-up over the loop, and the largest differences of y, of the final state and of the
state gradient from the loop's.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F

from rwkv_state_hub.wkv import cpu, reference
from rwkv_state_hub.wkv.chunked5 import wkv5_chunked
from rwkv_state_hub.wkv.chunked7 import wkv7_fast


def model_like_inputs(arch: str, B: int, T: int, H: int, N: int, seed: int = 0) -> list[torch.Tensor]:
    """The WKV's inputs in the model's ranges; the initial state last."""
    g = torch.Generator().manual_seed(seed)

    def rn(*shape):
        return torch.randn(*shape, generator=g)

    r, k, v = rn(B, T, H, N), rn(B, T, H, N), rn(B, T, H, N)
    if arch == "v7":
        kk = F.normalize(rn(B, T, H, N), dim=-1)
        iclr = torch.sigmoid(rn(B, T, H, N))
        log_w = -math.exp(-0.5) * torch.sigmoid(rn(B, T, H, N))
        rest = [log_w, -kk, kk * iclr]
    else:
        base = torch.rand(H, N, generator=g) * 8.5 - 6.0
        rest = [-(base + 0.5 * rn(B, T, H, N)).exp(), 0.5 * rn(H, N)]
    return [r, k, v, *rest, rn(B, H, N, N) * 0.5]


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
    ap.add_argument("--arch", choices=["v5.2", "v6", "v7"], default="v7")
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--T", type=int, default=512)
    ap.add_argument("--H", type=int, default=12)
    ap.add_argument("--N", type=int, default=64)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--chunks", type=int, nargs="+", default=[16, 32, 64])
    args = ap.parse_args()
    B, T, H, N = args.B, args.T, args.H, args.N
    v7 = args.arch == "v7"
    ref, fast, name = (reference.wkv7, wkv7_fast, "wkv7_fast") if v7 else (reference.wkv5, wkv5_chunked, "wkv5_chunked")
    xs = model_like_inputs(args.arch, B, T, H, N)
    g = torch.Generator().manual_seed(1)
    gy, gs = torch.randn(B, T, H, N, generator=g), torch.randn(B, H, N, N, generator=g)

    grads = "r,k,v,log_w,a,b,state" if v7 else "r,k,v,log_w,u,state"
    print(f"RWKV-{args.arch.removeprefix('v')} WKV fwd+bwd (grads to {grads}), B{B} T{T} H{H} N{N} fp32, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.runs}, "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cpus")
    y_ref, s_ref, g_ref = fwd_bwd(ref, xs, gy, gs)
    t_ref, c_ref = median_ms(ref, xs, gy, gs, args.runs)
    print(f"{'method':<26}{'wall ms':>9}{'cpu ms':>9}{'speed-up':>10}{'max|dy|':>12}{'max|dS_T|':>12}"
          f"{'max|dgrad_s0|':>15}{'max rel dgrad (all)':>21}")
    print(f"{'reference loop':<26}{t_ref:>9.1f}{c_ref:>9.1f}{1.0:>9.2f}x{'-':>12}{'-':>12}{'-':>15}{'-':>21}")
    methods = {f"{name} chunk={c}": (lambda *a, c=c: fast(*a, chunk=c)) for c in args.chunks}
    if cpu.load() is not None:
        methods["CPU kernel (wkv_cpu.cpp)"] = cpu.wkv7 if v7 else cpu.wkv5
    for label, fn in methods.items():
        y, s, gr = fwd_bwd(fn, xs, gy, gs)
        t, ct = median_ms(fn, xs, gy, gs, args.runs)
        rel = max(((g1 - g0).abs().max() / g0.abs().max()).item() for g0, g1 in zip(g_ref, gr, strict=True))
        print(f"{label:<26}{t:>9.1f}{ct:>9.1f}{t_ref / t:>9.2f}x"
              f"{(y - y_ref).abs().max().item():>12.2e}{(s - s_ref).abs().max().item():>12.2e}"
              f"{(gr[-1] - g_ref[-1]).abs().max().item():>15.2e}{rel:>21.2e}")
    print(f"(scale: max|y| {y_ref.abs().max().item():.3g}, max|S_T| {s_ref.abs().max().item():.3g}, "
          f"max|grad_s0| {g_ref[-1].abs().max().item():.3g}; 'max rel dgrad' is max|dgrad| / max|grad| "
          f"over every input)")


if __name__ == "__main__":
    main()

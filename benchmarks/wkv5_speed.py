"""RWKV-6 WKV on CPU: the plain reference loop against the chunked `wkv5_chunked`, forward + backward.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/wkv5_speed.py [--B 1 --T 512 --H 12 --N 64 --runs 7]

One layer's WKV (default B1 T512 H12 N64 fp32) with model-like random inputs: a time-varying RWKV-6
decay log_w = -exp(d + 0.5 * noise), d per channel uniform in [-6, 2.5] (w from ~0.9975 down to
~1e-5 per step), u ~ 0.5 * randn; gradients to every input (r, k, v, log_w, u and the initial
state) from random upstream gradients on y and on the final state. Prints the median time of
several runs for each, the speed-up over the loop, and the largest differences of y, of the final
state and of the state gradient from the loop's.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from rwkv_state_hub.wkv.chunked5 import wkv5_chunked
from rwkv_state_hub.wkv.reference import wkv5


def model_like_inputs(B: int, T: int, H: int, N: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rn(*shape):
        return torch.randn(*shape, generator=g)

    r, k, v = rn(B, T, H, N), rn(B, T, H, N), rn(B, T, H, N)
    base = torch.rand(H, N, generator=g) * 8.5 - 6.0
    log_w = -(base + 0.5 * rn(B, T, H, N)).exp()
    u = 0.5 * rn(H, N)
    state = rn(B, H, N, N) * 0.5
    return [r, k, v, log_w, u, state]


def fwd_bwd(fn, xs, gy, gs):
    leaves = [x.detach().clone().requires_grad_(True) for x in xs]
    y, s = fn(*leaves)
    torch.autograd.backward([y, s], [gy, gs])
    return y.detach(), s.detach(), [x.grad for x in leaves]


def median_ms(fn, xs, gy, gs, runs: int) -> float:
    fwd_bwd(fn, xs, gy, gs)  # warm-up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fwd_bwd(fn, xs, gy, gs)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


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

    print(f"RWKV-6 WKV fwd+bwd (grads to r,k,v,log_w,u,state), B{B} T{T} H{H} N{N} fp32, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.runs}")
    y_ref, s_ref, g_ref = fwd_bwd(wkv5, xs, gy, gs)
    t_ref = median_ms(wkv5, xs, gy, gs, args.runs)
    print(f"{'method':<26}{'ms':>9}{'speed-up':>10}{'max|dy|':>12}{'max|dS_T|':>12}{'max|dgrad_s0|':>15}"
          f"{'max rel dgrad (all)':>21}")
    print(f"{'reference loop':<26}{t_ref:>9.1f}{1.0:>9.2f}x{'-':>12}{'-':>12}{'-':>15}{'-':>21}")
    for c in args.chunks:
        def fn(*a, c=c):
            return wkv5_chunked(*a, chunk=c)

        y, s, gr = fwd_bwd(fn, xs, gy, gs)
        t = median_ms(fn, xs, gy, gs, args.runs)
        rel = max(((g1 - g0).abs().max() / g0.abs().max()).item() for g0, g1 in zip(g_ref, gr, strict=True))
        print(f"{f'wkv5_chunked chunk={c}':<26}{t:>9.1f}{t_ref / t:>9.2f}x{(y - y_ref).abs().max().item():>12.2e}"
              f"{(s - s_ref).abs().max().item():>12.2e}{(gr[5] - g_ref[5]).abs().max().item():>15.2e}{rel:>21.2e}")
    print(f"(scale: max|y| {y_ref.abs().max().item():.3g}, max|S_T| {s_ref.abs().max().item():.3g}, "
          f"max|grad_s0| {g_ref[5].abs().max().item():.3g}; 'max rel dgrad' is max|dgrad| / max|grad| "
          f"over r, k, v, log_w, u, state)")


if __name__ == "__main__":
    main()

"""The chunked RWKV-5.2 / RWKV-6 WKV against the plain loop (`reference.wkv5`): outputs, final state and
the gradients with respect to r, k, v, log_w, u and the initial state."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from rwkv_state_hub.wkv.chunked5 import wkv5_chunked
from rwkv_state_hub.wkv.reference import wkv5

H = 2
DECAYS = {
    # log_w = -exp(x): x ~ U(lo, hi)
    "strong": (1.0, 3.0),       # w ~ 0.07 .. 2e-9 per step
    "weak": (-9.2, -6.9),       # log_w ~ -1e-4 .. -1e-3
    "mixed": (-9.2, 3.0),       # a real checkpoint: both, channel by channel
}


def make_inputs(B, T, N, decay="mixed", time_varying=True, dtype=torch.float32, seed=0):
    """Leaves (r, k, v, base, u, state) and the log_w built from base: for v5.2 base is [H, N] and log_w
    its expansion over (B, T) like the model does; for v6 base is [B, T, H, N] and log_w = base."""
    g = torch.Generator().manual_seed(seed)

    def rn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    lo, hi = DECAYS[decay]
    shape = (B, T, H, N) if time_varying else (H, N)
    x = torch.rand(*shape, generator=g, dtype=torch.float64) * (hi - lo) + lo
    base = -x.exp()
    leaves = [rn(B, T, H, N), rn(B, T, H, N), rn(B, T, H, N), base, 0.5 * rn(H, N), 0.5 * rn(B, H, N, N)]
    return [t.to(dtype).requires_grad_(True) for t in leaves]


def log_w_of(base, B, T):
    return base if base.dim() == 4 else base.expand(B, T, *base.shape)


def run(fn, leaves, gy, gs, mask=None, **kw):
    r, k, v, base, u, s0 = leaves
    B, T = r.shape[:2]
    log_w = log_w_of(base, B, T)
    if mask is not None:  # the model's neutral_where_padded
        m = mask[:, :, None, None].to(r.dtype)
        k, v, log_w = k * m, v * m, log_w * m
    y, s = fn(r, k, v, log_w, u, s0, **kw)
    grads = torch.autograd.grad([y, s], leaves, [gy, gs])
    return y.detach(), s.detach(), grads


def assert_matches(leaves, mask=None, seed=1, **kw):
    r = leaves[0]
    B, T, _, N = r.shape
    g = torch.Generator().manual_seed(seed)
    gy = torch.randn(B, T, H, N, generator=g, dtype=torch.float64).to(r.dtype)
    gs = torch.randn(B, H, N, N, generator=g, dtype=torch.float64).to(r.dtype)
    y0, s0, g0 = run(wkv5, leaves, gy, gs, mask)
    y1, s1, g1 = run(wkv5_chunked, leaves, gy, gs, mask, **kw)
    assert y1.shape == y0.shape and s1.shape == s0.shape and y1.dtype == y0.dtype
    names = ["y", "final state", "grad r", "grad k", "grad v", "grad log_w", "grad u", "grad state"]
    for name, a, b in zip(names, [y1, s1, *g1], [y0, s0, *g0], strict=True):
        assert torch.isfinite(a).all(), name
        # 1e-4 relative, with an absolute floor at 1e-5 of the tensor's scale (fp32 summation order)
        assert_close(a, b, rtol=1e-4, atol=1e-5 * max(b.abs().max().item(), 1e-3), msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("B,T", [(1, 1), (3, 1), (1, 7), (3, 7), (1, 31), (1, 32), (3, 33), (1, 100), (3, 100)])
@pytest.mark.parametrize("N", [8, 64])
def test_v6_matches_reference(B, T, N):
    assert_matches(make_inputs(B, T, N, "mixed", time_varying=True))


@pytest.mark.parametrize("decay", ["strong", "weak", "mixed"])
@pytest.mark.parametrize("time_varying", [False, True], ids=["v5.2", "v6"])
@pytest.mark.parametrize("B,T,N", [(1, 100, 64), (3, 33, 8)])
def test_decay_regimes(decay, time_varying, B, T, N):
    assert_matches(make_inputs(B, T, N, decay, time_varying=time_varying, seed=2))


@pytest.mark.parametrize("chunk", [1, 4, 5, 16, 24, 32, 64, 128])
def test_chunk_sizes(chunk):
    assert_matches(make_inputs(2, 70, 8, "mixed", seed=3), chunk=chunk)


@pytest.mark.parametrize("time_varying", [False, True], ids=["v5.2", "v6"])
@pytest.mark.parametrize("N", [8, 64])
def test_right_padding(time_varying, N):
    B, T = 3, 45
    lengths = [45, 20, 1]
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    leaves = make_inputs(B, T, N, "mixed", time_varying=time_varying, seed=4)
    assert_matches(leaves, mask=mask)
    # padding is exact: each row's final state is that of its unpadded sequence
    r, k, v, base, u, s0 = (t.detach() for t in leaves)
    log_w = log_w_of(base, B, T)
    m = mask[:, :, None, None].float()
    _, s_pad = wkv5_chunked(r, k * m, v * m, log_w * m, u, s0)
    for b, n in enumerate(lengths):
        y_b, s_b = wkv5_chunked(r[b:b + 1, :n], k[b:b + 1, :n], v[b:b + 1, :n], log_w[b:b + 1, :n], u, s0[b:b + 1])
        y_ref, s_ref = wkv5(r[b:b + 1, :n], k[b:b + 1, :n], v[b:b + 1, :n], log_w[b:b + 1, :n], u, s0[b:b + 1])
        assert_close(s_pad[b:b + 1], s_b, rtol=1e-5, atol=1e-5 * s_ref.abs().max().item())
        assert_close(y_b, y_ref, rtol=1e-4, atol=1e-5 * y_ref.abs().max().item())


def test_extreme_decays_stay_finite():
    """w = exp(-exp(4)) underflows to 0 per step, and w = 1 (log_w = 0) mid-sequence: nothing overflows."""
    B, T, N = 1, 64, 8
    leaves = make_inputs(B, T, N, "mixed", seed=5)
    with torch.no_grad():
        leaves[3][:, :, 0, :4] = -math.exp(4.0)
        leaves[3][:, 10:30, 1] = 0.0
    assert_matches(leaves)


def test_float64_and_gradcheck():
    leaves = make_inputs(2, 7, 3, "mixed", dtype=torch.float64, seed=6)
    assert_matches(leaves, chunk=4)  # T 7 in chunks of 4 (padded inside), sub-chunks of 2

    def f(r, k, v, log_w, u, s0):
        return wkv5_chunked(r, k, v, log_w, u, s0, chunk=4)

    assert torch.autograd.gradcheck(f, tuple(leaves), eps=1e-6, atol=1e-6, rtol=1e-5)

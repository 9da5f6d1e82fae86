"""The chunked RWKV-7 WKV (`wkv7_fast`) against the plain loop (`reference.wkv7`): outputs, final
state and gradients to every input (r, k, v, log_w, a, b and the initial state)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rwkv_state_hub.wkv.chunked7 import wkv7_fast
from rwkv_state_hub.wkv.reference import wkv7

NAMES = ("r", "k", "v", "log_w", "a", "b", "state")


def model_like(B, T, H, N, *, seed=0, dtype=torch.float32, lengths=None):
    """Inputs shaped like v7.TimeMix's: kk unit-norm, a = -kk, b = kk * iclr, w in [0.545, 1);
    positions at or past lengths[i] are padding (k = v = kk = 0, log_w = 0), as neutral_where_padded."""
    g = torch.Generator().manual_seed(seed)

    def rn(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    r, k, v = rn(B, T, H, N), rn(B, T, H, N), rn(B, T, H, N)
    kk = F.normalize(rn(B, T, H, N), dim=-1)
    iclr = torch.sigmoid(rn(B, T, H, N))
    log_w = -math.exp(-0.5) * torch.sigmoid(rn(B, T, H, N))
    state = rn(B, H, N, N) * 0.5
    if lengths is not None:
        m = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).to(dtype)[:, :, None, None]
        k, v, log_w, kk = k * m, v * m, log_w * m, kk * m
    return [r, k, v, log_w, -kk, kk * iclr, state]


def run(fn, xs, gy, gs):
    leaves = [x.detach().clone().requires_grad_(True) for x in xs]
    y, s = fn(*leaves)
    torch.autograd.backward([y, s], [gy, gs])
    return y.detach(), s.detach(), [x.grad for x in leaves]


def close(actual, expected, what):
    # elementwise rtol 1e-4; atol scaled to the tensor's magnitude (fp32 rounding of sums of O(N) terms)
    atol = 1e-5 * max(expected.abs().max().item(), 1.0)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=atol, msg=lambda m: f"{what}: {m}")


def compare(xs, chunk=16, seed=1):
    B, T, H, N = xs[0].shape
    g = torch.Generator().manual_seed(seed)
    gy = torch.randn(B, T, H, N, generator=g, dtype=xs[0].dtype)
    gs = torch.randn(B, H, N, N, generator=g, dtype=xs[0].dtype)
    y0, s0, g0 = run(wkv7, xs, gy, gs)
    y1, s1, g1 = run(lambda *a: wkv7_fast(*a, chunk=chunk), xs, gy, gs)
    assert y1.shape == y0.shape and s1.shape == s0.shape
    close(y1, y0, "y")
    close(s1, s0, "final state")
    for name, a, e in zip(NAMES, g1, g0, strict=True):
        close(a, e, f"grad {name}")
    return y1, s1


@pytest.mark.parametrize("N", [8, 64])
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("T", [1, 5, 16, 17, 40, 100])
def test_matches_reference(T, B, N):
    compare(model_like(B, T, 2, N, seed=T * 7 + B + N))


@pytest.mark.parametrize("chunk", [1, 4, 7, 32, 64])
def test_other_chunk_sizes(chunk):
    compare(model_like(2, 45, 2, 16, seed=chunk), chunk=chunk)


def test_right_padding_mixed_lengths():
    T = 40
    lengths = [40, 23, 5]
    xs = model_like(3, T, 2, 64, seed=3, lengths=lengths)
    y, s = compare(xs)
    # padding leaves the state alone: each row's final state is the state after its own length
    for i, n in enumerate(lengths):
        _, s_i = wkv7(*(x[i:i + 1, :n] for x in xs[:6]), xs[6][i:i + 1])
        close(s[i:i + 1], s_i, f"row {i} final state")


def test_padding_with_n8_and_odd_chunk():
    xs = model_like(3, 33, 2, 8, seed=4, lengths=[33, 16, 1])
    compare(xs, chunk=16)
    compare(xs, chunk=5)


def test_gradcheck_float64():
    xs = [x.requires_grad_(True) for x in model_like(2, 5, 1, 3, seed=5, dtype=torch.float64)]
    assert torch.autograd.gradcheck(lambda *a: wkv7_fast(*a, chunk=2), xs, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_strong_decay_outside_the_model_range():
    # log_w down to -8 (w ~ 3e-4): chunk sizes shrink internally so that e^{-G} stays finite
    xs = model_like(2, 50, 2, 16, seed=6)
    xs[3] = xs[3] * 13
    y, s = compare(xs, chunk=32)
    assert torch.isfinite(y).all() and torch.isfinite(s).all()

"""RWKV-5.2 / RWKV-6 WKV in chunks: the same results as `reference.wkv5`, in pure torch, differentiable
by autograd with respect to every input (r, k, v, log_w, u and the initial state).

Within a chunk of length c, per key channel, with ``D(s, t) = sum_{s<j<t} log_w[j]`` (the decay a
value written at step s has seen when read at step t; the state S_0 enters at "s = -1"):

    state before step t:  S_t = S_0 * exp(D(-1, t)) + sum_{s<t} v_s (k_s * exp(D(s, t)))^T
    y_t = S_t r_t + v_t (u * k_t . r_t)
    state after the chunk: S_c = S_0 * exp(D(-1, c)) + sum_s v_s (k_s * exp(D(s, c)))^T

Every exponent that is ever evaluated is such a D, a decay over a forward stretch of time, so <= 0:
nothing overflows, and a factor that underflows to 0 stands for a true value below ~1e-38. Pairs
with s >= t get -inf *before* the exp (the positive exponent is never exponentiated).

Every D is also summed from exactly the log_w inside its stretch (a product with a constant 0/1
matrix, `_stretches`), never as a difference of two long prefix sums: with strong decays
(|log_w| ~ 20, prefix sums ~ 1000 over a chunk) a difference would lose digits, and, worse, its
gradient to log_w would be a cancellation of large terms (1e-5 relative errors in d log_w in fp32;
this way d log_w is as accurate as the loop's).

* Inter-chunk: ``r_t * exp(D(-1, t))`` against the carried state, ``k_s * exp(D(s, c))`` for the
  state update, and a sequential scan over chunks ``S <- S * exp(D(-1, c)) + dS`` (T / c small steps).
* Intra-chunk, s < t: the chunk is split into sub-chunks of length d (the divisor of c nearest
  sqrt(c)).
  - s in an earlier sub-chunk b than t's sub-chunk i: D(s, t) = (within i, before t) + (whole
    sub-chunks b+1 .. i-1) + (within b, after s), all <= 0; the first factor goes with the query,
    the other two with the key, so it is one matmul per sub-chunk i against the keys before it.
  - s in the same sub-chunk: the pairwise ``exp(D(s, t))``, d * d * N per sub-chunk.
* The bonus u: ``y_t += v_t * sum_k(u r_t k_t)``.

T need not be a multiple of the chunk: the inputs are padded inside with log_w = 0, k = v = r = 0,
which leaves the state unchanged, and y is cut back to T.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


def _sub_chunk(c: int) -> int:
    """The divisor of c closest to sqrt(c) (balances the pairwise and the cross-sub-chunk work)."""
    best = 1
    for d in range(1, c + 1):
        if c % d == 0 and abs(math.log(d) - 0.5 * math.log(c)) < abs(math.log(best) - 0.5 * math.log(c)):
            best = d
    return best


def wkv5_chunked(r: Tensor, k: Tensor, v: Tensor, log_w: Tensor, u: Tensor, state: Tensor,
                 chunk: int = 32) -> tuple[Tensor, Tensor]:
    """Chunked `reference.wkv5`: r, k, v, log_w [B, T, H, N]; u [H, N]; state [B, H, N, N]
    ([batch, head, value, key]). Returns y [B, T, H, N] and the final state."""
    return _wkv5_chunked(r, k, v, log_w, u, state, chunk, None)


def _wkv5_chunked(r: Tensor, k: Tensor, v: Tensor, log_w: Tensor, u: Tensor, state: Tensor,
                  chunk: int, sub: int | None) -> tuple[Tensor, Tensor]:
    B, T, H, N = r.shape
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if T == 0:
        return r.new_zeros(B, 0, H, N), state
    c = min(chunk, T)
    nc = -(-T // c)
    pad = nc * c - T
    d = sub if sub is not None and c % sub == 0 else _sub_chunk(c)
    m = c // d

    def chunked(x: Tensor) -> Tensor:  # [B, T, H, N] -> [B, H, nc, c, N]
        x = x.transpose(1, 2)
        if pad:
            x = F.pad(x, (0, 0, 0, pad))
        return x.reshape(B, H, nc, c, x.shape[-1])

    r_, k_, v_, lw = chunked(r), chunked(k), chunked(v), chunked(log_w)
    P = _stretches(c, d, r.dtype, r.device)

    # ---- inter-chunk: the carried state, and its update per chunk ------------------------------
    pre_suf = P.chunk_ps @ lw                       # [B, H, nc, 2c, K]: sum_{j<t}, then sum_{j>s}
    E, Sfx = pre_suf[..., :c, :], pre_suf[..., c:, :]
    k_end = k_ * Sfx.exp()                          # decay from s to the chunk end
    dS = v_.transpose(-1, -2) @ k_end               # [B, H, nc, V, K]
    a = lw.sum(-2, keepdim=True).exp()              # [B, H, nc, 1, K]: the whole chunk's decay
    starts = []
    S = state
    for n in range(nc):
        starts.append(S)
        S = torch.addcmul(dS[:, :, n], S, a[:, :, n])
    S0 = torch.stack(starts, 2)                     # state at each chunk's start, [B, H, nc, V, K]
    y = (r_ * E.exp()) @ S0.transpose(-1, -2)       # [B, H, nc, c, V]

    # ---- intra-chunk, same sub-chunk: pairwise decays (s < t), plus the bonus on the diagonal -----
    def sub_view(x: Tensor) -> Tensor:              # [B, H, nc, c, N] -> [B, H, nc, m, d, N]
        return x.reshape(B, H, nc, m, d, x.shape[-1])

    rb, kb, vb, lwb = sub_view(r_), sub_view(k_), sub_view(v_), sub_view(lw)
    bonus = (rb * kb * u[None, :, None, None, None, :]).sum(-1)          # [.., m, d]
    if d > 1:
        D = (P.pair @ lwb).reshape(B, H, nc, m, d, d, N) + P.pair_bias    # -inf where s >= t
        A = (rb.unsqueeze(-2) * kb.unsqueeze(-3) * D.exp()).sum(-1) + torch.diag_embed(bonus)
        yd = A @ vb                                                       # [.., m, d, V]
    else:
        yd = vb * bonus.unsqueeze(-1)

    # ---- intra-chunk, earlier sub-chunks: factorised at the start of t's sub-chunk ---------------
    if m > 1:
        # t in sub-chunk i >= 1, s in sub-chunk b < i: sum_{s<j<t} lw[j] = (within i, before t)
        #   + (whole sub-chunks b+1 .. i-1) + (within b, after s): three sums of disjoint stretches.
        loc = P.sub_ps @ lwb                                              # [.., m, 2d, K]
        q = rb[..., 1:, :, :] * loc[..., 1:, :d, :].exp()                 # [.., m-1, d, K]
        between = (P.between @ lwb.sum(-2)).reshape(B, H, nc, m - 1, m - 1, 1, N) + P.between_bias
        ek = (between + loc[..., :m - 1, None, d:, :].transpose(-4, -3)).exp()  # [.., i, b, d, K]
        kq = k_[..., :c - d, :].unsqueeze(-3) * ek.reshape(B, H, nc, m - 1, c - d, N)
        yo = (q @ kq.transpose(-1, -2)) @ v_[..., :c - d, :].unsqueeze(-3)  # [.., m-1, d, V]
        yd = yd + F.pad(yo, (0, 0, 0, 0, 1, 0))

    y = y + yd.reshape(B, H, nc, c, N)
    y = y.reshape(B, H, nc * c, N)[:, :, :T].transpose(1, 2).contiguous()
    return y, S


class _Stretches(NamedTuple):
    chunk_ps: Tensor       # [2c, c]: rows t: j < t; rows c + s: j > s
    pair: Tensor           # [d*d, d]: row (t, s): s < j < t
    pair_bias: Tensor      # [d, d, 1]: 0 where s < t, -inf elsewhere
    sub_ps: Tensor         # [2d, d]: rows t: j < t; rows d + s: j > s (within a sub-chunk)
    between: Tensor        # [(m-1)^2, m]: row (i, b), i = 1..m-1, b = 0..m-2: b < j < i
    between_bias: Tensor   # [m-1, m-1, 1, 1]: 0 where b < i, -inf elsewhere


@functools.lru_cache(maxsize=32)
def _stretches(c: int, d: int, dtype: torch.dtype, device: torch.device) -> _Stretches:
    """0/1 matrices that sum log_w over stretches of time. Each such sum involves exactly the terms
    inside its stretch (never a difference of two prefix sums), so neither it nor its gradient to
    log_w cancels large terms."""
    def within(n: int, lo: int, hi: int) -> Tensor:  # [n, n, n]: lo(t, s) < j < hi(t, s) for rows (t, s)
        j = torch.arange(n)
        return ((j[None, None, :] > lo) & (j[None, None, :] < hi)).to(dtype)

    def prefix_suffix(n: int) -> Tensor:
        i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
        return torch.cat([(j < i), (j > i)]).to(dtype)

    m = c // d
    t, s = torch.arange(d)[:, None, None], torch.arange(d)[None, :, None]
    pair = within(d, s, t).reshape(d * d, d)
    pair_bias = torch.where(t > s, 0.0, float("-inf")).to(dtype)
    i, b = torch.arange(1, m)[:, None, None], torch.arange(m - 1)[None, :, None]
    between = within(m, b, i).reshape((m - 1) ** 2, m) if m > 1 else torch.zeros(0, m, dtype=dtype)
    between_bias = torch.where(i > b, 0.0, float("-inf")).to(dtype)[..., None]
    mats = (prefix_suffix(c), pair, pair_bias, prefix_suffix(d), between, between_bias)
    return _Stretches(*(x.to(device) for x in mats))

"""The WKV recurrences as plain loops over time: the maths in plain sight, and the oracle that
every faster kernel is tested against.

Layouts (fp32 throughout):
    r, k, v, log_w, a, b: [B, T, H, N]
    state:                [B, H, N, N], indexed [batch, head, value, key] (the de-facto file layout)
    returns y [B, T, H, N] and the final state.

`log_w` is the log of the per-channel decay (always <= 0). A position with log_w = 0 and k = v = 0
(and a = b = 0 for v7) leaves the state unchanged: that is how padding is expressed.
"""

from __future__ import annotations

import torch
from torch import Tensor


def wkv5(r: Tensor, k: Tensor, v: Tensor, log_w: Tensor, u: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    """RWKV-5.2 and RWKV-6 (v6 only makes the decay depend on the token).

        y_t = (S + u * v_t k_t^T) r_t
        S   = S * w_t + v_t k_t^T          (w_t scales the key axis)
    """
    T = r.shape[1]
    w = log_w.exp()
    bonus = u[None, :, None, :]  # [1, H, 1, K]
    ys = []
    for t in range(T):
        kv = v[:, t, :, :, None] * k[:, t, :, None, :]  # [B, H, V, K]
        ys.append(((state + bonus * kv) @ r[:, t, :, :, None]).squeeze(-1))
        state = state * w[:, t, :, None, :] + kv
    return torch.stack(ys, dim=1), state


def wkv7(r: Tensor, k: Tensor, v: Tensor, log_w: Tensor, a: Tensor, b: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    """RWKV-7, the generalised delta rule.

        S   = S * w_t + (S a_t) b_t^T + v_t k_t^T
        y_t = S r_t
    (the model passes a = -kk and b = kk * iclr: remove the old value at key kk, write the new one.)
    """
    T = r.shape[1]
    w = log_w.exp()
    ys = []
    for t in range(T):
        sa = state @ a[:, t, :, :, None]  # [B, H, V, 1]
        state = state * w[:, t, :, None, :] + sa * b[:, t, :, None, :] + v[:, t, :, :, None] * k[:, t, :, None, :]
        ys.append((state @ r[:, t, :, :, None]).squeeze(-1))
    return torch.stack(ys, dim=1), state

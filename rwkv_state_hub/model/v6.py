"""RWKV-6 ("Finch"): v5.2 with a data-dependent token shift (ddlerp) and a data-dependent decay."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoint import ModelSpec
from ..wkv import wkv5
from .common import head_norm, linear, lora, neutral_where_padded


class TimeMix(nn.Module):
    def __init__(self, spec: ModelSpec, layer_id: int):
        super().__init__()
        C, H, N = spec.n_embd, spec.n_head, spec.head_size
        self.n_head, self.head_size = H, N
        for name in ("x", "w", "k", "v", "r", "g"):
            setattr(self, f"time_maa_{name}", nn.Parameter(torch.empty(C)))
        self.time_maa_w1 = nn.Parameter(torch.empty(C, 0))
        self.time_maa_w2 = nn.Parameter(torch.empty(5, 0, C))
        self.time_decay = nn.Parameter(torch.empty(C))
        self.time_decay_w1 = nn.Parameter(torch.empty(C, 0))
        self.time_decay_w2 = nn.Parameter(torch.empty(0, C))
        self.time_faaaa = nn.Parameter(torch.empty(H, N))
        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.gate = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(H, C)

    def forward(self, x: Tensor, x_prev: Tensor, state: Tensor, v_first, mask):
        B, T, C = x.shape
        H, N = self.n_head, self.head_size
        dx = x_prev - x
        # five data-dependent interpolation amounts from one shared low-rank map
        m = torch.tanh((x + dx * self.time_maa_x) @ self.time_maa_w1).view(B, T, 5, -1)
        mw, mk, mv, mr, mg = torch.einsum("btfd,fdc->fbtc", m, self.time_maa_w2).unbind(0)

        r = linear(x + dx * (self.time_maa_r + mr), self.receptance).view(B, T, H, N)
        k = linear(x + dx * (self.time_maa_k + mk), self.key).view(B, T, H, N)
        v = linear(x + dx * (self.time_maa_v + mv), self.value).view(B, T, H, N)
        g = F.silu(linear(x + dx * (self.time_maa_g + mg), self.gate))
        wx = x + dx * (self.time_maa_w + mw)
        log_w = -(self.time_decay + lora(wx, self.time_decay_w1, self.time_decay_w2)).exp().view(B, T, H, N)
        k, v, log_w = neutral_where_padded(mask, k, v, log_w)

        y, state = wkv5(r, k, v, log_w, self.time_faaaa, state)
        return linear(head_norm(y, self.ln_x) * g, self.output), state, v_first


class ChannelMix(nn.Module):
    def __init__(self, spec: ModelSpec, layer_id: int):
        super().__init__()
        C, F_ = spec.n_embd, spec.n_ffn
        self.time_maa_k = nn.Parameter(torch.empty(C))
        self.time_maa_r = nn.Parameter(torch.empty(C))
        self.key = nn.Linear(C, F_, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(F_, C, bias=False)

    def forward(self, x: Tensor, x_prev: Tensor) -> Tensor:
        dx = x_prev - x
        k = x + dx * self.time_maa_k
        r = x + dx * self.time_maa_r
        return torch.sigmoid(linear(r, self.receptance)) * linear(torch.relu(linear(k, self.key)) ** 2, self.value)

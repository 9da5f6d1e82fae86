"""RWKV-5.2 ("Eagle"): per-head matrix state, a fixed decay per channel, a bonus u for the current token."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoint import ModelSpec
from ..wkv import wkv5
from .common import head_norm, linear, neutral_where_padded


class TimeMix(nn.Module):
    def __init__(self, spec: ModelSpec, layer_id: int):
        super().__init__()
        C, H, N = spec.n_embd, spec.n_head, spec.head_size
        self.n_head, self.head_size = H, N
        self.time_mix_k = nn.Parameter(torch.empty(C))
        self.time_mix_v = nn.Parameter(torch.empty(C))
        self.time_mix_r = nn.Parameter(torch.empty(C))
        self.time_mix_g = nn.Parameter(torch.empty(C))
        self.time_decay = nn.Parameter(torch.empty(H, N))
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

        def mix(m: Tensor) -> Tensor:
            return x * m + x_prev * (1 - m)

        r = linear(mix(self.time_mix_r), self.receptance).view(B, T, H, N)
        k = linear(mix(self.time_mix_k), self.key).view(B, T, H, N)
        v = linear(mix(self.time_mix_v), self.value).view(B, T, H, N)
        g = F.silu(linear(mix(self.time_mix_g), self.gate))
        log_w = (-self.time_decay.exp()).expand(B, T, H, N)
        k, v, log_w = neutral_where_padded(mask, k, v, log_w)

        y, state = wkv5(r, k, v, log_w, self.time_faaaa, state)
        return linear(head_norm(y, self.ln_x) * g, self.output), state, v_first


class ChannelMix(nn.Module):
    def __init__(self, spec: ModelSpec, layer_id: int):
        super().__init__()
        C, F_ = spec.n_embd, spec.n_ffn
        self.time_mix_k = nn.Parameter(torch.empty(C))
        self.time_mix_r = nn.Parameter(torch.empty(C))
        self.key = nn.Linear(C, F_, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(F_, C, bias=False)

    def forward(self, x: Tensor, x_prev: Tensor) -> Tensor:
        k = x * self.time_mix_k + x_prev * (1 - self.time_mix_k)
        r = x * self.time_mix_r + x_prev * (1 - self.time_mix_r)
        return torch.sigmoid(linear(r, self.receptance)) * linear(torch.relu(linear(k, self.key)) ** 2, self.value)

"""RWKV-7 ("Goose"): the generalised delta rule, a value residual to layer 0, and no receptance in the FFN."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoint import ModelSpec
from ..wkv import wkv7
from .common import head_norm, linear, lora, neutral_where_padded

DECAY_SCALE = math.exp(-0.5)  # w = exp(-e^-0.5 * sigmoid(.)) keeps the decay in [0.545, 1)


class TimeMix(nn.Module):
    def __init__(self, spec: ModelSpec, layer_id: int):
        super().__init__()
        C, H, N = spec.n_embd, spec.n_head, spec.head_size
        self.layer_id = layer_id
        self.n_head, self.head_size = H, N
        for name in ("r", "w", "k", "v", "a", "g"):
            setattr(self, f"x_{name}", nn.Parameter(torch.empty(C)))
        for name in ("w", "a", "v", "g"):
            if name == "v" and layer_id == 0:
                continue  # layer 0 defines v_first, it mixes nothing in
            if name != "g":
                setattr(self, f"{name}0", nn.Parameter(torch.empty(C)))
            setattr(self, f"{name}1", nn.Parameter(torch.empty(C, 0)))
            setattr(self, f"{name}2", nn.Parameter(torch.empty(0, C)))
        self.k_k = nn.Parameter(torch.empty(C))
        self.k_a = nn.Parameter(torch.empty(C))
        self.r_k = nn.Parameter(torch.empty(H, N))
        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(H, C)

    def forward(self, x: Tensor, x_prev: Tensor, state: Tensor, v_first: Tensor | None, mask):
        B, T, C = x.shape
        H, N = self.n_head, self.head_size
        dx = x_prev - x

        r = linear(x + dx * self.x_r, self.receptance)
        k = linear(x + dx * self.x_k, self.key)
        v = linear(x + dx * self.x_v, self.value)
        w = self.w0 + lora(x + dx * self.x_w, self.w1, self.w2)
        a = torch.sigmoid(self.a0 + lora(x + dx * self.x_a, self.a1, self.a2, act=lambda t: t))  # in-context lr
        g = lora(x + dx * self.x_g, self.g1, self.g2, act=torch.sigmoid)

        kk = F.normalize((k * self.k_k).view(B, T, H, N), dim=-1)
        k = k * (1 + (a - 1) * self.k_a)
        if self.layer_id == 0:
            v_first = v
        else:
            v = v + (v_first - v) * torch.sigmoid(self.v0 + lora(x + dx * self.x_v, self.v1, self.v2, act=lambda t: t))
        log_w = -DECAY_SCALE * torch.sigmoid(w)

        rh, kh, vh, ah = (t.view(B, T, H, N) for t in (r, k, v, a))
        kh_, vh_, log_w, kk_ = neutral_where_padded(mask, kh, vh, log_w.view(B, T, H, N), kk)
        y, state = wkv7(rh, kh_, vh_, log_w, -kk_, kk_ * ah, state)

        y = head_norm(y, self.ln_x)
        y = y + ((rh * kh * self.r_k).sum(dim=-1, keepdim=True) * vh).view(B, T, C)  # the current-token bonus
        return linear(y * g, self.output), state, v_first


class ChannelMix(nn.Module):
    def __init__(self, spec: ModelSpec, layer_id: int):
        super().__init__()
        C, F_ = spec.n_embd, spec.n_ffn
        self.x_k = nn.Parameter(torch.empty(C))
        self.key = nn.Linear(C, F_, bias=False)
        self.value = nn.Linear(F_, C, bias=False)

    def forward(self, x: Tensor, x_prev: Tensor) -> Tensor:
        k = x + (x_prev - x) * self.x_k
        return linear(torch.relu(linear(k, self.key)) ** 2, self.value)

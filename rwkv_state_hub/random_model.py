"""Random-weight RWKV checkpoints of any shape, in the official key layout.

For tests and benchmarks that need realistic shapes (head size 64, n_embd 768, vocab 65536) without
downloading anything. Values follow the ranges RWKV-LM's initialisation gives, so the models are
numerically well-behaved (decays in (0, 1), small LoRA maps).
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from .files import atomic_torch_save

LORA_RANKS = {"v6": {"maa": 32, "decay": 64}, "v7": {"w": 64, "a": 64, "v": 32, "g": 128}}


class _Draw:
    """Random tensors from one seeded generator, in the shapes and ranges the official layout uses."""

    def __init__(self, seed: int, n_embd: int) -> None:
        self.g = torch.Generator().manual_seed(seed)
        self.C = n_embd

    def rnd(self, *shape: int, scale: float = 1.0) -> Tensor:
        return torch.randn(*shape, generator=self.g) * scale

    def uni(self, *shape: int, lo: float = 0.0, hi: float = 1.0) -> Tensor:
        return lo + (hi - lo) * torch.rand(*shape, generator=self.g)

    def vec(self, lo: float = 0.0, hi: float = 1.0) -> Tensor:
        return self.uni(1, 1, self.C, lo=lo, hi=hi)

    def mat(self, out: int, inp: int) -> Tensor:
        return self.rnd(out, inp, scale=1 / math.sqrt(inp))

    def norm(self, C: int, lo: float = 0.8, hi: float = 1.2) -> tuple[Tensor, Tensor]:
        return self.uni(C, lo=lo, hi=hi), self.rnd(C, scale=0.05)


def _time_mix_v5(d: _Draw, a: str, H: int, N: int) -> dict[str, Tensor]:
    sd = {a + f"time_mix_{x}": d.vec(0.2, 0.9) for x in "kvrg"}
    sd[a + "time_decay"] = d.uni(H, N, lo=-6.0, hi=1.0)
    sd[a + "time_faaaa"] = d.rnd(H, N, scale=0.5)
    return sd


def _time_mix_v6(d: _Draw, a: str, H: int, N: int, lora_scale: int) -> dict[str, Tensor]:
    r, C = LORA_RANKS["v6"], d.C
    sd = {a + f"time_maa_{x}": d.vec(0.1, 0.9) for x in "xwkvrg"}
    sd[a + "time_maa_w1"] = d.rnd(C, 5 * r["maa"] * lora_scale, scale=0.05)
    sd[a + "time_maa_w2"] = d.rnd(5, r["maa"] * lora_scale, C, scale=0.05)
    sd[a + "time_decay"] = d.uni(1, 1, C, lo=-6.0, hi=1.0)
    sd[a + "time_decay_w1"] = d.rnd(C, r["decay"] * lora_scale, scale=0.05)
    sd[a + "time_decay_w2"] = d.rnd(r["decay"] * lora_scale, C, scale=0.05)
    sd[a + "time_faaaa"] = d.rnd(H, N, scale=0.5)
    return sd


def _time_mix_v7(d: _Draw, a: str, H: int, N: int, lora_scale: int, first: bool) -> dict[str, Tensor]:
    r, C = LORA_RANKS["v7"], d.C
    sd = {a + f"x_{x}": d.vec(0.0, 0.8) for x in "rwkvag"}
    for name in ("w", "a", "v", "g"):
        if name == "v" and first:
            continue  # layer 0 has no value residual
        if name == "w":
            sd[a + "w0"] = d.vec(-6.0, 1.0)
        elif name != "g":
            sd[a + f"{name}0"] = d.vec(-1.0, 1.0)
        sd[a + f"{name}1"] = d.rnd(C, r[name] * lora_scale, scale=0.1)
        sd[a + f"{name}2"] = d.rnd(r[name] * lora_scale, C, scale=0.1)
    sd[a + "k_k"] = d.vec(0.5, 1.0)
    sd[a + "k_a"] = d.vec(0.5, 1.5)
    sd[a + "r_k"] = d.rnd(H, N, scale=0.3)
    return sd


def _channel_mix(d: _Draw, f: str, arch: str, F: int) -> dict[str, Tensor]:
    C = d.C
    if arch == "v5.2":
        sd = {f + "time_mix_k": d.vec(0.2, 0.9), f + "time_mix_r": d.vec(0.2, 0.9)}
    elif arch == "v6":
        sd = {f + "time_maa_k": d.vec(0.1, 0.9), f + "time_maa_r": d.vec(0.1, 0.9)}
    else:
        sd = {f + "x_k": d.vec(0.1, 0.9)}
    sd[f + "key.weight"] = d.mat(F, C)
    sd[f + "value.weight"] = d.mat(C, F) * 0.5
    if arch != "v7":
        sd[f + "receptance.weight"] = d.mat(C, C)
    return sd


def random_checkpoint(
    arch: str,
    n_layer: int = 2,
    n_embd: int = 128,
    head_size: int = 64,
    vocab_size: int = 256,
    n_ffn: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    lora_scale: int = 1,
) -> dict[str, Tensor]:
    """A random v5.2 / v6 / v7 checkpoint as a state dict of the official layout."""
    if arch not in ("v5.2", "v6", "v7"):
        raise ValueError(f"unknown architecture {arch!r}")
    C, N = n_embd, head_size
    H = C // N
    F = n_ffn or (4 * C if arch == "v7" else int(3.5 * C) // 32 * 32)
    d = _Draw(seed, C)
    sd: dict[str, Tensor] = {"emb.weight": d.rnd(vocab_size, C, scale=0.5)}
    for i in range(n_layer):
        b, a = f"blocks.{i}.", f"blocks.{i}.att."
        if i == 0:
            sd[b + "ln0.weight"], sd[b + "ln0.bias"] = d.norm(C)
        for ln in ("ln1", "ln2"):
            sd[b + ln + ".weight"], sd[b + ln + ".bias"] = d.norm(C)
        for name in ("receptance", "key", "value", "output") + (("gate",) if arch != "v7" else ()):
            sd[a + name + ".weight"] = d.mat(C, C)
        sd[a + "ln_x.weight"], sd[a + "ln_x.bias"] = d.norm(C, 0.5, 1.5)
        if arch == "v5.2":
            sd.update(_time_mix_v5(d, a, H, N))
        elif arch == "v6":
            sd.update(_time_mix_v6(d, a, H, N, lora_scale))
        else:
            sd.update(_time_mix_v7(d, a, H, N, lora_scale, first=i == 0))
        sd.update(_channel_mix(d, f"blocks.{i}.ffn.", arch, F))
    sd["ln_out.weight"], sd["ln_out.bias"] = d.norm(C)
    sd["head.weight"] = d.mat(vocab_size, C)
    return {k: v.to(dtype).contiguous() for k, v in sd.items()}


def save_checkpoint(weights: dict[str, Tensor], path: str | os.PathLike) -> None:
    """torch.save a state dict atomically, as BlinkDL's checkpoints are saved."""
    atomic_torch_save(path, weights)

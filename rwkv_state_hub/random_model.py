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
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, scale: float = 1.0) -> Tensor:
        return torch.randn(*shape, generator=g) * scale

    def uni(*shape: int, lo: float = 0.0, hi: float = 1.0) -> Tensor:
        return lo + (hi - lo) * torch.rand(*shape, generator=g)

    def vec(lo: float = 0.0, hi: float = 1.0) -> Tensor:
        return uni(1, 1, C, lo=lo, hi=hi)

    def mat(out: int, inp: int) -> Tensor:
        return rnd(out, inp, scale=1 / math.sqrt(inp))

    sd: dict[str, Tensor] = {"emb.weight": rnd(vocab_size, C, scale=0.5)}
    for i in range(n_layer):
        b, a, f = f"blocks.{i}.", f"blocks.{i}.att.", f"blocks.{i}.ffn."
        if i == 0:
            sd[b + "ln0.weight"], sd[b + "ln0.bias"] = uni(C, lo=0.8, hi=1.2), rnd(C, scale=0.05)
        for ln in ("ln1", "ln2"):
            sd[b + ln + ".weight"], sd[b + ln + ".bias"] = uni(C, lo=0.8, hi=1.2), rnd(C, scale=0.05)
        for name in ("receptance", "key", "value", "output") + (("gate",) if arch != "v7" else ()):
            sd[a + name + ".weight"] = mat(C, C)
        sd[a + "ln_x.weight"], sd[a + "ln_x.bias"] = uni(C, lo=0.5, hi=1.5), rnd(C, scale=0.05)
        if arch == "v5.2":
            for x in "kvrg":
                sd[a + f"time_mix_{x}"] = vec(0.2, 0.9)
            sd[a + "time_decay"] = uni(H, N, lo=-6.0, hi=1.0)
            sd[a + "time_faaaa"] = rnd(H, N, scale=0.5)
        elif arch == "v6":
            r = LORA_RANKS["v6"]
            for x in "xwkvrg":
                sd[a + f"time_maa_{x}"] = vec(0.1, 0.9)
            sd[a + "time_maa_w1"] = rnd(C, 5 * r["maa"] * lora_scale, scale=0.05)
            sd[a + "time_maa_w2"] = rnd(5, r["maa"] * lora_scale, C, scale=0.05)
            sd[a + "time_decay"] = uni(1, 1, C, lo=-6.0, hi=1.0)
            sd[a + "time_decay_w1"] = rnd(C, r["decay"] * lora_scale, scale=0.05)
            sd[a + "time_decay_w2"] = rnd(r["decay"] * lora_scale, C, scale=0.05)
            sd[a + "time_faaaa"] = rnd(H, N, scale=0.5)
        else:
            r = LORA_RANKS["v7"]
            for x in "rwkvag":
                sd[a + f"x_{x}"] = vec(0.0, 0.8)
            for name in ("w", "a", "v", "g"):
                if name == "v" and i == 0:
                    continue
                rank = r[name] * lora_scale
                if name == "w":
                    sd[a + "w0"] = vec(-6.0, 1.0)
                elif name != "g":
                    sd[a + f"{name}0"] = vec(-1.0, 1.0)
                sd[a + f"{name}1"] = rnd(C, rank, scale=0.1)
                sd[a + f"{name}2"] = rnd(rank, C, scale=0.1)
            sd[a + "k_k"] = vec(0.5, 1.0)
            sd[a + "k_a"] = vec(0.5, 1.5)
            sd[a + "r_k"] = rnd(H, N, scale=0.3)
        if arch == "v5.2":
            sd[f + "time_mix_k"], sd[f + "time_mix_r"] = vec(0.2, 0.9), vec(0.2, 0.9)
        elif arch == "v6":
            sd[f + "time_maa_k"], sd[f + "time_maa_r"] = vec(0.1, 0.9), vec(0.1, 0.9)
        else:
            sd[f + "x_k"] = vec(0.1, 0.9)
        sd[f + "key.weight"] = mat(F, C)
        sd[f + "value.weight"] = mat(C, F) * 0.5
        if arch != "v7":
            sd[f + "receptance.weight"] = mat(C, C)
    sd["ln_out.weight"], sd["ln_out.bias"] = uni(C, lo=0.8, hi=1.2), rnd(C, scale=0.05)
    sd["head.weight"] = mat(vocab_size, C)
    return {k: v.to(dtype).contiguous() for k, v in sd.items()}


def save_checkpoint(weights: dict[str, Tensor], path: str | os.PathLike) -> None:
    """torch.save a state dict atomically, as BlinkDL's checkpoints are saved."""
    atomic_torch_save(path, weights)

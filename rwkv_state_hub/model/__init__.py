"""The frozen RWKV model (v5.2, v6, v7) that state tuning trains a state for.

LoRA ranks (v6/v7) are not fixed by the architecture: the module is built with empty placeholders
and every tensor is taken from the checkpoint as it is.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from ..checkpoint import ModelSpec, read_checkpoint, spec_from_state_dict
from ..files import page_out_file_pages, release_free_heap
from . import v5, v6, v7
from .common import RWKV, EncodedState, LearnedState, RecurrentState
from .quant import QuantizedLinear, check_kind, quantize_model, quantized_names

_MIXERS = {"v5.2": (v5.TimeMix, v5.ChannelMix), "v6": (v6.TimeMix, v6.ChannelMix), "v7": (v7.TimeMix, v7.ChannelMix)}


def build_model(
    spec: ModelSpec,
    weights: dict[str, Tensor],
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    compute_dtype: torch.dtype = torch.float32,
    quant: str | None = None,
) -> RWKV:
    """Put checkpoint tensors into an RWKV module. Matrices (Linear, embedding, head) take `dtype`
    (default: as stored); everything else takes `compute_dtype` (fp32; fp64 only for gradient checks).
    `quant` ("int8", "nf4"): the Linear matrices are quantized straight from the checkpoint's tensors, one at a
    time, with matmuls in `dtype` (quant.py); the model still holds every tensor it keeps as its own copy, so a
    memory-mapped checkpoint is unmapped once loaded and its pages stop counting. Whatever is converted or
    copied, the file's pages it was read from are handed back at once (they would count in RSS for as long as
    any tensor of the file is still mapped).
    The embedding is a lookup, so it is never widened (a bf16 table stays bf16: each looked-up row is
    widened exactly, and the widened table, 200 MB for a 0.1B model, never exists). Tensors already in
    the wanted dtype are used as they are, not copied: with a memory-mapped checkpoint the model holds
    the only copy. No weight ever requires a gradient."""
    check_kind(quant)
    with torch.device("meta"):
        model = RWKV(spec, *_MIXERS[spec.arch])
    linear_weights = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.Linear | nn.Embedding)}
    quantized = {f"{name}.weight" for name in quantized_names(model)} if quant else set()
    for name, param in list(model.named_parameters()):
        t = weights[name]
        t = t.reshape(-1) if param.dim() == 1 else t
        if name in quantized:
            model.set_submodule(name.rpartition(".")[0], QuantizedLinear.from_weight(t.to(device), quant, dtype))
            continue
        want = (dtype or t.dtype) if name in linear_weights else compute_dtype
        widened_embedding = name == "emb.weight" and want.itemsize > t.dtype.itemsize
        if widened_embedding:
            want = t.dtype
        # its own copy when converted, when quantizing (the memory-mapped file is unmapped once loaded) and for an
        # embedding kept narrower than the other matrices (then nothing else needs the file either)
        if want != t.dtype or (quant and t.device.type == "cpu") or widened_embedding:
            t = _copied(t, want, device)
        else:
            t = t.to(device)
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, nn.Parameter(t, requires_grad=False))
    release_free_heap()  # the conversions' and quantization's temporaries
    return model.eval()


COPY_BLOCK_BYTES = 16 << 20  # of a checkpoint's tensor read at once while it is copied or converted


def _copied(t: Tensor, dtype: torch.dtype, device: str | torch.device) -> Tensor:
    """A copy of `t` in `dtype`, made COPY_BLOCK_BYTES of it at a time, each block's file pages handed back once
    read: widening a memory-mapped 1.5B model's bf16 head to fp32 holds 16 MiB of the file at once, not 256."""
    out = torch.empty(t.shape, dtype=dtype, device=device)  # t has a dimension: build_model's 1-D or more
    row_bytes = t[0].numel() * t.element_size() if len(t) else 1
    rows = max(1, COPY_BLOCK_BYTES // max(1, row_bytes))
    for r in range(0, len(t), rows):
        out[r : r + rows].copy_(t[r : r + rows])
        page_out_file_pages(t[r : r + rows])
    return out


def load_model(
    path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
    quant: str | None = None,
) -> RWKV:
    """Read a BlinkDL `.pth` checkpoint (safely, memory-mapped) into a frozen model; `quant` ("int8", "nf4")
    stores its matrices quantized (build_model)."""
    spec, weights = read_checkpoint(path)
    return build_model(spec, weights, dtype=dtype, device=device, quant=quant)


def model_from_state_dict(weights: dict[str, Tensor], dtype: torch.dtype | None = None, **kwargs) -> RWKV:
    """A model straight from tensors in the official key layout (random test models, notebooks)."""
    return build_model(spec_from_state_dict(weights), weights, dtype=dtype, **kwargs)


__all__ = [
    "RWKV", "EncodedState", "LearnedState", "RecurrentState", "build_model", "load_model", "model_from_state_dict",
    "quantize_model",
]

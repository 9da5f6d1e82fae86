"""Frozen matrices stored quantized (`--quant int8|nf4`): the same weights in 1 or about 0.56 byte each.

State tuning never computes a weight gradient, so a matrix is only ever used two ways: y = x W^T (forward)
and g W (the gradient sent back to x, towards the state). `QuantizedLinear` does both from its int8 or NF4
codes, dequantizing CHUNK_BYTES of rows at a time into the matmul dtype (bf16 or fp32: the dtype the matrix
had), so a full-precision copy of a matrix never exists, not even for an instant. Everything else (the
embedding, norms, LoRA maps, the recurrence and the state) is untouched and stays fp32.

- int8: one scale per output row (absmax / 127); the scale multiplies the output, so dequantizing is a cast.
- nf4: QLoRA's 16 NormalFloat levels, one absmax per block of 64 weights along a row, two codes per byte.

docs/quantization.md has the measurements behind this choice (and why not torchao or bitsandbytes).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import InvalidCheckpointError
from ..files import page_out_file_pages

KINDS = ("int8", "nf4")
BLOCK = 64  # nf4: weights per absmax
CHUNK_BYTES = 8 << 20  # dequantized weights alive at once (16 MiB was no faster, on the 0.1B and 1.5B shapes)
QUANTIZE_CHUNK_WEIGHTS = 1 << 18  # weights quantized at once: small temporaries, so the heap does not grow
# QLoRA's NormalFloat4 (Dettmers et al. 2023, bitsandbytes): quantiles of N(0, 1) scaled to [-1, 1], exact 0
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
])
_NF4_EDGES = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2  # a value goes to the nearest level
_BYTES = torch.arange(256)
_NF4_PAIRS = torch.stack((NF4_LEVELS[_BYTES >> 4], NF4_LEVELS[_BYTES & 15]), 1)  # byte -> (even, odd) column
_SCRATCH = threading.local()  # _buffer's, one set per thread


def _buffer(name: str, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """This thread's buffer `name` of `dtype` on `device`, at least `numel` long (grown when a larger one is
    asked for, never shrunk), as a flat view of exactly `numel` elements."""
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    key = (name, dtype, device)
    if key not in buffers or buffers[key].numel() < numel:
        buffers.pop(key, None)
        buffers[key] = torch.empty(numel, dtype=dtype, device=device)
    return buffers[key][:numel]


def check_kind(kind: str | None) -> None:
    """ValueError unless `kind` is None (no quantization) or one of KINDS."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown quantization {kind!r}; choose from {', '.join(KINDS)}")


def _rows_per_chunk(in_features: int, itemsize: int) -> int:
    return max(1, CHUNK_BYTES // (in_features * itemsize))


def scratch_bytes(kind: str, shapes: Iterable[tuple[int, int]], dtype: torch.dtype) -> int:
    """What a thread's buffers (`_buffer`) hold once matrices of these [out, in] shapes, quantized as `kind`,
    have run with matmuls in `dtype`: the widest chunk of dequantized rows, and for nf4 its codes widened to
    int32. For a memory budget, before the model is loaded."""
    rows_out = rows_index = 0
    for out_features, in_features in shapes:
        width = in_features if kind == "int8" else -(-in_features // BLOCK) * BLOCK
        rows = min(out_features, _rows_per_chunk(in_features, dtype.itemsize))
        rows_out = max(rows_out, rows * width * dtype.itemsize)
        rows_index = max(rows_index, rows * width // 2 * 4 if kind == "nf4" else 0)
    return rows_out + rows_index


def _quantize_rows(w: Tensor, kind: str) -> tuple[Tensor, Tensor]:
    """Codes and scales of some rows of a matrix (any float dtype; worked out in fp32)."""
    w = w.float()
    if kind == "int8":
        scale = w.abs().amax(1) / 127
        q = (w / torch.where(scale > 0, scale, 1.0)[:, None]).round_().clamp_(-127, 127)
        return q.to(torch.int8), scale
    rows, cols = w.shape
    padded = -cols % BLOCK
    blocks = F.pad(w, (0, padded)).view(rows, -1, BLOCK)
    absmax = blocks.abs().amax(-1)
    idx = torch.bucketize(blocks / torch.where(absmax > 0, absmax, 1.0)[..., None], _NF4_EDGES.to(w.device),
                          out_int32=True).view(rows, -1)
    return ((idx[:, 0::2] << 4) | idx[:, 1::2]).to(torch.uint8), absmax


class QuantizedLinear(nn.Module):
    """A frozen bias-free nn.Linear whose weight [out_features, in_features] is held as int8 or NF4 codes
    (buffers `codes` and `scale`). `matmul(x)` = x W^T and `matmul_t(g)` = g W, both in `dtype`; calling
    the module is `matmul` with a backward pass that sends the gradient to x (never to the weight)."""

    def __init__(self, kind: str, codes: Tensor, scale: Tensor, in_features: int, dtype: torch.dtype):
        super().__init__()
        check_kind(kind)
        self.kind, self.in_features, self.out_features, self.dtype = kind, in_features, codes.shape[0], dtype
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale)

    @classmethod
    def from_weight(cls, weight: Tensor, kind: str, dtype: torch.dtype | None = None) -> QuantizedLinear:
        """Quantize a weight a chunk of rows at a time (a memory-mapped weight is read, never copied whole).
        `dtype`: of the matmuls (default: the weight's own)."""
        check_kind(kind)
        out_features, in_features = weight.shape
        step = max(1, QUANTIZE_CHUNK_WEIGHTS // in_features)
        codes = scale = None
        for a in range(0, out_features, step):
            rows = weight[a : a + step]
            c, s = _quantize_rows(rows, kind)
            if codes is None:  # filled in place: no list of parts and no second copy to join them
                codes = c.new_empty(out_features, *c.shape[1:])
                scale = s.new_empty(out_features, *s.shape[1:])
            codes[a : a + step], scale[a : a + step] = c, s
            page_out_file_pages(rows)  # the rows' file pages as soon as they are read (a 65k head: 100+ MB)
        if not bool(torch.isfinite(scale).all()):
            raise InvalidCheckpointError("a matrix holds non-finite values (NaN or inf): it cannot be quantized")
        page_out_file_pages(weight)
        return cls(kind, codes, scale, in_features, dtype or weight.dtype)

    def extra_repr(self) -> str:
        return f"{self.kind}, in_features={self.in_features}, out_features={self.out_features}, dtype={self.dtype}"

    def dequantize(self, start: int = 0, stop: int | None = None, scratch: bool = False) -> Tensor:
        """Rows start:stop of the weight in `dtype` (for int8 without the row scale, which `matmul` applies).
        scratch=True: written into this thread's reusable buffers (valid until the next such call), for the
        matmuls: a fresh 8-16 MB for each product (hundreds a step) fragments the C heap, which then grew by
        0.3-0.6 GB over a 0.4B step; the buffers are also faster."""
        codes = self.codes[start:stop]
        rows, width = codes.shape[0], codes.shape[1] * (1 if self.kind == "int8" else 2)
        out = _buffer("out", rows * width, self.dtype, codes.device) if scratch else None
        if self.kind == "int8":
            out = torch.empty(codes.shape, dtype=self.dtype, device=codes.device) if out is None else out
            return out.view(codes.shape).copy_(codes)
        index = codes.reshape(-1)
        index = _buffer("index", index.numel(), torch.int32, codes.device).copy_(index) if scratch else index.int()
        pairs = _NF4_PAIRS.to(device=codes.device, dtype=self.dtype)
        w = torch.index_select(pairs, 0, index, out=None if out is None else out.view(-1, 2))
        w = w.view(rows, -1, BLOCK).mul_(self.scale[start:stop, :, None].to(self.dtype))
        return w.view(rows, -1)[:, : self.in_features]

    def to_dense(self) -> Tensor:
        """The whole weight as the matmuls see it, in `dtype` (a full copy: for tests and inspection only)."""
        w = self.dequantize()
        return w * self.scale[:, None].to(self.dtype) if self.kind == "int8" else w

    @property
    def block_rows(self) -> int:
        """Rows in each of row_blocks' blocks (the last may be shorter)."""
        return _rows_per_chunk(self.in_features, self.dtype.itemsize)

    def row_blocks(self) -> Iterator[tuple[int, Tensor, Tensor | None]]:
        """(first row, rows in `dtype`, their int8 row scales or None for nf4), CHUNK_BYTES of rows at a time:
        each block is dequantized into this thread's buffers, valid until the next block."""
        step = self.block_rows
        for a in range(0, self.out_features, step):
            rows = self.dequantize(a, a + step, scratch=True)
            yield a, rows, self.scale[a : a + step] if self.kind == "int8" else None

    def matmul(self, x: Tensor) -> Tensor:
        """x [..., in] -> x W^T [..., out] in x's dtype; the products in `dtype`."""
        x2 = x.reshape(-1, self.in_features).to(self.dtype)
        out = torch.empty(x2.shape[0], self.out_features, dtype=x.dtype, device=x.device)
        for a, rows, scale in self.row_blocks():
            part = out[:, a : a + rows.shape[0]]
            part.copy_(x2 @ rows.T)
            if scale is not None:
                part.mul_(scale.to(x.dtype))
        return out.view(*x.shape[:-1], self.out_features)

    def matmul_t(self, g: Tensor) -> Tensor:
        """g [..., out] -> g W [..., in] in g's dtype (the gradient w.r.t. the input of `matmul`)."""
        g2 = g.reshape(-1, self.out_features)
        out = None
        for a, rows, scale in self.row_blocks():
            ga = g2[:, a : a + rows.shape[0]]
            if scale is not None:
                ga = ga * scale.to(g.dtype)
            part = ga.to(self.dtype) @ rows
            out = part.to(g.dtype) if out is None else out.add_(part)
        return out.view(*g.shape[:-1], self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        return _QuantizedMatmul.apply(x, self)


class _QuantizedMatmul(torch.autograd.Function):
    """y = x W^T whose backward is g W only. It saves no tensor: the codes are the module's (the autograd
    graph, activation checkpointing and memory.saved_bytes_per_token see no weight)."""

    @staticmethod
    def forward(ctx, x: Tensor, layer: QuantizedLinear) -> Tensor:
        ctx.layer = layer
        return layer.matmul(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return ctx.layer.matmul_t(grad), None


def quantized_names(model: nn.Module) -> list[str]:
    """The matrices `common.linear` multiplies by (every nn.Linear: att, ffn and the head), by module name."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def quantize_model(model: nn.Module, kind: str, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every nn.Linear of a loaded model by its QuantizedLinear (in place; returns the model), dropping
    the original weights. `dtype`: of the matmuls (default: each weight's own). The model stays the same base
    model (spec, sha256 and fingerprint), run from rounded weights: its states load on the unquantized one."""
    check_kind(kind)
    for name in quantized_names(model):
        layer = model.get_submodule(name)
        model.set_submodule(name, QuantizedLinear.from_weight(layer.weight.detach(), kind, dtype))
        del layer.weight
    return model


def allocate_scratch(model: nn.Module) -> None:
    """Grow this thread's buffers to what the model's quantized matrices will use (each dequantizes its first
    chunk of rows), so that RSS read now counts them: the head's, the widest, is otherwise only reached in the
    first step."""
    for layer in model.modules():
        if isinstance(layer, QuantizedLinear):
            layer.dequantize(0, layer.block_rows, scratch=True)


def quantization(model: nn.Module) -> str | None:
    """"int8" or "nf4" if the model's matrices are quantized, else None."""
    return next((m.kind for m in model.modules() if isinstance(m, QuantizedLinear)), None)


def matrix_dtype(layer: nn.Module) -> torch.dtype:
    """The dtype a Linear or QuantizedLinear multiplies in (what `--precision` chose)."""
    return layer.dtype if isinstance(layer, QuantizedLinear) else layer.weight.dtype

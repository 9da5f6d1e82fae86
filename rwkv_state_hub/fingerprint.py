"""A base model's weights fingerprint (`rwkvfp1`): the same for every file and dtype form of the same weights,
different when a weight changes beyond what those conversions round away. docs/model_forms.md (section 4)
derives it; in short:

1. the tensors the model uses, by their official names and layouts (other forms are mapped to those first);
   vectors stored [1, 1, C] or [C] alike are hashed as [C];
2. every value rounded once to bfloat16 (round to nearest even: a no-op for bf16 weights, and exact for any
   bf16 value passed through fp16 or fp32), then what fp16 cannot hold made equal in every form: magnitudes
   below 2^-14 become +0, above 65504 become +-inf;
3. sha256 of each tensor's 16-bit patterns (little-endian, C order), streamed 4M values at a time; the
   fingerprint is sha256 over a header (the version, arch and dims) and one line per tensor (name, shape, digest).

A model first saved in fp32 and then rounded separately to fp16 and to bf16 gives two fingerprints (double
rounding cannot be undone); a change below half a bf16 ulp (2^-9 relative) is not seen, by design.
"""

from __future__ import annotations

import hashlib
import os
import re

import torch

from .checkpoint import ModelSpec, expected_tensors
from .errors import InvalidCheckpointError
from .files import cached_by_stamp, page_out_file_pages, release_free_heap

VERSION = "rwkvfp1"
_CHUNK = 1 << 22
_MIN_NORMAL_FP16 = 0x3880  # bf16 bit pattern of 2^-14, fp16's smallest normal magnitude
_MAX_FP16 = 0x477F  # the largest bf16 pattern not above 65504 (65280)
_INF = 0x7F80
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def canonical_bits(t: torch.Tensor) -> torch.Tensor:
    """The 16-bit patterns (as int32, 0..65535) a value of any form of the same bf16 weights maps to (the
    module's step 2)."""
    bits = t.to(torch.bfloat16).contiguous().view(torch.int16).to(torch.int32) & 0xFFFF
    sign, mag = bits & 0x8000, bits & 0x7FFF
    bits = torch.where(mag < _MIN_NORMAL_FP16, torch.zeros_like(bits), bits)
    return torch.where(mag > _MAX_FP16, sign | _INF, bits)


def tensor_digest(name: str, t: torch.Tensor) -> str:
    """sha256 of a tensor's canonical bits, a chunk at a time (a 4M-value temporary, whatever its size)."""
    flat = t.reshape(-1)
    h = hashlib.sha256()
    for start in range(0, flat.numel(), _CHUNK):
        chunk = flat[start : start + _CHUNK]
        if not bool(torch.isfinite(chunk).all()):
            raise InvalidCheckpointError(f"{name} holds non-finite values (NaN or inf): the model cannot work")
        h.update(canonical_bits(chunk).numpy().astype("<u2").tobytes())
    return h.hexdigest()


def _order(name: str) -> tuple:
    """Names outside the blocks first, sorted; then the blocks by number, names sorted within each."""
    m = _BLOCK.match(name)
    return (1, int(m.group(1)), name) if m else (0, 0, name)


def canonical_shape(t: torch.Tensor) -> tuple[int, ...]:
    """The shape without leading 1s: [1, 1, C] and [C] are one vector."""
    shape = tuple(t.shape)
    while len(shape) > 1 and shape[0] == 1:
        shape = shape[1:]
    return shape


def fingerprint(spec: ModelSpec, weights: dict[str, torch.Tensor]) -> str:
    """`rwkvfp1:<64 hex>` of the weights a model of `spec` uses, in the official names and layouts."""
    names = expected_tensors(spec.arch, spec.n_layer, spec.n_embd, spec.n_head, spec.head_size, spec.n_ffn,
                             spec.vocab_size)
    lines = []
    for name in sorted(names, key=_order):
        t = weights[name]
        shape = "x".join(map(str, canonical_shape(t)))
        lines.append(f"{name} {shape} {tensor_digest(f'{spec.path or spec.name}: {name}', t)}\n")
        page_out_file_pages(t)  # a memory-mapped file: its pages, read once, stop counting in RSS
    header = f"{VERSION}\n{spec.arch} L{spec.n_layer} C{spec.n_embd} N{spec.head_size} V{spec.vocab_size}\n"
    return f"{VERSION}:" + hashlib.sha256((header + "".join(lines)).encode()).hexdigest()


def file_fingerprint(path: str | os.PathLike) -> str:
    """The fingerprint of a model file, cached by (absolute path, size, mtime) like its sha256."""
    from .checkpoint import read_checkpoint

    def compute() -> dict[str, str]:
        spec, weights = read_checkpoint(path)
        found = fingerprint(spec, weights)
        del weights
        release_free_heap()  # the pass's temporaries: 0.1 GB of heap at 0.4B that a training run would keep
        return {"fingerprint": found}

    return cached_by_stamp(path, VERSION, ("fingerprint",), compute)["fingerprint"]

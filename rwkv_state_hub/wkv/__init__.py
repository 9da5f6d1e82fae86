"""The WKV recurrence with a state in, a state out and (through autograd) a gradient to everything.

Implementations with one signature each:
    reference.py  plain loops over time: the maths in plain sight, the oracle
    chunked5.py   RWKV-5.2 / RWKV-6 in chunks (torch only: the fallback, and the path for CUDA tensors)
    chunked7.py   RWKV-7 in chunked WY form (torch only: the fallback, and the path for CUDA tensors)
    cpu.py        the C++ CPU kernels in csrc/wkv_cpu.cpp (built on first use): the fast CPU path
    cuda.py       the CUDA kernels in csrc/ (built on first use; not yet verified on hardware)
`wkv5` and `wkv7` below pick ("auto") the CPU kernels for CPU tensors and the chunked torch path for CUDA
ones; RWKV_STATE_HUB_WKV=chunked, reference, cpu or cuda selects one (the loops check a result or measure the
difference; a kernel that cannot run falls back to the chunked path, saying why in one line). `set_backend`
does the same from code (the trainer's `--kernel`).
"""

from __future__ import annotations

import os

from torch import Tensor

from . import cpu, reference
from .chunked5 import wkv5_chunked
from .chunked7 import wkv7_fast

BACKENDS = ("auto", "chunked", "reference", "cpu", "cuda")
_chosen: str | None = None  # set_backend's choice; wins over the environment


def backend() -> str:
    """One of BACKENDS ('auto' by default): set_backend's choice, else RWKV_STATE_HUB_WKV; read on every call."""
    name = _chosen or os.environ.get("RWKV_STATE_HUB_WKV", "auto")
    if name not in BACKENDS:
        raise ValueError(f"RWKV_STATE_HUB_WKV={name!r}: expected one of {', '.join(BACKENDS)}")
    return name


def set_backend(name: str | None) -> str | None:
    """Choose the backend from code (None: back to RWKV_STATE_HUB_WKV); returns the previous choice."""
    global _chosen
    if name is not None and name not in BACKENDS:
        raise ValueError(f"WKV backend {name!r}: expected one of {', '.join(BACKENDS)}")
    previous, _chosen = _chosen, name
    return previous


def wkv5(r: Tensor, k: Tensor, v: Tensor, log_w: Tensor, u: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    """RWKV-5.2 / RWKV-6: see reference.wkv5 for the maths and layouts."""
    name = backend()
    if name == "reference":
        return reference.wkv5(r, k, v, log_w, u, state)
    if name == "cuda":
        from . import cuda

        return cuda.wkv5(r, k, v, log_w, u, state)
    if name == "cpu" or (name == "auto" and not r.is_cuda):
        return cpu.wkv5(r, k, v, log_w, u, state)
    return wkv5_chunked(r, k, v, log_w, u, state)


def wkv7(r: Tensor, k: Tensor, v: Tensor, log_w: Tensor, a: Tensor, b: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    """RWKV-7: see reference.wkv7 for the maths and layouts."""
    name = backend()
    if name == "reference":
        return reference.wkv7(r, k, v, log_w, a, b, state)
    if name == "cuda":
        from . import cuda

        return cuda.wkv7(r, k, v, log_w, a, b, state)
    if name == "cpu" or (name == "auto" and not r.is_cuda):
        return cpu.wkv7(r, k, v, log_w, a, b, state)
    return wkv7_fast(r, k, v, log_w, a, b, state)


__all__ = ["BACKENDS", "backend", "reference", "set_backend", "wkv5", "wkv7"]

"""The WKV recurrence with a state in, a state out and (through autograd) a gradient to everything.

Two implementations with one signature each:
    reference.py  plain loops over time: the maths in plain sight, the oracle
    chunked5.py   RWKV-5.2 / RWKV-6 in chunks (the fast CPU path)
    chunked7.py   RWKV-7 in chunked WY form (the fast CPU path)
`wkv5` and `wkv7` below pick the chunked ones; RWKV_STATE_HUB_WKV=reference selects the loops (to
check a result, or to measure the difference).
"""

from __future__ import annotations

import os

from torch import Tensor

from . import reference
from .chunked5 import wkv5_chunked
from .chunked7 import wkv7_fast


def backend() -> str:
    """'chunked' (default) or 'reference', from RWKV_STATE_HUB_WKV; read on every call."""
    name = os.environ.get("RWKV_STATE_HUB_WKV", "chunked")
    if name not in ("chunked", "reference"):
        raise ValueError(f"RWKV_STATE_HUB_WKV={name!r}: expected 'chunked' or 'reference'")
    return name


def wkv5(r: Tensor, k: Tensor, v: Tensor, log_w: Tensor, u: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    """RWKV-5.2 / RWKV-6: see reference.wkv5 for the maths and layouts."""
    if backend() == "reference":
        return reference.wkv5(r, k, v, log_w, u, state)
    return wkv5_chunked(r, k, v, log_w, u, state)


def wkv7(r: Tensor, k: Tensor, v: Tensor, log_w: Tensor, a: Tensor, b: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    """RWKV-7: see reference.wkv7 for the maths and layouts."""
    if backend() == "reference":
        return reference.wkv7(r, k, v, log_w, a, b, state)
    return wkv7_fast(r, k, v, log_w, a, b, state)


__all__ = ["backend", "reference", "wkv5", "wkv7"]

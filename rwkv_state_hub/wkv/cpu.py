"""The CPU kernels (csrc/wkv_cpu.cpp, csrc/xent_cpu.cpp): the WKV recurrence one step at a time in C++, and the
cross-entropy through a bf16 head; one small library compiled for this machine's CPU on first use.

`wkv5` and `wkv7` have the signatures, layouts and results of `reference.py` and run for CPU tensors in fp32,
bf16 or fp16 (the maths in fp32; gradients come back in the inputs' dtypes) and head size 8, 16, 32 or 64.
Anything else (no C++ compiler, a failed build, CUDA or float64 tensors, another head size) is said once, in
one line on stderr, and runs the chunked torch path instead.

The library is plain C++ behind a C interface, called through ctypes on the tensors' memory (which this module
allocates and checks), built with `c++ -O3 -march=native` (about a second) into <cache_dir>/torch_extensions
(or $TORCH_EXTENSIONS_DIR), in a folder named after a hash of the sources and this CPU's model. Its threads are
OpenMP's, torch.get_num_threads() of them over the heads (torch's own libgomp); ctypes releases the GIL.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import sys
from functools import cache

import torch
from torch import Tensor

from .build import SharedLibrary
from .chunked5 import wkv5_chunked
from .chunked7 import wkv7_fast

HEAD_SIZES = (8, 16, 32, 64)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _cpu_model() -> str:
    """A short tag of this CPU's model (a build with -march=native may not run on another)."""
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line for line in f if line.startswith("model name")), "")
    except OSError:
        name = platform.processor()
    return hashlib.sha256(name.encode()).hexdigest()[:8]


# OpenMP for the threads where the compiler has it (GCC, and torch's libgomp is the one loaded); Apple's clang has
# not: one thread there
_OPENMP = () if sys.platform == "darwin" else ("-fopenmp",)
LIBRARY = SharedLibrary(
    name="rwkv_state_hub_cpu",
    what="CPU kernels",
    sources=("wkv_cpu.cpp", "xent_cpu.cpp"),
    headers=(),
    tag=f"{platform.machine()}-{_cpu_model()}",
    cflags=("-O3", "-march=native" if platform.machine() in ("x86_64", "AMD64") else "-mcpu=native", *_OPENMP),
)

_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_SIGNATURES = {
    "wkv7_forward": [_I64] * 4 + [ctypes.c_int] + [_P] * 10,
    "wkv7_backward": [_I64] * 4 + [ctypes.c_int] + [_P] * 16,
    "wkv5_forward": [_I64] * 4 + [ctypes.c_int] + [_P] * 9,
    "wkv5_backward": [_I64] * 4 + [ctypes.c_int] + [_P] * 13,
    "xent_bf16": [_I64, _I64, ctypes.c_int] + [_P] * 4,
}


def unavailable_reason() -> str | None:
    """Why the kernels cannot be built here (None when they can), without building anything."""
    return LIBRARY.unavailable_reason()


@cache
def _typed(lib: ctypes.CDLL) -> ctypes.CDLL:
    for name, args in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, ctypes.c_int
    lib.wkv_chunk.restype = ctypes.c_int
    return lib


def load() -> ctypes.CDLL | None:
    """The compiled library (built on first use), or None after saying why in one line.
    RWKV_STATE_HUB_CPU_KERNELS=0 turns it off (the torch paths: to compare, or to measure them)."""
    if os.environ.get("RWKV_STATE_HUB_CPU_KERNELS") == "0":
        LIBRARY.tell("RWKV_STATE_HUB_CPU_KERNELS=0")
        return None
    lib = LIBRARY.load(unavailable_reason)
    return None if lib is None else _typed(lib)


def turn_off(reason: str) -> None:
    """Run the torch paths from now on in this process, silently (the benchmarks' baseline)."""
    LIBRARY.module, LIBRARY.reason = None, reason
    LIBRARY.told.add(reason)


def _kernel_for(r: Tensor) -> ctypes.CDLL | None:
    """The library when these inputs can use it; otherwise None (after saying why, once)."""
    if r.is_cuda:
        LIBRARY.tell(f"the tensors are on {r.device.type}")
    elif r.dtype not in DTYPES:
        LIBRARY.tell(f"{r.dtype} inputs: the kernels compute in float32")
    elif r.shape[-1] not in HEAD_SIZES:
        LIBRARY.tell(f"head size {r.shape[-1]}: the kernels are built for {', '.join(map(str, HEAD_SIZES))}")
    elif r.shape[1] > 0:
        return load()
    return None


def _p(x: Tensor) -> int:
    return x.data_ptr()


def _call(fn, r: Tensor, *tensors: Tensor | None) -> None:
    B, T, H, N = r.shape
    if fn(B, T, H, N, torch.get_num_threads(), *(None if x is None else _p(x) for x in tensors)):
        raise ValueError(f"{fn.__name__}: head size {N} is not built")


def _fp32(*xs: Tensor) -> list[Tensor]:
    return [x.detach().float().contiguous() for x in xs]


def _checkpoints(lib: ctypes.CDLL, r: Tensor) -> Tensor:
    B, T, H, N = r.shape
    return r.new_empty(B * H, -(-T // lib.wkv_chunk()), N, N)


def _upstream(r: Tensor, gy: Tensor | None, gs: Tensor | None) -> tuple[Tensor, Tensor]:
    B, T, H, N = r.shape
    gy = torch.zeros_like(r) if gy is None else gy.float().contiguous()
    gs = r.new_zeros(B, H, N, N) if gs is None else gs.float().contiguous()
    return gy, gs


class _WKV7(torch.autograd.Function):
    @staticmethod
    def forward(ctx, lib, r: Tensor, k: Tensor, v: Tensor, log_w: Tensor, a: Tensor, b: Tensor, state: Tensor):
        r32, k32, v32, w, a32, b32 = _fp32(r, k, v, log_w.exp(), a, b)
        s0 = state.detach().float().contiguous()
        keep = any(ctx.needs_input_grad)
        y, final = torch.empty_like(r32), torch.empty_like(s0)
        ckpt = _checkpoints(lib, r32) if keep else None
        _call(lib.wkv7_forward, r32, r32, k32, v32, w, a32, b32, s0, y, final, ckpt)
        if keep:
            ctx.lib = lib
            ctx.dtypes = [x.dtype for x in (r, k, v, log_w, a, b, state)]
            ctx.save_for_backward(r32, k32, v32, w, a32, b32, ckpt)
        return y.to(r.dtype), final

    @staticmethod
    def backward(ctx, gy: Tensor | None, gs: Tensor | None):
        r, k, v, w, a, b, ckpt = ctx.saved_tensors
        gy, gs = _upstream(r, gy, gs)
        grads = [torch.empty_like(r) for _ in range(6)] + [torch.empty_like(gs)]
        _call(ctx.lib.wkv7_backward, r, r, k, v, w, a, b, ckpt, gy, gs, *grads)
        return None, *(g.to(dtype) for g, dtype in zip(grads, ctx.dtypes, strict=True))


class _WKV5(torch.autograd.Function):
    @staticmethod
    def forward(ctx, lib, r: Tensor, k: Tensor, v: Tensor, log_w: Tensor, u: Tensor, state: Tensor):
        r32, k32, v32, w, u32 = _fp32(r, k, v, log_w.exp(), u)
        s0 = state.detach().float().contiguous()
        keep = any(ctx.needs_input_grad)
        y, final = torch.empty_like(r32), torch.empty_like(s0)
        ckpt = _checkpoints(lib, r32) if keep else None
        _call(lib.wkv5_forward, r32, r32, k32, v32, w, u32, s0, y, final, ckpt)
        if keep:
            ctx.lib = lib
            ctx.dtypes = [x.dtype for x in (r, k, v, log_w, u, state)]
            ctx.save_for_backward(r32, k32, v32, w, u32, ckpt)
        return y.to(r.dtype), final

    @staticmethod
    def backward(ctx, gy: Tensor | None, gs: Tensor | None):
        r, k, v, w, u, ckpt = ctx.saved_tensors
        gy, gs = _upstream(r, gy, gs)
        gr, gk, gv, gw, gs0 = [torch.empty_like(r) for _ in range(4)] + [torch.empty_like(gs)]
        _call(ctx.lib.wkv5_backward, r, r, k, v, w, u, ckpt, gy, gs, gr, gk, gv, gw, gs0)
        gu = None
        if ctx.needs_input_grad[5]:  # y_t += v_t (u . k_t r_t): du = sum over b, t of k r (gy . v)
            gu = torch.einsum("bthn,bth->hn", k * r, (gy * v).sum(-1))
        dt = ctx.dtypes
        return (None, gr.to(dt[0]), gk.to(dt[1]), gv.to(dt[2]), gw.to(dt[3]),
                None if gu is None else gu.to(dt[4]), gs0.to(dt[5]))


def _batched(state: Tensor, r: Tensor) -> Tensor:
    """The state as the kernels read it: [B, H, N, N] (a broadcast one is expanded; autograd sums it back)."""
    return state.expand(r.shape[0], -1, -1, -1)


def wkv5(r: Tensor, k: Tensor, v: Tensor, log_w: Tensor, u: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    """RWKV-5.2 / RWKV-6 on the CPU kernel (see reference.wkv5); the chunked torch path where it cannot run."""
    lib = _kernel_for(r)
    if lib is None:
        return wkv5_chunked(r, k, v, log_w, u, state)
    return _WKV5.apply(lib, r, k, v, log_w, u, _batched(state, r))


def wkv7(r: Tensor, k: Tensor, v: Tensor, log_w: Tensor, a: Tensor, b: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    """RWKV-7 on the CPU kernel (see reference.wkv7); the chunked torch path where it cannot run."""
    lib = _kernel_for(r)
    if lib is None:
        return wkv7_fast(r, k, v, log_w, a, b, state)
    return _WKV7.apply(lib, r, k, v, log_w, a, b, _batched(state, r))


def xent_bf16_(logits: Tensor, targets: Tensor, weight: Tensor) -> Tensor | None:
    """Through a bf16 head: the nll [rows] of bf16 `logits` [rows, vocab], which are overwritten with d loss /
    d logits = weight * (softmax - onehot(targets)) in bf16. None (nothing touched) where the kernels are not."""
    lib = load()
    if lib is None:
        return None
    assert logits.dtype == torch.bfloat16 and logits.is_contiguous() and not logits.is_cuda
    targets, weight = targets.contiguous(), weight.float().contiguous()
    if len(targets) and not 0 <= int(targets.min()) <= int(targets.max()) < logits.shape[1]:
        raise ValueError(f"a target outside the vocabulary of {logits.shape[1]}")  # C++ would write outside the row
    nll = weight.new_empty(logits.shape[0])
    lib.xent_bf16(logits.shape[0], logits.shape[1], torch.get_num_threads(), _p(logits), _p(targets), _p(weight),
                  _p(nll))
    return nll

"""The CPU WKV kernels (csrc/wkv_cpu.cpp): the recurrence one step at a time in C++, built on first use.

`wkv5` and `wkv7` have the signatures, layouts and results of `reference.py` and run for CPU tensors in fp32,
bf16 or fp16 (the maths in fp32; gradients come back in the inputs' dtypes) and head size 8, 16, 32 or 64.
Anything else (no C++ compiler or ninja, a failed build, CUDA or float64 tensors, another head size) is said
once, in one line on stderr, and runs the chunked torch path instead.

The build (`torch.utils.cpp_extension.load` with ninja, -O3 -march=native) lives beside the CUDA one, in a
folder named after a hash of the source, the torch version and this CPU's model: about 20 s the first time,
a cached load after.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
from types import ModuleType

import torch
from torch import Tensor

from .build import Extension
from .chunked5 import wkv5_chunked
from .chunked7 import wkv7_fast

HEAD_SIZES = (8, 16, 32, 64)


def _cpu_model() -> str:
    """A short tag of this CPU's model (a build with -march=native may not run on another)."""
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line for line in f if line.startswith("model name")), "")
    except OSError:
        name = platform.processor()
    return hashlib.sha256(name.encode()).hexdigest()[:8]


# -march=native: the build is for this machine's own CPU (its cache folder is named after it); OpenMP for
# torch's at::parallel_for over the heads where the compiler has it (GCC; Apple's clang has not: one thread)
_OPENMP = () if sys.platform == "darwin" else ("-fopenmp",)
EXTENSION = Extension(
    name="rwkv_state_hub_wkv_cpu",
    what="CPU WKV kernels",
    sources=("wkv_cpu.cpp",),
    headers=(),
    tag=f"torch{torch.__version__}-{platform.machine()}-{_cpu_model()}",
    cflags=("-O3", "-march=native" if platform.machine() in ("x86_64", "AMD64") else "-mcpu=native", *_OPENMP),
    ldflags=_OPENMP,
)


def unavailable_reason() -> str | None:
    """Why the kernels cannot be built here (None when they can), without building anything."""
    from torch.utils import cpp_extension

    missing = EXTENSION.missing_source()
    if missing:
        return missing
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler {compiler!r} found (install g++ or set CXX)"
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    return None


def load() -> ModuleType | None:
    """The compiled kernels (built on first use), or None after saying why in one line."""
    return EXTENSION.load(unavailable_reason)


def _kernel_for(r: Tensor) -> ModuleType | None:
    """The extension when these inputs can use it; otherwise None (after saying why, once)."""
    if r.is_cuda:
        EXTENSION.tell(f"the tensors are on {r.device.type}")
        return None
    if r.dtype == torch.float64:
        EXTENSION.tell("float64 inputs: the kernels compute in float32")
        return None
    if r.shape[-1] not in HEAD_SIZES:
        EXTENSION.tell(f"head size {r.shape[-1]}: the kernels are built for {', '.join(map(str, HEAD_SIZES))}")
        return None
    if r.shape[1] == 0:
        return None
    return load()


def _fp32(*xs: Tensor) -> list[Tensor]:
    return [x.detach().float().contiguous() for x in xs]


def _zero_grads(r: Tensor, gy: Tensor | None, gs: Tensor | None) -> tuple[Tensor, Tensor]:
    B, T, H, N = r.shape
    gy = torch.zeros_like(r) if gy is None else gy.float().contiguous()
    gs = r.new_zeros(B, H, N, N) if gs is None else gs.float().contiguous()
    return gy, gs


class _WKV7(torch.autograd.Function):
    @staticmethod
    def forward(ctx, module, r: Tensor, k: Tensor, v: Tensor, log_w: Tensor, a: Tensor, b: Tensor, state: Tensor):
        xs = _fp32(r, k, v, log_w, a, b)
        keep = any(ctx.needs_input_grad)
        y, final, ckpt = module.wkv7_forward(*xs, state.detach().float().contiguous(), keep)
        if keep:
            ctx.module = module
            ctx.dtypes = [x.dtype for x in (r, k, v, log_w, a, b, state)]
            ctx.save_for_backward(*xs, ckpt)
        return y.to(r.dtype), final

    @staticmethod
    def backward(ctx, gy: Tensor | None, gs: Tensor | None):
        *xs, ckpt = ctx.saved_tensors
        gy, gs = _zero_grads(xs[0], gy, gs)
        grads = ctx.module.wkv7_backward(*xs, ckpt, gy, gs)
        return None, *(g.to(dtype) for g, dtype in zip(grads, ctx.dtypes, strict=True))


class _WKV5(torch.autograd.Function):
    @staticmethod
    def forward(ctx, module, r: Tensor, k: Tensor, v: Tensor, log_w: Tensor, u: Tensor, state: Tensor):
        xs = _fp32(r, k, v, log_w)
        u32 = u.detach().float().contiguous()
        keep = any(ctx.needs_input_grad)
        y, final, ckpt = module.wkv5_forward(*xs, u32, state.detach().float().contiguous(), keep)
        if keep:
            ctx.module = module
            ctx.dtypes = [x.dtype for x in (r, k, v, log_w, u, state)]
            ctx.save_for_backward(*xs, u32, ckpt)
        return y.to(r.dtype), final

    @staticmethod
    def backward(ctx, gy: Tensor | None, gs: Tensor | None):
        r, k, v, log_w, u, ckpt = ctx.saved_tensors
        gy, gs = _zero_grads(r, gy, gs)
        gr, gk, gv, gw, gs0 = ctx.module.wkv5_backward(r, k, v, log_w, u, ckpt, gy, gs)
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
    module = _kernel_for(r)
    if module is None:
        return wkv5_chunked(r, k, v, log_w, u, state)
    return _WKV5.apply(module, r, k, v, log_w, u, _batched(state, r))


def wkv7(r: Tensor, k: Tensor, v: Tensor, log_w: Tensor, a: Tensor, b: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    """RWKV-7 on the CPU kernel (see reference.wkv7); the chunked torch path where it cannot run."""
    module = _kernel_for(r)
    if module is None:
        return wkv7_fast(r, k, v, log_w, a, b, state)
    return _WKV7.apply(module, r, k, v, log_w, a, b, _batched(state, r))

"""The CUDA WKV kernels (their sources ship in the package, `csrc/` here), built on first use, with a fallback.

`wkv5` and `wkv7` have the signatures, layouts and results of `reference.py`: the kernels run for CUDA
tensors in fp32 or bf16 (state and its gradient always fp32) with head size 8, 16, 32 or 64. Anything else (a CPU
build of torch, no GPU, no CUDA toolkit, no ninja, no kernel sources, a failed build, CPU tensors, another
dtype or head size) is said once, in one line on stderr, and runs the chunked torch path instead, so a
run never stops for want of the kernels.

The build (`torch.utils.cpp_extension.load` with ninja) lives in $TORCH_EXTENSIONS_DIR or
<cache_dir>/torch_extensions, in a folder named after a hash of the sources and the torch/CUDA versions:
the first use compiles for about a minute, later ones load the cached library.

The kernels are compile-checked in CI (tests/test_cuda.py) but NOT yet verified on hardware: the trainer
uses them only when asked (`--kernel cuda`, or RWKV_STATE_HUB_WKV=cuda) until `bash cuda/verify_on_gpu.sh`
has passed on a GPU.
"""

from __future__ import annotations

import contextlib
from types import ModuleType

import torch
from torch import Tensor

from .build import Extension
from .chunked5 import wkv5_chunked
from .chunked7 import wkv7_fast

SOURCES = ("wkv_binding.cpp", "wkv5.cu", "wkv7.cu")
HEADERS = ("wkv_common.cuh", "wkv_chunk.h")
HEAD_SIZES = (8, 16, 32, 64)
DTYPES = (torch.float32, torch.bfloat16)

LIBRARY = Extension(
    name="rwkv_state_hub_wkv",
    what="CUDA WKV kernels",
    sources=SOURCES,
    headers=HEADERS,
    tag=f"torch{torch.__version__}-cuda{torch.version.cuda}",
    cflags=("-O3",),
    cuda_cflags=("-O3", "-Xptxas", "-O3"),
)
SOURCE_DIR = LIBRARY.source_dir


def unavailable_reason() -> str | None:
    """Why the kernels cannot run here (None when they can be built), without building anything.

    Missing sources are said first, whatever the machine: they mean a broken install, which a CPU-only machine
    would otherwise hide until the package reaches a GPU."""
    missing = LIBRARY.missing_source()
    if missing:
        return missing
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        return "no CUDA toolkit (nvcc) found: set CUDA_HOME or put nvcc on PATH"
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    return None


def tell(reason: str) -> None:
    """Say once, in one line, why the CUDA kernels are not used for something."""
    LIBRARY.tell(reason)


def load() -> ModuleType | None:
    """The compiled extension (built on first use), or None after saying why in one line."""
    return LIBRARY.load(unavailable_reason)


def _kernel_for(r: Tensor) -> ModuleType | None:
    """The extension when these inputs can use it; otherwise None (after saying why, once)."""
    module = load()
    if module is None:
        return None
    if not r.is_cuda:
        tell(f"the tensors are on {r.device.type}")
    elif r.dtype not in DTYPES:
        tell(f"inputs of dtype {r.dtype}: the kernels take float32 or bfloat16")
    elif r.shape[-1] not in HEAD_SIZES:
        tell(f"head size {r.shape[-1]}: the kernels are built for {', '.join(map(str, HEAD_SIZES))}")
    elif r.shape[1] == 0:
        return None
    else:
        return module
    return None


def _on_device(x: Tensor):
    """Launch on x's GPU (a no-op scope for the CPU tensors of the tests' stand-in extension)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _stream(x: Tensor) -> int:
    return torch.cuda.current_stream(x.device).cuda_stream if x.is_cuda else 0


def _zero_grads(r: Tensor, gy: Tensor | None, gs: Tensor | None) -> tuple[Tensor, Tensor]:
    B, T, H, N = r.shape
    gy = torch.zeros_like(r) if gy is None else gy.to(r.dtype).contiguous()
    gs = r.new_zeros(B, H, N, N, dtype=torch.float32) if gs is None else gs.float().contiguous()
    return gy, gs


class _WKV5(torch.autograd.Function):
    """The extension's wkv5 forward/backward under autograd; `keep`: save checkpoints for a backward pass."""

    @staticmethod
    def forward(ctx, module, keep: bool, r: Tensor, k: Tensor, v: Tensor, log_w: Tensor, u: Tensor, state: Tensor):
        with _on_device(r):
            y, final, ckpt = module.wkv5_forward(r, k, v, log_w, u, state, keep, _stream(r))
        if keep:
            ctx.module = module
            ctx.save_for_backward(r, k, v, log_w, u, ckpt)
        return y, final

    @staticmethod
    def backward(ctx, gy: Tensor | None, gs: Tensor | None):
        r, k, v, log_w, u, ckpt = ctx.saved_tensors
        gy, gs = _zero_grads(r, gy, gs)
        with _on_device(r):
            gr, gk, gv, gw, gs0 = ctx.module.wkv5_backward(r, k, v, log_w, u, ckpt, gy, gs, _stream(r))
        gu = None
        if ctx.needs_input_grad[6]:  # y_t += v_t (u . k_t r_t): du = sum over b, t of k r (gy . v)
            gyv = (gy.float() * v.float()).sum(-1)
            gu = torch.einsum("bthn,bth->hn", k.float() * r.float(), gyv)
        return None, None, gr, gk, gv, gw, gu, gs0


class _WKV7(torch.autograd.Function):
    """The extension's wkv7 forward/backward under autograd; `keep`: save checkpoints for a backward pass."""

    @staticmethod
    def forward(ctx, module, keep: bool, r: Tensor, k: Tensor, v: Tensor, log_w: Tensor, a: Tensor, b: Tensor,
                state: Tensor):
        with _on_device(r):
            y, final, ckpt = module.wkv7_forward(r, k, v, log_w, a, b, state, keep, _stream(r))
        if keep:
            ctx.module = module
            ctx.save_for_backward(r, k, v, log_w, a, b, ckpt)
        return y, final

    @staticmethod
    def backward(ctx, gy: Tensor | None, gs: Tensor | None):
        r, k, v, log_w, a, b, ckpt = ctx.saved_tensors
        gy, gs = _zero_grads(r, gy, gs)
        with _on_device(r):
            grads = ctx.module.wkv7_backward(r, k, v, log_w, a, b, ckpt, gy, gs, _stream(r))
        return None, None, *grads


def _batched(state: Tensor, r: Tensor) -> Tensor:
    """The state as the kernels read it: fp32 [B, H, N, N], contiguous (a broadcast one is copied per sequence)."""
    return state.float().expand(r.shape[0], -1, -1, -1).contiguous()


def _needs_backward(*xs: Tensor) -> bool:
    return torch.is_grad_enabled() and any(x.requires_grad for x in xs)


def wkv5(r: Tensor, k: Tensor, v: Tensor, log_w: Tensor, u: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    """RWKV-5.2 / RWKV-6 on the CUDA kernel (see reference.wkv5); the chunked torch path where it cannot run.

    A state expanded from batch 1 is materialised here; autograd sums its gradient back over the batch."""
    module = _kernel_for(r)
    if module is None:
        return wkv5_chunked(r, k, v, log_w, u, state)
    xs = [x.to(r.dtype).contiguous() for x in (r, k, v, log_w)]
    keep = _needs_backward(r, k, v, log_w, u, state)
    return _WKV5.apply(module, keep, *xs, u.float().contiguous(), _batched(state, r))


def wkv7(r: Tensor, k: Tensor, v: Tensor, log_w: Tensor, a: Tensor, b: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    """RWKV-7 on the CUDA kernel (see reference.wkv7); the chunked torch path where it cannot run."""
    module = _kernel_for(r)
    if module is None:
        return wkv7_fast(r, k, v, log_w, a, b, state)
    xs = [x.to(r.dtype).contiguous() for x in (r, k, v, log_w, a, b)]
    keep = _needs_backward(r, k, v, log_w, a, b, state)
    return _WKV7.apply(module, keep, *xs, _batched(state, r))

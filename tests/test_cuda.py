"""The CUDA WKV kernels (rwkv_state_hub/wkv/csrc/) and their loader (rwkv_state_hub/wkv/cuda.py).

Everywhere (no GPU needed):
- every .cu compiles for sm_80 and sm_90 with warnings as errors and no register spills, and the binding
  compiles against torch's and CUDA's headers;
- the kernels' unchanged code runs on CPU threads (tests/wkv_cpu_emulator.cpp) behind the real binding and
  the autograd wrapper, and matches the reference loops (y, final state, every gradient);
- the backward algorithm, replayed in torch in float64, is exact; the wrapper hands the extension what it
  expects; the loader says why in one line and falls back where the kernels cannot run; `--kernel`.
On a GPU (skipped without one, saying so): the real kernels against the reference loops for y, the final
state and every gradient, B in {1, 3} with one broadcast state, T in {1, 17, 512, 1000}, right padding,
fp32 and bf16; and the model's loss and state gradient equal on cuda and cpu for the real tiny checkpoints.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import REAL_MODELS, REPO, prompt_tokens, random_state_like, real_model_path

from rwkv_state_hub import StateHubError, wkv
from rwkv_state_hub.wkv import cpu, cuda, reference
from rwkv_state_hub.wkv.chunked5 import wkv5_chunked
from rwkv_state_hub.wkv.chunked7 import wkv7_fast

CUDA_DIR = REPO / "rwkv_state_hub" / "wkv" / "csrc"
GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not GPU, reason="no CUDA GPU here: run `bash cuda/verify_on_gpu.sh` on a GPU machine")


# ---- inputs --------------------------------------------------------------------------------------------


def pad_mask(B: int, T: int) -> torch.Tensor:
    """[B, T, 1, 1]: sequence 0 full, the others right-padded (one of them entirely padding when B >= 3)."""
    lengths = [T, max(T // 2, 1), 0][:B] if B > 1 else [T]
    return (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).double()[:, :, None, None]


def inputs5(B, T, H=2, N=64, seed=0, padded=True):
    """v5.2/v6-like: decays exp(-exp(x)) for x in [-6, 1]; padding as the model expresses it."""
    g = torch.Generator().manual_seed(seed)
    r, k, v = (torch.randn(B, T, H, N, generator=g, dtype=torch.float64) for _ in range(3))
    log_w = -torch.exp(-6 + 7 * torch.rand(B, T, H, N, generator=g, dtype=torch.float64))
    u = 0.5 * torch.randn(H, N, generator=g, dtype=torch.float64)
    state = 0.5 * torch.randn(1, H, N, N, generator=g, dtype=torch.float64)
    if padded:
        m = pad_mask(B, T)
        k, v, log_w = k * m, v * m, log_w * m
    return {"r": r, "k": k, "v": v, "log_w": log_w, "u": u, "state": state}


def inputs7(B, T, H=2, N=64, seed=0, padded=True):
    """v7-like: kk unit-norm, a = -kk, b = kk * iclr, w in [0.545, 1); padding as the model expresses it."""
    g = torch.Generator().manual_seed(seed)
    r, k, v = (torch.randn(B, T, H, N, generator=g, dtype=torch.float64) for _ in range(3))
    kk = F.normalize(torch.randn(B, T, H, N, generator=g, dtype=torch.float64), dim=-1)
    iclr = torch.sigmoid(torch.randn(B, T, H, N, generator=g, dtype=torch.float64))
    log_w = -math.exp(-0.5) * torch.sigmoid(torch.randn(B, T, H, N, generator=g, dtype=torch.float64))
    state = 0.5 * torch.randn(1, H, N, N, generator=g, dtype=torch.float64)
    if padded:
        m = pad_mask(B, T)
        k, v, log_w, kk = k * m, v * m, log_w * m, kk * m
    return {"r": r, "k": k, "v": v, "log_w": log_w, "a": -kk, "b": kk * iclr, "state": state}


def run(fn, xs: dict, B: int, gy, gs, dtype, device):
    """fn(**xs) with the one state broadcast over the batch; returns y, final state and every input's gradient."""
    exact = torch.float64 if dtype == torch.float64 else torch.float32  # state and u: never below fp32
    leaves = {n: x.detach().to(device=device, dtype=exact if n in ("state", "u") else dtype).clone().requires_grad_()
              for n, x in xs.items()}
    args = {**leaves, "state": leaves["state"].expand(B, -1, -1, -1)}
    y, s = fn(**args)
    torch.autograd.backward([y, s], [gy.to(device=device, dtype=y.dtype), gs.to(device)])
    return {"y": y.detach(), "final state": s.detach(), **{f"grad {n}": x.grad for n, x in leaves.items()}}


def assert_all_close(actual: dict, expected: dict, rtol: float, atol_scale: float) -> None:
    assert actual.keys() == expected.keys()
    for name, e in expected.items():
        a = actual[name]
        assert a is not None and a.shape == e.shape, f"{name}: {None if a is None else a.shape} vs {e.shape}"
        e = e.double().cpu()
        atol = atol_scale * max(float(e.abs().max()), 1.0)
        torch.testing.assert_close(a.double().cpu(), e, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


# ---- builds: compile check and the kernels on CPU threads (no GPU needed) --------------------------------


def _cuda_toolkit() -> tuple[str | None, Path | None]:
    """nvcc and the CUDA include folder, where installed."""
    nvcc = shutil.which("nvcc") or next((p for p in ("/usr/local/cuda/bin/nvcc",) if Path(p).exists()), None)
    homes = [os.environ.get("CUDA_HOME", ""), str(Path(nvcc).resolve().parents[1]) if nvcc else "", "/usr/local/cuda"]
    include = next((Path(h) / "include" for h in homes if h and (Path(h) / "include/cuda_runtime_api.h").exists()),
                   None)
    return nvcc, include


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> dict:
    """Every build this file needs, run in parallel once (about a minute on 2 cores):
    nvcc on each .cu for sm_80 and sm_90 (warnings as errors, torch's C++ standard and nvcc defines, -v for the
    register report), g++ -fsyntax-only on the binding against torch's and CUDA's headers, and the binding
    compiled with -DWKV_CPU_EMULATION and linked with tests/wkv_cpu_emulator.cpp into a Python extension."""
    from torch.utils import cpp_extension

    out = tmp_path_factory.mktemp("builds")
    nvcc, cuda_include = _cuda_toolkit()
    gxx = shutil.which("g++")
    headers = [*cpp_extension.include_paths(), sysconfig.get_paths()["include"]]
    system = [flag for path in headers for flag in ("-isystem", path)]  # their own warnings are not ours
    strict = ["-std=c++20", "-Wall", "-Wextra", "-Werror"]
    jobs: dict[str, list[str]] = {}
    if nvcc:
        torch_flags = getattr(cpp_extension, "COMMON_NVCC_FLAGS", [])  # e.g. no implicit bf16 conversions
        for src in sorted(CUDA_DIR.glob("*.cu")):
            jobs[src.name] = [nvcc, "-std=c++20", "-O3", *torch_flags, "-gencode", "arch=compute_80,code=sm_80",
                              "-gencode", "arch=compute_90,code=sm_90", "-Werror", "all-warnings",
                              "-Xcompiler", "-Wall,-Wextra,-Werror", "-Xptxas", "-v", "-c", str(src),
                              "-o", str(out / f"{src.stem}.o")]
    if gxx and cuda_include:
        jobs["wkv_binding.cpp"] = [gxx, *strict, "-fsyntax-only", "-DTORCH_EXTENSION_NAME=wkv_compile_check",
                                   *system, "-isystem", str(cuda_include), str(CUDA_DIR / "wkv_binding.cpp")]
    emulated = [f"-I{REPO / 'tests' / 'emulated_cuda'}", "-DWKV_CPU_EMULATION", "-O2", "-fPIC", "-pthread"]
    if gxx:
        jobs["emulated binding"] = [gxx, *strict, *emulated, "-DTORCH_EXTENSION_NAME=wkv_emulated", *system, "-c",
                                    str(CUDA_DIR / "wkv_binding.cpp"), "-o", str(out / "binding.o")]
        jobs["emulator"] = [gxx, *strict, *emulated, "-Wno-unknown-pragmas", "-c",
                            str(REPO / "tests" / "wkv_cpu_emulator.cpp"), "-o", str(out / "emulator.o")]
    started = time.perf_counter()
    procs = {name: subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name, cmd in jobs.items()}
    results = {name: (proc.wait(timeout=900), proc.stdout.read()) for name, proc in procs.items()}
    extension = None
    if gxx and all(results[n][0] == 0 for n in ("emulated binding", "emulator")):
        extension = out / f"wkv_emulated{sysconfig.get_config_var('EXT_SUFFIX')}"
        libs = [flag for path in cpp_extension.library_paths() for flag in (f"-L{path}", f"-Wl,-rpath,{path}")]
        link = [gxx, "-shared", "-pthread", str(out / "binding.o"), str(out / "emulator.o"), "-o", str(extension),
                *libs, "-lc10", "-ltorch", "-ltorch_cpu", "-ltorch_python"]
        proc = subprocess.run(link, capture_output=True, text=True)
        results["link"] = (proc.returncode, proc.stdout + proc.stderr)
    print(f"built {', '.join(results)} in {time.perf_counter() - started:.1f} s")
    return {"nvcc": nvcc, "gxx": gxx, "cuda_include": cuda_include, "results": results, "extension": extension}


@pytest.mark.slow
def test_kernels_compile_for_sm80_and_sm90_with_warnings_as_errors(builds):
    """Every .cu for sm_80 and sm_90 with warnings as errors and no register spills (the state row must stay
    in registers), and the binding against torch's and CUDA's headers: CI catches what would not build."""
    if builds["nvcc"] is None:
        pytest.skip("nvcc not found (install the CUDA toolkit to compile-check the kernels)")
    if builds["gxx"] is None or builds["cuda_include"] is None:
        pytest.skip("g++ or cuda_runtime_api.h not found (needed to compile-check the binding; set CUDA_HOME)")
    names = {p.name for p in CUDA_DIR.glob("*.cu")} | {"wkv_binding.cpp"}
    assert names >= {"wkv5.cu", "wkv7.cu", "wkv_binding.cpp"}
    failures = []
    for name in sorted(names):
        rc, out = builds["results"][name]
        if rc != 0:
            failures.append(f"{name}:\n{out[-3000:]}")
        spills = re.findall(r"[1-9][0-9]* bytes spill stores", out)
        if spills:
            failures.append(f"{name}: register spills ({', '.join(spills)})")
        if name.endswith(".cu"):
            assert "Compiling entry function" in out and "sm_90" in out  # the -v report: both targets built
    assert not failures, "\n".join(failures)


def test_the_kernels_and_the_binding_agree_on_the_checkpoint_interval():
    """The binding sizes the checkpoint and scratch buffers with the same WKV_CHUNK the kernels index with."""
    assert '#include "wkv_chunk.h"' in (CUDA_DIR / "wkv_common.cuh").read_text()
    assert '#include "wkv_chunk.h"' in (CUDA_DIR / "wkv_binding.cpp").read_text()
    for name in ("wkv5.cu", "wkv7.cu"):
        text = (CUDA_DIR / name).read_text()
        assert '#include "wkv_common.cuh"' in text and "#define WKV_CHUNK" not in text


# ---- the kernels' algorithm, replayed in torch (no GPU needed) -------------------------------------------


def replay_kernel(arch: str, xs: dict, B: int, gy, gs, chunk: int):
    """The forward and backward kernels' exact sequence of operations, vectorised over (batch, head) and
    over the threads of a block: checkpoints before every `chunk` steps, the states of one chunk recomputed
    into a scratch buffer, the chunk walked in reverse, key-indexed gradients as sums over value rows."""
    r, k, v, log_w = (xs[n] for n in ("r", "k", "v", "log_w"))
    T = r.shape[1]
    w = log_w.exp()
    s0 = xs["state"].expand(B, -1, -1, -1)
    n_chunks = (T + chunk - 1) // chunk

    def vec(x, t):  # [B, H, N] at step t
        return x[:, t]

    # forward: S[b, h, i(value), j(key)]
    S, ckpt, ys = s0.clone(), [], []
    for t in range(T):
        if t % chunk == 0:
            ckpt.append(S.clone())
        rt, kt, vt, wt = vec(r, t), vec(k, t), vec(v, t), vec(w, t)
        if arch == "v5":
            kv = vt[..., :, None] * kt[..., None, :]
            ys.append(((S + xs["u"][None, :, None, :] * kv) * rt[..., None, :]).sum(-1))
            S = S * wt[..., None, :] + kv
        else:
            at, bt = vec(xs["a"], t), vec(xs["b"], t)
            sa = (S * at[..., None, :]).sum(-1)
            S = S * wt[..., None, :] + sa[..., None] * bt[..., None, :] + vt[..., :, None] * kt[..., None, :]
            ys.append((S * rt[..., None, :]).sum(-1))
    assert len(ckpt) == n_chunks
    final = S
    grads = {n: torch.zeros_like(r) for n in ("r", "k", "v", "log_w") + (("a", "b") if arch == "v7" else ())}
    G = gs.clone()
    for c in range(n_chunks - 1, -1, -1):
        t0, t1 = c * chunk, min(T, c * chunk + chunk)
        S, scratch = ckpt[c].clone(), []
        for t in range(t0, t1):
            scratch.append(S.clone())
            kt, vt, wt = vec(k, t), vec(v, t), vec(w, t)
            if arch == "v5":
                S = S * wt[..., None, :] + vt[..., :, None] * kt[..., None, :]
            else:
                at, bt = vec(xs["a"], t), vec(xs["b"], t)
                sa = (S * at[..., None, :]).sum(-1)
                S = S * wt[..., None, :] + sa[..., None] * bt[..., None, :] + vt[..., :, None] * kt[..., None, :]
        for t in range(t1 - 1, t0 - 1, -1):
            Sp = scratch[t - t0]
            rt, kt, vt, wt, gyt = vec(r, t), vec(k, t), vec(v, t), vec(w, t), vec(gy, t)
            if arch == "v5":
                u = xs["u"][None]
                ukr = (u * kt * rt).sum(-1)
                grads["v"][:, t] = (G * kt[..., None, :]).sum(-1) + gyt * ukr[..., None]
                gyv = (gyt * vt).sum(-1, keepdim=True)
                grads["r"][:, t] = (gyt[..., :, None] * Sp).sum(-2) + u * kt * gyv
                grads["k"][:, t] = (G * vt[..., :, None]).sum(-2) + u * rt * gyv
                grads["log_w"][:, t] = (G * Sp).sum(-2) * wt
                G = G * wt[..., None, :] + gyt[..., :, None] * rt[..., None, :]
            else:
                at, bt = vec(xs["a"], t), vec(xs["b"], t)
                sa = (Sp * at[..., None, :]).sum(-1)
                G = G + gyt[..., :, None] * rt[..., None, :]
                gbi = (G * bt[..., None, :]).sum(-1)
                grads["v"][:, t] = (G * kt[..., None, :]).sum(-1)
                St = Sp * wt[..., None, :] + sa[..., None] * bt[..., None, :] + vt[..., :, None] * kt[..., None, :]
                grads["r"][:, t] = (gyt[..., :, None] * St).sum(-2)
                grads["k"][:, t] = (G * vt[..., :, None]).sum(-2)
                grads["b"][:, t] = (G * sa[..., :, None]).sum(-2)
                grads["log_w"][:, t] = (G * Sp).sum(-2) * wt
                grads["a"][:, t] = (gbi[..., :, None] * Sp).sum(-2)
                G = G * wt[..., None, :] + gbi[..., None] * at[..., None, :]
    return torch.stack(ys, 1), final, grads, G


@pytest.mark.parametrize("arch", ["v5", "v7"])
def test_the_kernels_backward_algorithm_is_exact(arch):
    """Replaying the kernels' loops in float64 gives the reference's y and every gradient (to r, k, v, log_w,
    a, b and the broadcast initial state, summed over the batch), across chunk boundaries and a ragged tail."""
    B, T, H, N, chunk = 3, 21, 2, 8, 8
    xs = (inputs5 if arch == "v5" else inputs7)(B, T, H, N, seed=3)
    g = torch.Generator().manual_seed(5)
    gy = torch.randn(B, T, H, N, generator=g, dtype=torch.float64)
    gs = torch.randn(B, H, N, N, generator=g, dtype=torch.float64)
    fn = reference.wkv5 if arch == "v5" else reference.wkv7
    leaves = {n: x.clone().requires_grad_(n != "u") for n, x in xs.items()}
    y, s = fn(**{**leaves, "state": leaves["state"].expand(B, -1, -1, -1)})
    torch.autograd.backward([y, s], [gy, gs])
    y_replay, final, grads, gs0 = replay_kernel(arch, xs, B, gy, gs, chunk)
    torch.testing.assert_close(y_replay, y.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, s.detach(), rtol=1e-10, atol=1e-10)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, leaves[name].grad, rtol=1e-9, atol=1e-9, msg=lambda m, n=name: f"{n}: {m}")
    torch.testing.assert_close(gs0.sum(0, keepdim=True), leaves["state"].grad, rtol=1e-9, atol=1e-9)


# ---- the autograd wrapper around the extension, with a CPU stand-in (no GPU needed) ------------------------


class StandInExtension:
    """The compiled extension's calling convention on the CPU, computed with the reference loops: its
    'checkpoints' are the initial state, and its backward recomputes with autograd. It checks what the
    wrapper hands the binding (contiguity, dtypes, shapes) as the binding's TORCH_CHECKs would."""

    def __init__(self):
        self.kept: list[bool] = []

    @staticmethod
    def check(xs, u, state):
        r = xs[0]
        assert r.dtype in cuda.DTYPES and all(x.dtype == r.dtype and x.is_contiguous() for x in xs)
        assert all(x.shape == r.shape for x in xs)
        assert state.dtype == torch.float32 and state.is_contiguous() and state.shape[0] == r.shape[0]
        assert u is None or (u.dtype == torch.float32 and u.is_contiguous())

    def _forward(self, fn, xs, extra, state, keep):
        self.kept.append(keep)
        with torch.no_grad():
            y, final = fn(*(x.float() for x in xs), *extra, state)
        return y.to(xs[0].dtype), final, state.clone() if keep else state.new_zeros(0)

    def _backward(self, fn, xs, extra, ckpt, gy, gs):
        leaves = [x.detach().float().requires_grad_(True) for x in xs] + [ckpt.detach().clone().requires_grad_(True)]
        with torch.enable_grad():
            y, final = fn(*leaves[:-1], *(e.detach() for e in extra), leaves[-1])
            torch.autograd.backward([y, final], [gy.float(), gs])
        return [x.grad.to(xs[0].dtype) for x in leaves[:-1]] + [leaves[-1].grad]

    def wkv5_forward(self, r, k, v, log_w, u, state, keep, stream):
        self.check([r, k, v, log_w], u, state)
        return self._forward(reference.wkv5, [r, k, v, log_w], [u], state, keep)

    def wkv5_backward(self, r, k, v, log_w, u, ckpt, gy, gs, stream):
        self.check([r, k, v, log_w, gy], u, gs)
        return self._backward(reference.wkv5, [r, k, v, log_w], [u], ckpt, gy, gs)

    def wkv7_forward(self, r, k, v, log_w, a, b, state, keep, stream):
        self.check([r, k, v, log_w, a, b], None, state)
        y, final, ckpt = self._forward(lambda r, k, v, w, a, b, s: reference.wkv7(r, k, v, w, a, b, s),
                                       [r, k, v, log_w, a, b], [], state, keep)
        return y, final, ckpt

    def wkv7_backward(self, r, k, v, log_w, a, b, ckpt, gy, gs, stream):
        self.check([r, k, v, log_w, a, b, gy], None, gs)
        return self._backward(reference.wkv7, [r, k, v, log_w, a, b], [], ckpt, gy, gs)


@pytest.mark.parametrize("arch", ["v5", "v7"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_autograd_wrapper_hands_the_extension_the_right_tensors_and_returns_every_gradient(
        arch, dtype, monkeypatch):
    """Through cuda.wkv5/wkv7 with the stand-in: a non-contiguous input, a state broadcast over B = 3 (its
    gradient summed back), u's gradient (v5), gradients in the inputs' dtype, checkpoints kept only for a
    backward pass."""
    ext = StandInExtension()
    monkeypatch.setattr(cuda, "_kernel_for", lambda r: ext)
    B, T = 3, 9
    xs = (inputs5 if arch == "v5" else inputs7)(B, T, 2, 8, seed=7)
    g = torch.Generator().manual_seed(8)
    gy = torch.randn(B, T, 2, 8, generator=g)
    gs = torch.randn(B, 2, 8, 8, generator=g)
    fn, ref = (cuda.wkv5, reference.wkv5) if arch == "v5" else (cuda.wkv7, reference.wkv7)
    got = run(fn, {**xs, "r": xs["r"].transpose(0, 1).contiguous().transpose(0, 1)}, B, gy, gs, dtype, "cpu")
    assert ext.kept == [True]
    assert got["y"].dtype == dtype and got["grad k"].dtype == dtype and got["grad state"].dtype == torch.float32
    rounded = {n: x if n in ("state", "u") else x.to(dtype).double() for n, x in xs.items()}
    expected = run(ref, rounded, B, gy, gs, torch.float64, "cpu")
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert_all_close(got, expected, rtol=tol, atol_scale=tol)
    with torch.no_grad():
        fn(**{n: x.to(torch.float32) for n, x in xs.items()})
    assert ext.kept == [True, False]


# ---- the CUDA kernels themselves, run on CPU threads (no GPU needed) --------------------------------------


@pytest.fixture(scope="module")
def emulated(builds):
    """The real binding over the kernels run on CPU threads, as a Python extension."""
    if builds["gxx"] is None:
        pytest.skip("g++ not found (needed to run the kernels on CPU threads)")
    failed = {n: out for n, (rc, out) in builds["results"].items() if n in ("emulated binding", "emulator", "link")
              and rc != 0}
    assert not failed, "\n".join(f"{n}:\n{out[-3000:]}" for n, out in failed.items())
    spec = importlib.util.spec_from_file_location("wkv_emulated", builds["extension"])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["v5", "v7"])
@pytest.mark.parametrize("B,T,H,N,dtype", [
    (3, 150, 2, 8, torch.float32),   # three chunks of 64 with a ragged tail, padding, a broadcast state
    (1, 1, 1, 8, torch.float32),     # one step
    (2, 70, 1, 64, torch.float32),   # the official head size: 64 threads, the state row in 64 registers
    (2, 80, 2, 8, torch.bfloat16),   # bf16 inputs, fp32 state and accumulation
])
def test_the_cuda_kernels_run_on_cpu_threads_and_match_the_reference(emulated, monkeypatch, arch, B, T, H, N, dtype):
    """The kernels' own code (index arithmetic, checkpoints, shared memory, barriers) through the real binding
    and the autograd wrapper: y, the final state and every gradient against the reference loops in float64."""
    monkeypatch.setattr(cuda, "_kernel_for", lambda r: emulated)
    xs = (inputs5 if arch == "v5" else inputs7)(B, T, H, N, seed=B * T)
    g = torch.Generator().manual_seed(6)
    gy = torch.randn(B, T, H, N, generator=g).to(dtype).float()
    gs = torch.randn(B, H, N, N, generator=g)
    fn, ref = (cuda.wkv5, reference.wkv5) if arch == "v5" else (cuda.wkv7, reference.wkv7)
    got = run(fn, xs, B, gy, gs, dtype, "cpu")
    rounded = {n: x if n in ("state", "u") else x.to(dtype).double() for n, x in xs.items()}
    expected = run(ref, rounded, B, gy, gs, torch.float64, "cpu")
    tol = 2e-4 if dtype == torch.float32 else 3e-2
    assert_all_close(got, expected, rtol=tol, atol_scale=tol)


@pytest.mark.slow
def test_the_binding_refuses_what_the_kernels_cannot_take(emulated):
    """Shapes, dtypes, layouts and buffer sizes are checked before any launch, with a message naming them."""
    B, T, H, N = 2, 5, 1, 8
    x = torch.randn(B, T, H, N)
    s0 = torch.zeros(B, H, N, N)
    assert emulated.chunk == 64
    y, s_out, ckpt = emulated.wkv7_forward(x, x, x, -x.abs(), x, x, s0, True, 0)
    assert y.shape == x.shape and s_out.shape == s0.shape and ckpt.shape == (B * H, 1, N, N)
    assert emulated.wkv7_forward(x, x, x, -x.abs(), x, x, s0, False, 0)[2].numel() == 0
    cases = [
        (lambda: emulated.wkv7_forward(x, x, x[:, :4], x, x, x, s0, True, 0), "input shapes differ"),
        (lambda: emulated.wkv7_forward(x, x, x.double(), x, x, x, s0, True, 0), "input dtypes differ"),
        (lambda: emulated.wkv7_forward(x.half(), *[x.half()] * 5, s0, True, 0), "float32 or bfloat16"),
        (lambda: emulated.wkv7_forward(x, x, x.transpose(0, 1).contiguous().transpose(0, 1), x, x, x, s0, True, 0),
         "contiguous"),
        (lambda: emulated.wkv7_forward(x, x, x, x, x, x, s0[:1], True, 0), "state must be [B, H, N, N]"),
        (lambda: emulated.wkv5_forward(x, x, x, x, torch.zeros(H, N + 1), s0, True, 0), "u must be [H, N]"),
        (lambda: emulated.wkv7_backward(x, x, x, x, x, x, torch.zeros(3), x, s0, 0), "checkpoints of the wrong size"),
        (lambda: emulated.wkv7_forward(*[torch.randn(B, T, H, 12)] * 6, torch.zeros(B, H, 12, 12), True, 0),
         "head size must be 8, 16, 32 or 64"),
        (lambda: emulated.wkv7_forward(*[torch.randn(B, T, H, 16)] * 6, torch.zeros(B, H, 16, 16), True, 0),
         "kernel launch failed"),  # 16 is built for the GPU, not in the emulator
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError, match=re.escape(message)):
            call()


# ---- the loader and the fallback (no GPU needed) --------------------------------------------------------


@pytest.fixture
def fresh_loader(monkeypatch):
    """The loader as on first use: nothing loaded, nothing said yet."""
    monkeypatch.setattr(cuda, "LIBRARY", dataclasses.replace(cuda.LIBRARY))


def test_without_a_gpu_the_loader_says_why_once_and_falls_back(fresh_loader, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    reason = cuda.unavailable_reason()
    assert reason in (f"torch {torch.__version__} is a CPU build", "no CUDA GPU is visible")
    xs = {n: x.float() for n, x in inputs7(2, 5, 1, 64).items()}
    xs["state"] = xs["state"].expand(2, -1, -1, -1)
    y, s = cuda.wkv7(**xs)
    y2, s2 = cuda.wkv7(**xs)
    assert cuda.load() is None
    err = capsys.readouterr().err.splitlines()
    assert err == [f"rwkv-state-hub: CUDA WKV kernels not used ({reason}); using the torch path"]
    y0, s0 = wkv7_fast(**xs)
    assert torch.equal(y, y0) and torch.equal(s, s0) and torch.equal(y2, y0)
    x5 = {n: x.float() for n, x in inputs5(1, 4, 1, 64).items()}
    torch.testing.assert_close(cuda.wkv5(**x5)[0], wkv5_chunked(**x5)[0])


def test_a_failed_build_is_one_line_and_falls_back(fresh_loader, monkeypatch, capsys):
    monkeypatch.setattr(cuda, "unavailable_reason", lambda: None)

    def broken_build():
        raise RuntimeError("Error building extension 'rwkv_state_hub_wkv'\nnvcc fatal: something")

    monkeypatch.setattr(cuda.LIBRARY, "build", broken_build)
    assert cuda.load() is None and cuda.load() is None
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("rwkv-state-hub: CUDA WKV kernels not used (the build in ")
    assert "failed: RuntimeError: Error building extension 'rwkv_state_hub_wkv'); using the torch path" in line


def test_cpu_tensors_head_sizes_and_dtypes_the_kernels_lack_fall_back(fresh_loader, monkeypatch, capsys):
    """With the extension loaded, inputs it cannot take still run (on the torch path), each reason said once."""
    monkeypatch.setattr(cuda.LIBRARY, "module", object())
    xs = {n: x.float() for n, x in inputs5(1, 3, 1, 16).items()}
    for _ in range(2):
        torch.testing.assert_close(cuda.wkv5(**xs)[0], wkv5_chunked(**xs)[0])
    assert capsys.readouterr().err.splitlines() == [
        "rwkv-state-hub: CUDA WKV kernels not used (the tensors are on cpu); using the torch path"]


def test_the_build_folder_follows_the_sources_and_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    for ext in (cuda.LIBRARY, cpu.LIBRARY):
        folder = ext.build_dir()
        assert folder.parent == tmp_path / "ext" and folder.name.startswith(f"{ext.name}-") and "+" not in folder.name
        assert ext.build_dir() == folder  # stable: the cached build is found again
        monkeypatch.setattr(ext, "source_dir", tmp_path)  # other sources, another folder
        assert ext.build_dir() != folder
    assert cuda.LIBRARY.build_dir() != cpu.LIBRARY.build_dir()
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    assert str(cuda.LIBRARY.build_dir()).startswith(os.environ["RWKV_STATE_HUB_CACHE"])


def test_the_backend_is_chosen_by_name_and_cuda_only_when_asked(fresh_loader, monkeypatch, capsys):
    monkeypatch.delenv("RWKV_STATE_HUB_WKV", raising=False)
    assert wkv.backend() == "auto"
    xs = {n: x.float() for n, x in inputs7(1, 6, 1, 64).items()}
    y_chunked = wkv7_fast(**xs)[0]
    torch.testing.assert_close(wkv.wkv7(**xs)[0], y_chunked)  # the CPU kernels (or their fallback)
    assert "CUDA" not in capsys.readouterr().err  # the default never touches the CUDA loader
    monkeypatch.setenv("RWKV_STATE_HUB_WKV", "cuda")
    assert wkv.backend() == "cuda"
    torch.testing.assert_close(wkv.wkv7(**xs)[0], y_chunked)
    assert "CUDA WKV kernels not used" in capsys.readouterr().err
    previous = wkv.set_backend("reference")
    try:
        assert previous is None and wkv.backend() == "reference"  # set_backend wins over the environment
    finally:
        wkv.set_backend(previous)
    assert wkv.backend() == "cuda"
    monkeypatch.setenv("RWKV_STATE_HUB_WKV", "triton")
    with pytest.raises(ValueError, match="'triton'"):
        wkv.backend()
    with pytest.raises(ValueError, match="'fast'"):
        wkv.set_backend("fast")


def test_train_with_kernel_cuda_falls_back_on_this_machine_and_rejects_unknown_kernels(
        fresh_loader, tmp_path, capsys):
    from rwkv_state_hub.training import TrainConfig, train

    model = REPO / "rwkv_state_hub" / "examples" / "models" / "tiny-rwkv-5v2-730K.pth"
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join((REPO / "examples" / "data" / "train.jsonl").read_text().splitlines()[:4]) + "\n")
    base = dict(model=str(model), data=[str(data)], steps=1, micro_bsz=2, device="cpu", seed=1)
    with pytest.raises(StateHubError, match="kernel='triton': choose from auto, torch, cuda"):
        train(TrainConfig(**base, out=str(tmp_path / "bad"), kernel="triton"), progress=False)
    torch_run = train(TrainConfig(**base, out=str(tmp_path / "torch"), kernel="torch"), progress=False)
    capsys.readouterr()
    cuda_run = train(TrainConfig(**base, out=str(tmp_path / "cuda"), kernel="cuda"), progress=False)
    assert capsys.readouterr().err.splitlines() == [
        "rwkv-state-hub: CUDA WKV kernels not used (kernel='cuda' with device='cpu'); using the torch path"]
    assert wkv.backend() == "auto"  # the trainer's choice ends with the run
    torch.testing.assert_close(cuda_run.state.wkv, torch_run.state.wkv)


def test_cli_offers_the_kernel_option():
    out = subprocess.run([sys.executable, "-m", "rwkv_state_hub.cli", "train", "--help"], capture_output=True,
                         text=True, check=True, env={**os.environ, "COLUMNS": "200"}).stdout
    assert "--kernel [auto|torch|cuda]" in out


# ---- on a GPU ------------------------------------------------------------------------------------------


def kernels_or_fail():
    """On a GPU the kernels must build: a fallback here would compare the torch path with itself."""
    module = cuda.load()
    assert module is not None, f"CUDA kernels unavailable on a GPU machine: {cuda.LIBRARY.reason}"
    return module


@needs_gpu
@pytest.mark.parametrize("arch", ["v5", "v7"])
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("T", [1, 17, 512, 1000])
def test_gpu_kernels_match_the_reference_in_fp32(arch, B, T):
    kernels_or_fail()
    xs = (inputs5 if arch == "v5" else inputs7)(B, T, seed=T + B)
    H, N = xs["r"].shape[2:]
    g = torch.Generator().manual_seed(1)
    gy = torch.randn(B, T, H, N, generator=g, dtype=torch.float64)
    gs = torch.randn(B, H, N, N, generator=g, dtype=torch.float64)
    ref_fn, fn = (reference.wkv5, cuda.wkv5) if arch == "v5" else (reference.wkv7, cuda.wkv7)
    expected = run(ref_fn, xs, B, gy.float(), gs.float(), torch.float64, "cuda")  # the oracle in fp64
    actual = run(fn, xs, B, gy.float(), gs.float(), torch.float32, "cuda")
    assert_all_close(actual, expected, rtol=1e-3, atol_scale=2e-4)


@needs_gpu
@pytest.mark.parametrize("arch", ["v5", "v7"])
def test_gpu_kernels_take_bf16_inputs(arch):
    """bf16 inputs (fp32 state and accumulation): close to the fp32 reference on the same bf16-rounded values."""
    kernels_or_fail()
    B, T = 3, 200
    xs = (inputs5 if arch == "v5" else inputs7)(B, T, seed=11)
    xs = {n: x if n in ("state", "u") else x.bfloat16().double() for n, x in xs.items()}
    H, N = xs["r"].shape[2:]
    g = torch.Generator().manual_seed(2)
    gy = torch.randn(B, T, H, N, generator=g).bfloat16().float()
    gs = torch.randn(B, H, N, N, generator=g)
    ref_fn, fn = (reference.wkv5, cuda.wkv5) if arch == "v5" else (reference.wkv7, cuda.wkv7)
    expected = run(ref_fn, xs, B, gy, gs, torch.float64, "cuda")
    actual = run(fn, xs, B, gy, gs, torch.bfloat16, "cuda")
    assert actual["y"].dtype == torch.bfloat16 and actual["final state"].dtype == torch.float32
    assert_all_close(actual, expected, rtol=3e-2, atol_scale=3e-2)


@needs_gpu
def test_gpu_kernels_without_grad_save_nothing_and_agree():
    kernels_or_fail()
    xs = {n: x.float().cuda() for n, x in inputs7(2, 300, seed=4).items()}
    xs["state"] = xs["state"].expand(2, -1, -1, -1)
    with torch.no_grad():
        y, s = cuda.wkv7(**xs)
        y0, s0 = reference.wkv7(**xs)
    torch.testing.assert_close(y, y0, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(s, s0, rtol=1e-3, atol=1e-3)


@needs_gpu
@pytest.mark.parametrize("name,arch,encoding", REAL_MODELS)
def test_gpu_model_loss_and_state_gradient_equal_on_cuda_and_cpu(name, arch, encoding, monkeypatch):
    """The trainer's path end to end (a padded batch of two) on a real tiny checkpoint: loss and the state
    gradient with the CUDA kernels (never a silent fallback) equal the CPU's torch path."""
    from rwkv_state_hub import load_model

    kernels_or_fail()
    fallbacks: list[str] = []
    monkeypatch.setattr(cuda, "tell", fallbacks.append)
    path = real_model_path(name)
    toks = prompt_tokens(encoding, 80)
    tokens = torch.tensor([toks[:-1], toks[1:]])
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[1, 50:] = False
    results = []
    for device, backend in (("cpu", None), ("cuda", "cuda")):
        model = load_model(path, device=device)
        state = random_state_like(model.spec, seed=2, scale=0.3, full=True).to_recurrent(device=device)
        wkv_state = state.wkv.requires_grad_(True)
        previous = wkv.set_backend(backend)
        try:
            logits, _ = model(tokens[:, :-1].to(device), state, mask[:, :-1].to(device))
        finally:
            wkv.set_backend(previous)
        targets = tokens[:, 1:].to(device).masked_fill(~mask[:, 1:].to(device), -100)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        loss.backward()
        results.append((float(loss), wkv_state.grad.cpu()))
    assert fallbacks == []
    (cpu_loss, cpu_grad), (gpu_loss, gpu_grad) = results
    assert gpu_loss == pytest.approx(cpu_loss, rel=1e-4)
    torch.testing.assert_close(gpu_grad, cpu_grad, rtol=1e-3, atol=1e-4 * float(cpu_grad.abs().max()))

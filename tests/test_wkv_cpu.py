"""The C++ CPU WKV kernels (rwkv_state_hub/wkv/cpu.py, csrc/wkv_cpu.cpp) against the plain loops in float64:
outputs, final state and the gradient to every input, the state included; and their fallback."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_wkv5_chunked import make_inputs
from test_wkv7_chunked import model_like

from rwkv_state_hub import wkv
from rwkv_state_hub.wkv import cpu, reference
from rwkv_state_hub.wkv.chunked5 import wkv5_chunked
from rwkv_state_hub.wkv.chunked7 import wkv7_fast


@pytest.fixture(scope="module")
def kernels():
    """The kernels must build on this machine (CI's included): a fallback here would test the torch path."""
    module = cpu.load()
    assert module is not None, f"the CPU WKV kernels did not build: {cpu.LIBRARY.reason}"
    return module


def inputs7(B, T, H, N, *, seed=0, pad_from=None):
    """test_wkv7_chunked's model-like inputs in float64; steps from pad_from on are padding (k = v = a = b = 0,
    log_w = 0), which must leave the state unchanged."""
    return model_like(B, T, H, N, seed=seed, dtype=torch.float64, lengths=None if pad_from is None else [pad_from] * B)


def grads(fn, xs, seed=1):
    """y, the final state and the gradients to every input of fn(*xs) for a random upstream gradient."""
    leaves = [x.detach().clone().requires_grad_(True) for x in xs]
    y, s = fn(*leaves)
    g = torch.Generator().manual_seed(seed)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)
    gs = torch.randn(s.shape, generator=g, dtype=torch.float64).to(s.dtype)
    return [y.detach(), s.detach(), *torch.autograd.grad([y, s], leaves, [gy, gs])]


def assert_close_to(got, want, names, rtol=1e-5):
    for name, a, e in zip(names, got, want, strict=True):
        assert a.shape == e.shape, name
        scale = float(e.abs().max()) or 1.0
        torch.testing.assert_close(a.double(), e, rtol=rtol, atol=rtol * scale, msg=lambda m, n=name: f"{n}: {m}")


NAMES7 = ("y", "final state", "d r", "d k", "d v", "d log_w", "d a", "d b", "d state")
NAMES5 = ("y", "final state", "d r", "d k", "d v", "d log_w", "d u", "d state")
SHAPES = [(2, 37, 3, 8), (1, 70, 2, 64), (3, 16, 1, 16), (1, 1, 2, 32), (1, 33, 1, 64)]


@pytest.mark.parametrize("B,T,H,N", SHAPES)
def test_v7_kernel_matches_the_loop(kernels, B, T, H, N):
    xs = inputs7(B, T, H, N, seed=T)
    want = grads(reference.wkv7, xs)
    got = grads(cpu.wkv7, [x.float() for x in xs])
    assert all(t.dtype == torch.float32 for t in got)
    assert_close_to(got, want, NAMES7)


@pytest.mark.parametrize("B,T,H,N", SHAPES)
@pytest.mark.parametrize("time_varying", [True, False], ids=["v6", "v5.2"])
def test_v5_kernel_matches_the_loop(kernels, B, T, H, N, time_varying):
    leaves = make_inputs(B, T, N, decay="mixed", time_varying=time_varying, dtype=torch.float64, seed=T)
    r, k, v, base, u, s0 = (x.detach() for x in leaves)
    H5 = r.shape[2]

    def call(fn):
        def f(r, k, v, base, u, s0):
            log_w = base if base.dim() == 4 else base.expand(r.shape[0], r.shape[1], H5, N)
            return fn(r, k, v, log_w, u, s0)
        return f

    want = grads(call(reference.wkv5), [r, k, v, base, u, s0])
    got = grads(call(cpu.wkv5), [x.float() for x in (r, k, v, base, u, s0)])
    assert_close_to(got, want, ("y", "final state", "d r", "d k", "d v", "d log_w base", "d u", "d state"))


def test_strong_and_weak_decays_stay_exact(kernels):
    for decay in ("strong", "weak"):
        r, k, v, log_w, u, s0 = (x.detach() for x in make_inputs(2, 40, 64, decay=decay, dtype=torch.float64))
        want = grads(reference.wkv5, [r, k, v, log_w, u, s0])
        got = grads(cpu.wkv5, [x.float() for x in (r, k, v, log_w, u, s0)])
        assert_close_to(got, want, NAMES5)


def test_a_state_shared_by_the_batch_gets_the_summed_gradient(kernels):
    xs = inputs7(3, 20, 2, 16, seed=5)
    xs[-1] = xs[-1][:1]  # [1, H, N, N], broadcast over the batch as the trainer's learned state is
    want = grads(reference.wkv7, xs)
    got = grads(cpu.wkv7, [x.float() for x in xs])
    assert got[-1].shape == (1, 2, 16, 16)
    assert_close_to(got, want, NAMES7)


def test_padding_leaves_the_state_unchanged(kernels):
    xs = [x.float() for x in inputs7(1, 40, 2, 64, seed=2, pad_from=25)]
    y_all, s_all = cpu.wkv7(*xs)
    y_cut, s_cut = cpu.wkv7(*[x[:, :25] for x in xs[:-1]], xs[-1])
    torch.testing.assert_close(s_all, s_cut, rtol=0, atol=0)
    torch.testing.assert_close(y_all[:, :25], y_cut, rtol=0, atol=0)


def test_without_a_gradient_no_checkpoints_are_kept_and_the_results_agree(kernels):
    xs = [x.float() for x in inputs7(2, 50, 2, 32, seed=3)]
    with torch.no_grad():
        y0, s0 = cpu.wkv7(*xs)
    assert y0.grad_fn is None
    y1, s1 = cpu.wkv7(*[x.requires_grad_() for x in xs])
    assert y1.grad_fn is not None
    assert torch.equal(y0, y1.detach()) and torch.equal(s0, s1.detach())


def test_bf16_inputs_get_bf16_outputs_and_gradients_from_fp32_maths(kernels):
    xs = [x.bfloat16() for x in inputs7(1, 30, 2, 64, seed=4)]
    xs[-1] = xs[-1].float()  # the state stays fp32, as the model keeps it
    got = grads(cpu.wkv7, xs)
    assert [t.dtype for t in got] == [torch.bfloat16, torch.float32] + [torch.bfloat16] * 6 + [torch.float32]
    want = grads(reference.wkv7, [x.double() for x in xs])
    assert_close_to(got, want, NAMES7, rtol=2e-2)  # bf16 rounding of the outputs


def test_the_default_backend_is_the_kernel_on_cpu_tensors(kernels, monkeypatch):
    monkeypatch.delenv("RWKV_STATE_HUB_WKV", raising=False)
    xs = [x.float().requires_grad_() for x in inputs7(1, 20, 2, 16, seed=6)]
    y, _ = wkv.wkv7(*xs)
    assert type(y.grad_fn).__name__ == "_WKV7Backward"  # the kernel's autograd node, not the chunked graph
    monkeypatch.setenv("RWKV_STATE_HUB_WKV", "chunked")
    y2, _ = wkv.wkv7(*xs)
    assert type(y2.grad_fn).__name__ != "_WKV7Backward"
    torch.testing.assert_close(y, y2)


@pytest.fixture
def fresh_loader(monkeypatch):
    """The loader as on first use: nothing loaded, nothing said yet."""
    monkeypatch.setattr(cpu, "LIBRARY", dataclasses.replace(cpu.LIBRARY))


def test_no_build_means_one_line_and_the_torch_path(fresh_loader, monkeypatch, capsys):
    monkeypatch.setattr(cpu, "unavailable_reason", lambda: "no C++ compiler found (set CXX or install g++)")
    xs = [x.float() for x in inputs7(1, 9, 1, 64)]
    for _ in range(2):
        y, s = cpu.wkv7(*xs)
        y0, s0 = wkv7_fast(*xs)
        assert torch.equal(y, y0) and torch.equal(s, s0)
    x5 = [x.float().detach() for x in make_inputs(1, 9, 64)]
    assert torch.equal(cpu.wkv5(*x5)[0], wkv5_chunked(*x5)[0])
    assert capsys.readouterr().err.splitlines() == [
        "rwkv-state-hub: CPU kernels not used (no C++ compiler found (set CXX or install g++)); "
        "using the torch path"]


def test_a_failed_build_is_one_line_and_falls_back(fresh_loader, monkeypatch, capsys):
    def broken_build():
        raise RuntimeError("Error building extension 'rwkv_state_hub_cpu'\nc++: fatal error")

    monkeypatch.setattr(cpu.LIBRARY, "build", broken_build)
    monkeypatch.setattr(cpu, "unavailable_reason", lambda: None)
    assert cpu.load() is None and cpu.load() is None
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("rwkv-state-hub: CPU kernels not used (the build in ")
    assert "failed: RuntimeError: Error building extension 'rwkv_state_hub_cpu'); using the torch path" in line


def test_head_sizes_the_kernels_lack_run_the_torch_path(kernels, capsys):
    xs = [x.float() for x in inputs7(1, 5, 1, 12)]
    torch.testing.assert_close(cpu.wkv7(*xs)[0], wkv7_fast(*xs)[0])
    assert "head size 12" in capsys.readouterr().err


def test_a_head_size_the_library_lacks_is_refused_not_misread(kernels):
    r = torch.randn(1, 4, 1, 12)
    s = torch.zeros(1, 1, 12, 12)
    with pytest.raises(ValueError, match="head size 12 is not built"):
        cpu._call(kernels.wkv7_forward, r, r, r, r, r, r, r, s, torch.empty_like(r), torch.empty_like(s), None)


def test_float64_runs_the_exact_torch_path(fresh_loader, capsys):
    """float64 is for checking gradients (finite differences): the fp32 kernels would spoil it."""
    xs = inputs7(1, 6, 1, 16)
    y, _ = cpu.wkv7(*xs)
    assert y.dtype == torch.float64 and torch.equal(y, wkv7_fast(*xs)[0])
    assert "float64 inputs" in capsys.readouterr().err


def test_a_compiler_that_fails_or_is_missing_is_one_line_and_leaves_no_library(fresh_loader, monkeypatch, tmp_path,
                                                                                capsys):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # runs, and fails
    assert cpu.load() is None
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("rwkv-state-hub: CPU kernels not used (the build in ")
    assert "false -O3 ... exited with 1" in line
    assert not list(tmp_path.rglob("*.so"))  # compiled aside and renamed: nothing half-written is ever loaded
    monkeypatch.setattr(cpu, "LIBRARY", dataclasses.replace(cpu.LIBRARY))
    monkeypatch.setenv("CXX", "no-such-compiler")
    assert cpu.unavailable_reason() == "no C++ compiler 'no-such-compiler' found (install g++ or set CXX)"


def test_the_environment_turns_the_kernels_off(fresh_loader, monkeypatch, capsys):
    monkeypatch.setenv("RWKV_STATE_HUB_CPU_KERNELS", "0")
    xs = [x.float().requires_grad_() for x in inputs7(1, 9, 1, 16)]
    y, _ = cpu.wkv7(*xs)
    assert type(y.grad_fn).__name__ != "_WKV7Backward" and cpu.load() is None
    assert "RWKV_STATE_HUB_CPU_KERNELS=0" in capsys.readouterr().err

"""Exact long-context state tuning: forward and backward `chunk` positions at a time (loss.chunked_backward) give
the gradient of the full backward pass, through masks, token shift and every architecture."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import ARCHS

from rwkv_state_hub.data import Sample, collate
from rwkv_state_hub.examples import example_model
from rwkv_state_hub.loss import batch_loss, chunked_backward, windowed_batch_loss
from rwkv_state_hub.model import LearnedState, load_model


def _samples(vocab: int, lengths: tuple[int, ...], seed: int) -> list[Sample]:
    g = torch.Generator().manual_seed(seed)
    samples = []
    for n in lengths:
        tokens = torch.randint(0, vocab, (n,), generator=g).tolist()
        mask = [0] * (n // 3) + [1] * (n - n // 3)  # an untrained prompt, then trained tokens
        samples.append(Sample(tokens, mask, f"sample of {n}"))
    return samples


def _batch(vocab: int, lengths: tuple[int, ...], seed: int):
    return collate(_samples(vocab, lengths, seed))


def _learned(spec, seed: int) -> LearnedState:
    learned = LearnedState(spec, full_state=True)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in learned.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return learned


def _grads(model, learned, batch, chunk: int | None, all_up_to: int = 16, spill_to=None,
           ) -> tuple[float, list[torch.Tensor]]:
    learned.zero_grad(set_to_none=True)
    if chunk is None:
        loss, _ = batch_loss(model, batch, learned())
        (loss * 0.5).backward()
        total = float(loss.detach())
    else:
        total = float(chunked_backward(model, batch, learned(), chunk, scale=0.5, all_boundaries_up_to=all_up_to,
                                              spill_to=spill_to))
    return total, [p.grad.clone() for p in learned.parameters()]


def _check(model, chunk: int, lengths: tuple[int, ...], all_up_to: int = 16, spill_to=None):
    batch = _batch(model.spec.vocab_size, lengths, seed=1)
    learned = _learned(model.spec, seed=2)
    full_loss, full = _grads(model, learned, batch, None)
    loss, chunked = _grads(model, learned, batch, chunk, all_up_to, spill_to)
    assert loss == pytest.approx(full_loss, rel=1e-5)
    for a, b in zip(chunked, full, strict=True):
        assert float(b.abs().max()) > 0  # the gradient is not trivially zero
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))  # fp32 summation order


@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_gradient_equals_the_full_backward_on_random_models(random_models, arch):
    model = load_model(random_models[arch])
    _check(model, chunk=7, lengths=(41, 23))  # chunks that split samples, a sample ending mid-chunk, padding


@pytest.mark.parametrize("name", ["tiny-rwkv-5v2-730K.pth", "tiny-rwkv-7v0-834K.pth", "rwkv7-example-L4-D256.pth"])
def test_chunked_gradient_equals_the_full_backward_on_real_models(name):
    _check(load_model(example_model(name), dtype=torch.float32), chunk=16, lengths=(70, 33, 50))


@pytest.mark.parametrize("arch", ARCHS)
def test_evaluation_in_time_windows_equals_the_whole_pass(random_models, arch):
    """Validation under a memory budget reads `time_chunk` positions at a time: the same loss and accuracy."""
    from rwkv_state_hub.evaluate import evaluate

    model = load_model(random_models[arch])
    samples = _samples(model.spec.vocab_size, (41, 23, 30), seed=3)
    batch = collate(samples)
    state = _learned(model.spec, seed=4)().detach()
    with torch.no_grad():
        whole = batch_loss(model, batch, state)
    for chunk in (7, 16, 1000):
        parts = windowed_batch_loss(model, batch, state, chunk)
        assert float(parts[0]) == pytest.approx(float(whole[0]), rel=1e-5)
        assert float(parts[1]) == float(whole[1])  # the same argmax at every trained position
    full, windowed = evaluate(model, samples, state, batch_size=2), evaluate(model, samples, state, 2, time_chunk=7)
    assert windowed.loss == pytest.approx(full.loss, rel=1e-5) and windowed.accuracy == full.accuracy
    assert full.n_tokens == windowed.n_tokens > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_many_chunks_keep_a_boundary_state_per_segment_and_the_same_gradient(random_models, arch):
    """Beyond 16 chunks the first pass keeps every sqrt(n)-th state and recomputes the others: same gradient."""
    from rwkv_state_hub.loss import boundaries_kept, boundary_stride

    assert (boundary_stride(16), boundary_stride(21), boundary_stride(256)) == (1, 4, 16)
    assert (boundaries_kept(16), boundaries_kept(21), boundaries_kept(256)) == (16, 10, 32)
    _check(load_model(random_models[arch]), chunk=2, lengths=(43, 23))  # 21 chunks: segments of 4, one of 1


@pytest.mark.parametrize("arch", ARCHS)
def test_boundary_states_in_a_file_give_the_same_gradient(random_models, arch, tmp_path):
    """Under a tight budget the plan keeps the chunks' boundary states in a file: the same gradient, and the file
    is gone after the step (it never had a name in the folder)."""
    _check(load_model(random_models[arch]), chunk=4, lengths=(43, 23), spill_to=tmp_path)  # 11 chunks
    assert list(tmp_path.iterdir()) == []


def test_a_state_file_gives_back_exactly_what_it_was_given(tmp_path):
    from rwkv_state_hub.loss import StateFile
    from rwkv_state_hub.model.common import RecurrentState

    g = torch.Generator().manual_seed(5)
    states = {i: RecurrentState(torch.randn(2, 3, 4, 8, 8, generator=g), torch.randn(2, 3, 16, generator=g),
                                torch.randn(1, 3, 16, generator=g).expand(2, 3, 16)) for i in range(3)}
    f = StateFile(tmp_path)
    for i, s in states.items():
        f.put(i, s)
    for i in (2, 0, 1):
        back = f.pop(i)
        for a, b in zip(back.tensors(), states[i].tensors(), strict=True):
            assert a.shape == b.shape and torch.equal(a, b)
    f.close()


def test_a_state_file_that_cannot_be_written_names_its_folder(tmp_path, monkeypatch):
    import errno
    import os

    from rwkv_state_hub import loss
    from rwkv_state_hub.model.common import RecurrentState

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(loss.os, "pwrite", full)
    f = loss.StateFile(tmp_path)
    with pytest.raises(OSError) as e:
        f.put(0, RecurrentState(torch.zeros(1, 2, 1, 4, 4), torch.zeros(1, 2, 8), torch.zeros(1, 2, 8)))
    f.close()
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path)
    assert "boundaries" in e.value.strerror and list(tmp_path.iterdir()) == []


def test_a_chunk_longer_than_the_batch_is_the_plain_backward(random_models):
    _check(load_model(random_models["v7"]), chunk=1000, lengths=(30,))


def test_training_with_time_chunks_learns_the_same_state():
    """time_chunk changes how the gradient is computed, not what it is: two steps with and without it give
    the same state (to fp32 rounding)."""
    from rwkv_state_hub import RWKV, TrainConfig, train_state

    model = RWKV.from_pretrained(example_model("tiny-rwkv-7v0-834K.pth"))
    records = [{"text": "WEATHER. Oslo: snowy, -3 C, calm. Wear boots. END. " * 3}] * 4
    settings = dict(steps=2, micro_bsz=2, ctx_len=128, full_state=True, lr_init=0.1)
    plain = train_state(model, records, TrainConfig(**settings), progress=False)
    chunked = train_state(model, records, TrainConfig(**settings, time_chunk=32), progress=False)
    assert not torch.equal(plain.wkv, torch.zeros_like(plain.wkv))
    torch.testing.assert_close(chunked.wkv, plain.wkv, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(chunked.shift, plain.shift, rtol=1e-4, atol=1e-6)


def test_a_plan_with_boundary_states_in_a_file_trains_the_same_state_and_leaves_no_file(tmp_path, monkeypatch):
    """The trainer hands the plan's file way to each step (training.step.boundary_folder): the run's folder, where
    nothing is left behind, or the temporary folder for a run that writes nowhere."""
    from rwkv_state_hub import RWKV, TrainConfig, train_state
    from rwkv_state_hub.model.memory import StepPlan
    from rwkv_state_hub.training import budget, step

    model = RWKV.from_pretrained(example_model("tiny-rwkv-7v0-834K.pth"))
    records = [{"text": "WEATHER. Oslo: snowy, -3 C, calm. Wear boots. END. " * 3}] * 4
    settings = dict(steps=2, micro_bsz=2, ctx_len=128, full_state=True, lr_init=0.1, time_chunk=32)
    in_memory = train_state(model, records, TrainConfig(**settings), progress=False)
    monkeypatch.setattr(budget, "plan", lambda model, cfg, device: StepPlan(0, 32, math.nan, True, True))
    folders = []
    real = step.chunked_backward
    monkeypatch.setattr(step, "chunked_backward", lambda *a, **k: folders.append(k["spill_to"]) or real(*a, **k))
    in_file = train_state(model, records, TrainConfig(**settings), out=tmp_path / "run", progress=False)
    assert folders and set(folders) == {tmp_path / "run"}
    assert not [f for f in (tmp_path / "run").iterdir() if f.name.startswith("tmp")]
    torch.testing.assert_close(in_file.wkv, in_memory.wkv, rtol=0, atol=0)
    torch.testing.assert_close(in_file.shift, in_memory.shift, rtol=0, atol=0)
    assert step.boundary_folder(StepPlan(0, 32, math.nan, True, False), tmp_path) is None
    assert Path(step.boundary_folder(StepPlan(0, 32, math.nan, True, True), None)).is_dir()


def test_time_chunk_is_validated():
    from rwkv_state_hub import InvalidOptionError, TrainConfig

    with pytest.raises(InvalidOptionError, match="time_chunk=8: must be at least 16"):
        TrainConfig(time_chunk=8).validate()

"""The frozen model with a trainable initial state, checked against independent references:
the `rwkv` pip package, rwkv.cpp's stored logits, step-by-step evaluation and finite differences."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import (
    ARCHS,
    EXAMPLE_MODEL,
    REAL_MODELS,
    SHARED_MODELS,
    prompt_tokens,
    random_state_like,
    real_model_path,
)
from pip_reference import pip_model

from rwkv_state_hub import load_model, read_spec
from rwkv_state_hub.model import RecurrentState, model_from_state_dict
from rwkv_state_hub.pip_bridge import pip_state, state_from_pip
from rwkv_state_hub.random_model import random_checkpoint

TOL = 1e-4


def assert_states_close(a: RecurrentState, b: RecurrentState) -> None:
    for x, y in zip(a.tensors(), b.tensors(), strict=True):
        assert torch.allclose(x, y, atol=TOL)


def ours_logits(model, tokens, state=None):
    with torch.no_grad():
        logits, final = model(torch.tensor([tokens]), state.to_recurrent() if state is not None else None)
    return logits[0], final


def pip_logits(path, arch, tokens, state=None):
    m = pip_model(path, arch)
    logits, final = m.forward(tokens, pip_state(state) if state is not None else None, full_output=True)
    return logits, final


@pytest.mark.slow
@pytest.mark.parametrize("name,arch,enc", REAL_MODELS, ids=[a for _, a, _ in REAL_MODELS])
@pytest.mark.parametrize("start", ["zero", "random"])
def test_real_models_equal_pip(name, arch, enc, start):
    path = real_model_path(name)
    spec = read_spec(path)
    model = load_model(path)
    tokens = prompt_tokens(enc)
    state = random_state_like(spec, seed=3, full=True) if start == "random" else None
    ours, our_final = ours_logits(model, tokens, state)
    ref, ref_final = pip_logits(path, arch, tokens, state)
    assert (ours - ref).abs().max().item() < TOL
    # the final state agrees too, read back through the bridge in our layout
    back = state_from_pip(ref_final, spec)
    assert torch.allclose(our_final.wkv[0], back.wkv, atol=TOL, rtol=1e-4)
    assert torch.allclose(our_final.att_x[0], back.shift[:, 0], atol=TOL)
    if start == "random":  # the state must matter, or the comparison above proves little
        zero, _ = ours_logits(model, tokens)
        assert (zero - ours).abs().max().item() > 1e-2


def test_bundled_example_equals_pip():
    model = load_model(EXAMPLE_MODEL)
    tokens = prompt_tokens()
    state = random_state_like(model.spec, seed=5)
    ours, _ = ours_logits(model, tokens, state)
    ref, _ = pip_logits(EXAMPLE_MODEL, "v7", tokens, state)
    assert (ours - ref).abs().max().item() < TOL


@pytest.mark.parametrize("name", ["tiny-rwkv-6v0-1m", "tiny-rwkv-7v0-834K"])
def test_real_models_equal_rwkv_cpp(name):
    """rwkv.cpp's stored logits after the bytes of '"in'. (v5.2 is left out: rwkv.cpp uses another
    group-norm epsilon than pip and RWKV-LM, and differs by ~1.1; see shared/models/README.md.)"""
    model = load_model(real_model_path(name))
    suffix = name.removeprefix("tiny-rwkv-")
    expected = torch.from_numpy(np.fromfile(SHARED_MODELS / f"expected-logits-{suffix}.bin", dtype="<f4"))
    ours, _ = ours_logits(model, [34, 105, 110])
    assert (ours[-1] - expected).abs().max().item() < TOL


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("start", ["zero", "random"])
def test_random_models_equal_pip(random_models, arch, start):
    path = random_models[arch]
    model = load_model(path)
    assert model.spec.head_size == 64 and model.spec.n_head == 3 and model.spec.n_layer == 2
    tokens = torch.randint(0, model.spec.vocab_size, (72,), generator=torch.Generator().manual_seed(1)).tolist()
    state = random_state_like(model.spec, seed=7, scale=0.5, full=True) if start == "random" else None
    ours, _ = ours_logits(model, tokens, state)
    ref, _ = pip_logits(path, arch, tokens, state)
    assert (ours - ref).abs().max().item() < TOL


@pytest.mark.parametrize("arch", ARCHS)
def test_sequence_mode_equals_step_mode(random_models, arch):
    model = load_model(random_models[arch])
    start = random_state_like(model.spec, seed=2, scale=0.5, full=True).to_recurrent()
    tokens = torch.randint(0, model.spec.vocab_size, (1, 23), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        seq_logits, seq_final = model(tokens, start)
    state = start
    for t in range(tokens.shape[1]):
        step_logits, state = model.step(tokens[:, t], state)
        assert torch.allclose(step_logits, seq_logits[:, t], atol=TOL)
    assert_states_close(seq_final, state)


@pytest.mark.parametrize("arch", ARCHS)
def test_ragged_batch_equals_each_sequence_alone(random_models, arch):
    model = load_model(random_models[arch])
    start = random_state_like(model.spec, seed=4, scale=0.5, full=True).to_recurrent()
    g = torch.Generator().manual_seed(3)
    lengths = [17, 5, 1, 11]
    T = max(lengths)
    tokens = torch.randint(0, model.spec.vocab_size, (len(lengths), T), generator=g)
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    tokens = torch.where(mask, tokens, 0)  # the pad token is arbitrary
    with torch.no_grad():
        batch_logits, batch_final = model(tokens, start, mask)
        for i, n in enumerate(lengths):
            alone_logits, alone_final = model(tokens[i : i + 1, :n], start)
            assert torch.allclose(batch_logits[i, :n], alone_logits[0], atol=TOL)
            assert_states_close(batch_final.select(i), alone_final)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_state_gradient_equals_finite_differences(arch):
    """d loss / d initial state (wkv and token shift), float64, against central differences."""
    sd = random_checkpoint(arch, n_layer=2, n_embd=32, head_size=16, vocab_size=40, seed=11, lora_scale=1)
    model = model_from_state_dict(sd, dtype=torch.float64, compute_dtype=torch.float64)
    spec = model.spec
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, spec.vocab_size, (2, 6), generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    targets = torch.randint(0, spec.vocab_size, (2, 6), generator=g)
    s0 = RecurrentState.zeros(spec, 1, dtype=torch.float64)
    wkv = (torch.randn(s0.wkv.shape, generator=g, dtype=torch.float64) * 0.3).requires_grad_()
    att_x = torch.randn(s0.att_x.shape, generator=g, dtype=torch.float64).requires_grad_()
    ffn_x = torch.randn(s0.ffn_x.shape, generator=g, dtype=torch.float64).requires_grad_()

    def loss(wkv, att_x, ffn_x):
        logits, _ = model(tokens, RecurrentState(wkv, att_x, ffn_x), mask)  # one state broadcast to B=2
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        return (nll * mask).sum()

    assert torch.autograd.gradcheck(loss, (wkv, att_x, ffn_x), eps=1e-6, atol=1e-6, rtol=1e-4)
    assert not any(p.requires_grad for p in model.parameters())


def test_no_weight_ever_gets_a_gradient(random_models):
    model = load_model(random_models["v7"])
    state = random_state_like(model.spec).to_recurrent()
    state.wkv.requires_grad_()
    logits, _ = model(torch.tensor([[1, 2, 3]]), state)
    logits.sum().backward()
    assert state.wkv.grad is not None and state.wkv.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_keep_fp32_state_maths(random_models, dtype):
    fp32 = load_model(random_models["v6"])
    half = load_model(random_models["v6"], dtype=dtype)
    assert half.blocks[0].att.key.weight.dtype == dtype
    assert half.blocks[0].att.time_decay.dtype == torch.float32
    tokens = torch.randint(0, 320, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, sa = fp32(tokens)
        b, sb = half(tokens)
    assert sb.wkv.dtype == torch.float32 and b.dtype == torch.float32
    # close to fp32, within what rounding the weights to 8-11 mantissa bits allows
    assert (a - b).abs().max() < 0.25 * a.abs().max()
    assert torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1] > 0.99


@pytest.mark.parametrize("arch", ARCHS)
def test_batch_gradient_is_the_sum_of_per_sample_gradients(random_models, arch):
    """One learned state broadcast over a ragged batch: its gradient must equal the sum of the
    gradients of each sample run alone (peers got this wrong with batch > 1)."""
    from rwkv_state_hub.model import LearnedState

    model = load_model(random_models[arch])
    init = random_state_like(model.spec, seed=8, scale=0.3, full=True)
    g = torch.Generator().manual_seed(5)
    lengths = [9, 4, 13]
    T = max(lengths)
    tokens = torch.randint(0, model.spec.vocab_size, (3, T), generator=g)
    targets = torch.randint(0, model.spec.vocab_size, (3, T), generator=g)
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]

    def loss(learned, tok, tgt, m):
        logits, _ = model(tok, learned(), m)
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tgt, reduction="none")
        return (nll * m).sum()

    batch = LearnedState(model.spec, True, init.wkv, init.shift)
    loss(batch, tokens, targets, mask).backward()
    alone = LearnedState(model.spec, True, init.wkv, init.shift)
    for i, n in enumerate(lengths):
        loss(alone, tokens[i : i + 1, :n], targets[i : i + 1, :n], mask[i : i + 1, :n]).backward()
    assert batch.wkv.grad.abs().max() > 0 and batch.shift.grad.abs().max() > 0
    assert torch.allclose(batch.wkv.grad, alone.wkv.grad, rtol=1e-4, atol=1e-5)
    assert torch.allclose(batch.shift.grad, alone.shift.grad, rtol=1e-4, atol=1e-5)


# how far 25 steps of state tuning must bring the loss on a repeated sentence, per real model. The tiny v7
# barely responds to its state (shared/models/README.md measures the same), v6 responds most.
LEARNING = [
    ("bundled-v7", "utf-8", 0.99),
    ("tiny-rwkv-5v2-730K", "utf-8", 0.85),
    ("tiny-rwkv-6v0-1m", "utf-16-le", 0.5),
]


@pytest.mark.parametrize("name,enc,ratio", LEARNING, ids=[n for n, _, _ in LEARNING])
def test_learning_the_state_of_a_real_model_lowers_its_loss(name, enc, ratio):
    """Adam on the state alone (weights frozen) fits a short text; the saved State reproduces the
    trained logits exactly."""
    from rwkv_state_hub import State
    from rwkv_state_hub.model import LearnedState

    model = load_model(EXAMPLE_MODEL if name == "bundled-v7" else real_model_path(name))
    text = list("Answer: the sky is green. Answer: the sky is green.".encode(enc))
    tokens, targets = torch.tensor([text[:-1]]), torch.tensor([text[1:]])
    learned = LearnedState(model.spec, full_state=True)
    opt = torch.optim.Adam(learned.parameters(), lr=1.0)

    def loss() -> torch.Tensor:
        logits, _ = model(tokens, learned())
        return torch.nn.functional.cross_entropy(logits[0], targets[0])

    before = loss().item()
    for _ in range(25):
        opt.zero_grad()
        loss().backward()
        opt.step()
    after = loss().item()
    assert after < ratio * before
    state = State.from_learned(learned, model.spec)
    with torch.no_grad():
        a, _ = model(tokens, learned())
        b, _ = model(tokens, state.to_recurrent())
    assert torch.equal(a, b)


@pytest.mark.parametrize("arch", ARCHS)
def test_fast_wkv_equals_the_reference_loop_through_the_model(random_models, arch, monkeypatch):
    """The chunked WKV, the CPU kernels and the plain loops give the same logits and state gradient, end to end
    (a padded batch longer than one chunk)."""
    model = load_model(random_models[arch])
    g = torch.Generator().manual_seed(9)
    tokens = torch.randint(0, model.spec.vocab_size, (2, 45), generator=g)
    mask = torch.ones(2, 45, dtype=torch.bool)
    mask[1, 30:] = False
    init = random_state_like(model.spec, seed=4, scale=0.3, full=True)
    results = []
    for name in ("reference", "chunked", "cpu"):
        monkeypatch.setenv("RWKV_STATE_HUB_WKV", name)
        rs = init.to_recurrent()
        rs.wkv.requires_grad_()
        logits, final = model(tokens, rs, mask)
        (logits.square().mean() + final.wkv.square().mean()).backward()
        results.append((logits.detach(), final.wkv.detach(), rs.wkv.grad))
    for fast_results in results[1:]:
        for ref, fast in zip(results[0], fast_results, strict=True):
            torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))

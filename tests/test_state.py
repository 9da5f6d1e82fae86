"""State against a model: every way it can fail to fit (one line each), the identity stamp, and the
conversions to and from the model's batched runtime state."""

from __future__ import annotations

import hashlib

import pytest
import torch
from conftest import ARCHS, random_state_like, real_model_path

from rwkv_state_hub import State, StateHubError, read_spec
from rwkv_state_hub.checkpoint import spec_from_state_dict
from rwkv_state_hub.model import RecurrentState
from rwkv_state_hub.random_model import random_checkpoint

# the random models: 2 layers x 3 heads x 64, n_embd 192


@pytest.fixture(scope="module")
def specs(random_models):
    return {arch: read_spec(path) for arch, path in random_models.items()}


def refusal(state: State, spec) -> str:
    """check() refuses with one line, the same as the first of problems()."""
    with pytest.raises(StateHubError) as e:
        state.check(spec)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(state.problems(spec)[0])
    return msg


# ---------------------------------------------------------------- fitting


@pytest.mark.parametrize("arch", ARCHS)
def test_fitting_state(specs, arch):
    spec = specs[arch]
    for state in (
        random_state_like(spec, seed=0),
        random_state_like(spec, seed=1, full=True),
        State.zeros(spec, full_state=True),
        State(torch.zeros(spec.state_shape())),  # no metadata at all: only the shape can be checked
    ):
        assert state.problems(spec) == []
        assert state.check(spec) == []
        assert state.check(spec, force=True) == []


def test_real_model_fitting_and_not(specs):
    spec = read_spec(real_model_path("tiny-rwkv-5v2-730K"))  # 12 layers x 8 heads x 8
    assert State.zeros(spec).problems(spec) == []
    state = random_state_like(specs["v5.2"])
    state.source = "random.st"
    assert refusal(state, spec) == (
        "random.st: 2 layers x 3 heads x 64, but tiny-rwkv-5v2-730K has 12 layers x 8 heads x 8"
    )


# ---------------------------------------------------------------- wrong dims


@pytest.mark.parametrize(
    "shape",
    [(24, 32, 64), (3, 3, 64), (2, 4, 64), (2, 6, 32), (1, 3, 64)],
    ids=["all", "layers", "heads", "head-size", "fewer-layers"],
)
def test_wrong_dims(specs, shape):
    spec = specs["v6"]
    L, H, N = shape
    state = State(torch.zeros(L, H, N, N), source="mine.st")
    expected = f"mine.st: {L} layers x {H} heads x {N}, but random-v6 has 2 layers x 3 heads x 64"
    assert state.problems(spec) == [expected]
    msg = refusal(state, spec)
    assert msg == expected  # no "--force" hint: a state of the wrong shape cannot be forced
    with pytest.raises(StateHubError, match="layers x"):
        state.check(spec, force=True)


@pytest.mark.parametrize("shape", [(2, 3, 64), (2, 3, 64, 32), (1, 2, 3, 64, 64)])
def test_wkv_that_is_not_layers_heads_n_n(specs, shape):
    state = State(torch.zeros(shape), source="odd.st")
    msg = refusal(state, specs["v7"])
    assert msg.startswith("odd.st: wkv state has shape") and str(list(shape)) in msg


# ---------------------------------------------------------------- other problems


def test_wrong_arch(specs):
    state = random_state_like(specs["v6"])  # same dims as the v7 model, made for v6
    state.source = "s.st"
    problems = state.problems(specs["v7"])
    assert problems[0] == "s.st: made for an RWKV v6 model, but random-v7 is v7"
    assert refusal(state, specs["v7"]).startswith(problems[0])
    # the arch alone, without a recorded base model
    bare = State(state.wkv, None, {"arch": "v5.2"}, "bare.st")
    assert bare.problems(specs["v7"]) == ["bare.st: made for an RWKV v5.2 model, but random-v7 is v7"]


@pytest.mark.parametrize("shape", [(2, 2, 100), (3, 2, 192), (2, 3, 192), (2, 192)])
def test_wrong_shift_shape(specs, shape):
    spec = specs["v5.2"]
    state = State(torch.zeros(spec.state_shape()), torch.zeros(shape), source="s.st")
    msg = refusal(state, spec)
    assert msg == f"s.st: token-shift state {list(shape)}, but random-v5.2 needs [2, 2, 192]"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_wkv_not_fp32(specs, dtype):
    spec = specs["v6"]
    state = State(torch.zeros(spec.state_shape(), dtype=dtype), source="s.st")
    assert refusal(state, spec) == f"s.st: wkv state is {dtype}, expected float32"


def test_shift_not_fp32(specs):
    spec = specs["v6"]
    state = State(torch.zeros(spec.state_shape()), torch.zeros(2, 2, 192, dtype=torch.bfloat16), source="s.st")
    assert refusal(state, spec) == "s.st: token-shift state is torch.bfloat16, expected float32"


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", ["wkv", "token-shift"])
def test_non_finite(specs, value, where):
    spec = specs["v7"]
    state = random_state_like(spec, seed=2, full=True)
    state.source = "s.st"
    (state.wkv if where == "wkv" else state.shift)[1, 0, 5] = value
    assert refusal(state, spec) == f"s.st: {where} state has non-finite values (NaN or inf)"


def test_every_problem_listed(specs):
    spec = specs["v6"]
    state = State(
        torch.full((2, 3, 64, 64), float("nan"), dtype=torch.bfloat16),
        torch.zeros(2, 2, 7),
        {"arch": "v7", "base_model_sha256": "0" * 64},
    )
    problems = state.problems(spec)
    assert len(problems) == 5
    assert all("\n" not in p for p in problems)
    for words in ("v7 model", "token-shift state [2, 2, 7]", "bfloat16", "non-finite", "sha256 000000000000"):
        assert sum(words in p for p in problems) == 1, words
    assert "sha256" in problems[-1]  # the identity problem comes last, after what makes it unusable
    with pytest.raises(StateHubError) as err:
        state.check(spec, force=True)  # force waives only the identity
    assert str(err.value) == problems[0]


# ---------------------------------------------------------------- base-model identity


def test_spec_sha256_is_the_file_hash(random_models, specs):
    for arch, path in random_models.items():
        assert specs[arch].sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_other_base_model_is_refused_unless_forced(specs):
    spec = specs["v6"]
    other = "ab" * 32
    state = random_state_like(spec, seed=3)
    state.metadata.update(base_model_sha256=other, base_model_name="RWKV-x060-World-1B6",
                          base_model_fingerprint="rwkvfp1:" + "cd" * 32)
    state.source = "s.st"
    expected = (f"s.st: made for RWKV-x060-World-1B6 (sha256 {other[:12]}), "
                f"but random-v6 has sha256 {spec.sha256[:12]} and other weights")
    assert state.problems(spec) == [expected]
    msg = refusal(state, spec)
    assert other[:12] in msg and spec.sha256[:12] in msg and "(pass force=True to use it anyway)" in msg
    assert state.check(spec, force=True) == [expected]


def test_other_base_model_without_a_name(specs):
    spec = specs["v6"]
    state = State(torch.zeros(spec.state_shape()), metadata={"base_model_sha256": "cd" * 32})
    (problem,) = state.problems(spec)
    assert "another model" in problem and "cdcdcdcdcdcd" in problem


def test_sha256_not_compared_without_a_file(specs):
    """A model built from memory has no file hash: the recorded one cannot be checked, and is no problem."""
    spec = spec_from_state_dict(random_checkpoint("v6", n_layer=2, n_embd=192, head_size=64, vocab_size=320))
    assert spec.sha256 is None
    assert random_state_like(specs["v6"]).problems(spec) == []


def test_with_model_stamps_the_identity(random_models, specs):
    path, spec = random_models["v5.2"], specs["v5.2"]
    wkv = torch.randn(spec.state_shape())
    state = State(wkv, None, {"training": {"lr": 1.0}, "arch": "v7"}, "s.st")
    stamped = state.with_model(spec)
    m = stamped.metadata
    assert m["arch"] == "v5.2" and stamped.arch == "v5.2"
    assert (m["n_layer"], m["n_embd"], m["n_head"], m["head_size"]) == (2, 192, 3, 64)
    assert m["base_model_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() == stamped.base_model_sha256
    assert m["base_model_name"] == "random-v5.2"
    assert m["base_model_size"] == path.stat().st_size
    assert m["training"] == {"lr": 1.0}  # other metadata kept
    assert stamped.wkv is wkv and stamped.source == "s.st"
    assert state.metadata == {"training": {"lr": 1.0}, "arch": "v7"}  # the original is not changed
    assert stamped.problems(spec) == []
    assert state.problems(spec) != []


def test_with_model_without_a_file(specs):
    spec = spec_from_state_dict(random_checkpoint("v7", n_layer=2, n_embd=192, head_size=64, vocab_size=320))
    stamped = State(torch.zeros(spec.state_shape())).with_model(spec)
    assert stamped.arch == "v7" and stamped.metadata["n_layer"] == 2
    assert "base_model_sha256" not in stamped.metadata and stamped.base_model_sha256 is None


# ---------------------------------------------------------------- zeros and the runtime state


@pytest.mark.parametrize("arch", ARCHS)
def test_zeros(specs, arch):
    spec = specs[arch]
    full = State.zeros(spec, full_state=True)
    assert full.wkv.shape == (2, 3, 64, 64) and full.shift.shape == (2, 2, 192)
    assert full.wkv.dtype == full.shift.dtype == torch.float32
    assert not full.wkv.any() and not full.shift.any()
    assert full.arch == arch and full.base_model_sha256 == spec.sha256
    assert (full.n_layer, full.n_head, full.head_size, full.n_embd) == (2, 3, 64, 192)
    assert full.dims() == spec.dims() == "2 layers x 3 heads x 64"
    assert State.zeros(spec).shift is None


def test_to_recurrent_batch(specs):
    spec = specs["v6"]
    state = random_state_like(spec, seed=4, full=True)
    rs = state.to_recurrent(batch=3)
    assert isinstance(rs, RecurrentState)
    assert rs.wkv.shape == (3, 2, 3, 64, 64)
    assert rs.att_x.shape == rs.ffn_x.shape == (3, 2, 192)
    assert all(t.dtype == torch.float32 for t in rs.tensors())
    for b in range(3):
        assert torch.equal(rs.wkv[b], state.wkv)
        assert torch.equal(rs.att_x[b], state.shift[:, 0])
        assert torch.equal(rs.ffn_x[b], state.shift[:, 1])


def test_to_recurrent_without_shift_starts_it_from_zero(specs):
    spec = specs["v7"]
    state = random_state_like(spec, seed=5)
    rs = state.to_recurrent()
    assert rs.wkv.shape == (1, 2, 3, 64, 64) and torch.equal(rs.wkv[0], state.wkv)
    assert rs.att_x.shape == rs.ffn_x.shape == (1, 2, 192)
    assert not rs.att_x.any() and not rs.ffn_x.any()


def test_to_recurrent_casts_to_fp32(specs):
    spec = specs["v6"]
    state = random_state_like(spec, seed=6, full=True)
    half = State(state.wkv.bfloat16(), state.shift.bfloat16())
    rs = half.to_recurrent(batch=2)
    assert all(t.dtype == torch.float32 for t in rs.tensors())
    assert torch.equal(rs.wkv[1], state.wkv.bfloat16().float())


def test_from_recurrent_picks_the_row(specs):
    spec = specs["v5.2"]
    g = torch.Generator().manual_seed(7)
    rs = RecurrentState(torch.randn(4, 2, 3, 64, 64, generator=g), torch.randn(4, 2, 192, generator=g),
                        torch.randn(4, 2, 192, generator=g))
    for index in range(4):
        state = State.from_recurrent(rs, spec, index=index, prompt="Once upon a time")
        assert torch.equal(state.wkv, rs.wkv[index])
        assert state.shift.shape == (2, 2, 192)
        assert torch.equal(state.shift[:, 0], rs.att_x[index])
        assert torch.equal(state.shift[:, 1], rs.ffn_x[index])
        assert state.metadata["prompt"] == "Once upon a time"
        assert state.arch == "v5.2" and state.base_model_sha256 == spec.sha256
        assert state.problems(spec) == []
    wkv_only = State.from_recurrent(rs, spec, index=2, full_state=False)
    assert wkv_only.shift is None and torch.equal(wkv_only.wkv, rs.wkv[2])
    # a copy, not a view of the batch
    state = State.from_recurrent(rs, spec, index=1)
    rs.wkv.zero_()
    rs.att_x.zero_()
    assert state.wkv.any() and state.shift.any()


def test_recurrent_round_trip(specs):
    spec = specs["v7"]
    state = random_state_like(spec, seed=8, full=True)
    back = State.from_recurrent(state.to_recurrent(batch=3), spec, index=2)
    assert torch.equal(back.wkv, state.wkv) and torch.equal(back.shift, state.shift)

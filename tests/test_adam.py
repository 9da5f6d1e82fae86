"""The learned state's Adam (training/adam.py) against torch.optim.Adam: the same updates, checkpoints that move
between the two, and a checkpoint that does not fit refused."""

import pytest
import torch

from rwkv_state_hub.training.adam import Adam


def _params(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(3, 4, 4, generator=g)), torch.nn.Parameter(torch.randn(2, 7, generator=g)),
            torch.nn.Parameter(torch.randn(5, generator=g))]


def _groups(params):
    return [{"params": params[:1], "lr_scale": 0.5}, {"params": params[1:], "lr_scale": 1.0}]


def _steps(opt, params, first: int, last: int) -> None:
    """Steps first..last-1: each a new gradient (one parameter skipped on odd steps) and a new learning rate."""
    for step in range(first, last):
        g = torch.Generator().manual_seed(100 + step)
        for i, p in enumerate(params):
            p.grad = None if (step % 2 and i == 2) else torch.randn(p.shape, generator=g) * 10 ** (i - 1)
        for group in opt.param_groups:
            group["lr"] = 0.01 * (1 + step) * group["lr_scale"]
        opt.step()


def test_the_same_updates_as_torch_adam():
    ours, theirs = _params(0), _params(0)
    a = Adam(_groups(ours), lr=0.01, betas=(0.9, 0.99), eps=1e-6)
    b = torch.optim.Adam(_groups(theirs), lr=0.01, betas=(0.9, 0.99), eps=1e-6)
    _steps(a, ours, 0, 7)
    _steps(b, theirs, 0, 7)
    for p, q, start in zip(ours, theirs, _params(0), strict=True):
        assert torch.equal(p, q)  # bit for bit: the same operations in the same order as torch's CPU path
        assert not torch.equal(p, start)  # it moved


@pytest.mark.parametrize("direction", ["torch to ours", "ours to torch"])
def test_a_checkpoint_moves_between_the_two(direction):
    make = {"ours": lambda ps: Adam(_groups(ps), lr=0.01, betas=(0.9, 0.99), eps=1e-6),
            "torch": lambda ps: torch.optim.Adam(_groups(ps), lr=0.01, betas=(0.9, 0.99), eps=1e-6)}
    source, target = direction.split(" to ")
    straight, first, second = _params(1), _params(1), None
    s = make[source](straight)
    _steps(s, straight, 0, 8)
    o = make[source](first)
    _steps(o, first, 0, 3)
    second = [torch.nn.Parameter(p.detach().clone()) for p in first]
    t = make[target](second)
    t.load_state_dict(o.state_dict())
    _steps(t, second, 3, 8)
    for p, q in zip(second, straight, strict=True):
        assert torch.equal(p, q)


def test_a_state_dict_that_does_not_fit_is_refused():
    opt = Adam(_groups(_params(2)), lr=0.01)
    _steps(opt, [p for g in opt.param_groups for p in g["params"]], 0, 1)
    saved = opt.state_dict()
    other = Adam([{"params": _params(3)}], lr=0.01)
    with pytest.raises(ValueError, match="parameter groups differ"):
        other.load_state_dict(saved)
    broken = {**saved, "state": {0: {"step": 1.0, "exp_avg": "x"}}}
    with pytest.raises(TypeError, match="not a dict of tensors"):
        Adam(_groups(_params(2)), lr=0.01).load_state_dict(broken)
    with pytest.raises(TypeError, match="not an optimizer's state_dict"):
        Adam(_groups(_params(2)), lr=0.01).load_state_dict({"state": [], "param_groups": saved["param_groups"]})
    with pytest.raises(KeyError):
        Adam(_groups(_params(2)), lr=0.01).load_state_dict({**saved, "state": {9: saved["state"][0]}})

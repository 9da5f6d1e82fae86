"""Adam for the learned state: torch.optim.Adam's update and checkpoint format, without torch.optim.

torch.optim imports torch._dynamo (and with it sympy and mpmath, 820 modules) the first time an optimizer is made
or stepped: 70 MiB of RSS for the whole run, which a run under --memory-budget cannot spare. This is the update of
torch.optim.Adam's single-tensor path, the one it takes on the CPU (no weight decay, no amsgrad), and its
`state_dict` is torch.optim.Adam's, so a checkpoint written by either loads into the other.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

# what torch.optim.Adam's parameter groups also record, for none of which this Adam does anything
TORCH_GROUP_SETTINGS = {"weight_decay": 0.0, "amsgrad": False, "maximize": False, "foreach": None, "capturable": False,
                        "differentiable": False, "fused": None, "decoupled_weight_decay": False}


class Adam:
    """Adam over parameter groups (dicts with "params" and any other keys, kept as they are: the trainer's
    "lr_scale"); `lr`, `betas` and `eps` are every group's defaults."""

    def __init__(self, groups: Iterable[dict], *, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8):
        self.defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, **TORCH_GROUP_SETTINGS}
        self.param_groups = [{**self.defaults, **group, "params": list(group["params"])} for group in groups]
        if not any(group["params"] for group in self.param_groups):
            raise ValueError("Adam got no parameters")
        self.state: dict[Tensor, dict[str, Tensor]] = {}

    @torch.no_grad()
    def step(self) -> None:
        """One update of every parameter that has a gradient; a parameter's moments start at its first."""
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state.get(p)
                if state is None:
                    state = self.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                             "exp_avg_sq": torch.zeros_like(p)}
                state["step"] += 1
                t = float(state["step"])
                state["exp_avg"].lerp_(p.grad, 1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2**t)).add_(group["eps"])
                p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - beta1**t))

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_().zero_()

    def state_dict(self) -> dict:
        """torch.optim's layout: parameters by their index in the groups' order."""
        index: dict[int, int] = {}
        groups = []
        for group in self.param_groups:
            ids = [index.setdefault(id(p), len(index)) for p in group["params"]]
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": ids})
        state = {index[id(p)]: dict(s) for p, s in self.state.items()}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, saved: dict) -> None:
        """Moments and group settings from a state_dict of this class or of torch.optim.Adam. ValueError when its
        groups do not match these; KeyError when it names a parameter they do not have."""
        groups, states = saved.get("param_groups"), saved.get("state")
        if not isinstance(groups, list) or not isinstance(states, dict) or not all(
                isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups):
            raise TypeError("not an optimizer's state_dict")
        if len(groups) != len(self.param_groups) or any(
                len(a["params"]) != len(b["params"]) for a, b in zip(groups, self.param_groups, strict=True)):
            raise ValueError("the saved optimizer's parameter groups differ from this one's")
        params = {i: p for a, b in zip(groups, self.param_groups, strict=True)
                  for i, p in zip(a["params"], b["params"], strict=True)}
        state = {}
        for i, s in states.items():
            p = params[i]
            if not isinstance(s, dict) or not all(isinstance(v, Tensor) for v in s.values()):
                raise TypeError(f"the saved optimizer's record of parameter {i} is not a dict of tensors")
            state[p] = {k: v.detach().clone() if k == "step" else v.detach().to(device=p.device, dtype=p.dtype).clone()
                        for k, v in s.items()}
        self.state = state
        for a, b in zip(groups, self.param_groups, strict=True):
            b.update({k: v for k, v in a.items() if k != "params"})

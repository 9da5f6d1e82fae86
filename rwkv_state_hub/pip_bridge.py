"""State <-> the `rwkv` pip package's state list, the only way to use a state with pip's RWKV-7.

pip's list has 3 entries a layer: [att_x_prev [C], wkv [H, N, N] fp32, ffn_x_prev [C]].
Its v5/v6 code keeps the wkv as [head, key, value] (the transpose of our layout); its v7 code keeps
[head, value, key], our layout as is.
"""

from __future__ import annotations

import importlib.util
import os
from functools import cache
from pathlib import Path

import torch
from torch import Tensor

from .checkpoint import ModelSpec, read_spec
from .errors import InvalidOptionError, ModelMismatchError, option
from .state import State


def _pip_wkv_is_transposed(arch: str) -> bool:
    return arch in ("v5.2", "v6")


def pip_state(
    state: State, arch: str | None = None, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> list[Tensor]:
    """A fresh pip state list for `model.forward(tokens, pip_state(state))`.

    `dtype` is the strategy's activation dtype (fp32 for "cpu fp32", fp16 for "cuda fp16"), used for the
    token-shift entries; the wkv entries are always fp32, as pip keeps them.
    """
    if arch is None and state.arch is None:
        raise InvalidOptionError(f"{state.source}: the state does not record its architecture; pass "
                                 f"{option('arch', 'v7')} (or 'v5.2', 'v6')")
    arch = arch or state.arch
    if arch not in ("v5.2", "v6", "v7"):
        raise InvalidOptionError(f"{option('arch', arch)}: expected 'v5.2', 'v6' or 'v7'")
    out: list[Tensor] = []
    for i in range(state.n_layer):
        wkv = state.wkv[i].float()
        if _pip_wkv_is_transposed(arch):
            wkv = wkv.transpose(1, 2)
        if state.shift is not None:
            att_x, ffn_x = state.shift[i, 0], state.shift[i, 1]
        else:
            att_x = ffn_x = torch.zeros(state.n_embd)
        out += [att_x.to(device, dtype).clone(), wkv.to(device).contiguous().clone(), ffn_x.to(device, dtype).clone()]
    return out


def state_from_pip(pip_list: list[Tensor], spec: ModelSpec, **metadata) -> State:
    """Read a pip state list back (e.g. after pip ran a prompt): a State for `spec`, token shift included."""
    L = spec.n_layer
    if len(pip_list) != 3 * L:
        raise ModelMismatchError(f"a pip state list for {spec.name} has {3 * L} entries, got {len(pip_list)}")
    wkv = torch.stack([pip_list[3 * i + 1].float().cpu() for i in range(L)])
    if _pip_wkv_is_transposed(spec.arch):
        wkv = wkv.transpose(2, 3)
    shift = torch.stack([torch.stack([pip_list[3 * i].float().cpu(), pip_list[3 * i + 2].float().cpu()])
                         for i in range(L)])
    return State(wkv.contiguous(), shift, metadata).with_model(spec)


@cache
def _pip_module(v7: bool):
    """rwkv.model, imported on its own for v7 or v5/v6: its RWKV-7 class exists only when RWKV_V7_ON=1 at
    import time, and then takes the place of the v5/v6 class. Two private copies let both live in one
    process (the demo shows any model; the tests compare all three)."""
    import rwkv

    src = Path(rwkv.__file__).parent / "model.py"
    old = os.environ.get("RWKV_V7_ON")
    os.environ["RWKV_V7_ON"] = "1" if v7 else "0"
    try:
        spec = importlib.util.spec_from_file_location(f"_rwkv_pip_{'v7' if v7 else 'v56'}", src)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if old is None:
            os.environ.pop("RWKV_V7_ON")
        else:
            os.environ["RWKV_V7_ON"] = old
    return module


def load_pip_model(path: str | os.PathLike, strategy: str = "cpu fp32"):
    """Load a checkpoint with the `rwkv` pip package, whatever its version (v7 included)."""
    arch = read_spec(path).arch
    stem = str(path).removesuffix(".pth")
    if arch == "v7":
        return _pip_module(True).RWKV_x070(stem, strategy)
    return _pip_module(False).RWKV(stem, strategy, verbose=False)

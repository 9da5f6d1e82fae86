"""The `rwkv` pip package as an independent reference: its maths, our import mechanics."""

from __future__ import annotations

import os

os.environ.setdefault("RWKV_JIT_ON", "0")  # scripting costs more than it saves on tiny test models
os.environ.setdefault("RWKV_CUDA_ON", "0")

from rwkv_state_hub.pip_bridge import load_pip_model  # noqa: E402


def pip_model(path: str | os.PathLike, arch: str, strategy: str = "cpu fp32"):
    """Load a checkpoint with the `rwkv` pip package (path with or without .pth)."""
    path = str(path) if str(path).endswith(".pth") else f"{path}.pth"
    model = load_pip_model(path, strategy)
    assert (arch == "v7") == (type(model).__name__ == "RWKV_x070")
    return model

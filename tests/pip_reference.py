"""The `rwkv` pip package as an independent reference.

Its v7 model is only defined when RWKV_V7_ON=1 at import time, and then it replaces the v5/v6 class
under the same name; so each flavour is imported as its own module.
"""

from __future__ import annotations

import importlib.util
import os
from functools import cache
from pathlib import Path


@cache
def _pip_module(v7: bool):
    import rwkv

    src = Path(rwkv.__file__).parent / "model.py"
    os.environ.update(RWKV_JIT_ON="0", RWKV_CUDA_ON="0")  # read again at run time: they stay set
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


def pip_model(path: str | os.PathLike, arch: str, strategy: str = "cpu fp32"):
    """Load a checkpoint with the `rwkv` pip package (path with or without .pth)."""
    stem = str(path).removesuffix(".pth")
    if arch == "v7":
        return _pip_module(True).RWKV_x070(stem, strategy)
    return _pip_module(False).RWKV(stem, strategy, verbose=False)

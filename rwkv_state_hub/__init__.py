"""rwkv-state-hub: train, share and use RWKV state-tuning states, keyed to the exact base model.

    from rwkv_state_hub import RWKV, State, TrainConfig, train_state
    model = RWKV.from_pretrained("RWKV-x070-World-0.1B.pth")
    state = train_state(model, "train.jsonl", TrainConfig(steps=200))
    state.save_pretrained("my-state", exports=("pth", "ai00"))

Names are imported on first use (PEP 562), so `import rwkv_state_hub` and the CLI's `--help` do not pay
for torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._version import __version__

# public name -> the module that defines it
_EXPORTS = {
    "RWKV": ".model",
    "load_model": ".model",
    "State": ".state",
    "ModelSpec": ".checkpoint",
    "read_spec": ".checkpoint",
    "load_state": ".formats",
    "export_state": ".formats",
    "TrainConfig": ".training",
    "TrainResult": ".training",
    "train_state": ".training",
    "Sampling": ".generate",
    "EvalResult": ".evaluate",
    "push": ".hub",
    "pull": ".hub",
    "search": ".hub",
    "pip_state": ".pip_bridge",
    "state_from_pip": ".pip_bridge",
    "StateHubError": ".errors",
    "InvalidOptionError": ".errors",
    "InvalidCheckpointError": ".errors",
    "InvalidStateError": ".errors",
    "ModelMismatchError": ".errors",
    "InvalidDataError": ".errors",
    "TokenizerError": ".errors",
    "HubError": ".errors",
    "HubEntryNotFoundError": ".errors",
    "FileAccessError": ".errors",
    "StateHubWarning": ".errors",
    "OutputExistsError": ".errors",
    "ConsumerError": ".errors",
    "TrainingDiverged": ".errors",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rwkv_state_hub' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


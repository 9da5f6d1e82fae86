"""rwkv-state-hub: train, check, convert and share RWKV state-tuning states, keyed to the exact base model."""

__version__ = "0.1.0"

from .checkpoint import ModelSpec, read_checkpoint, read_spec  # noqa: E402
from .errors import StateHubError  # noqa: E402
from .formats import detect_format, export_state, load_state, save_native  # noqa: E402
from .hub import pull, push, search  # noqa: E402
from .model import RWKV, LearnedState, RecurrentState, load_model  # noqa: E402
from .pip_bridge import pip_state, state_from_pip  # noqa: E402
from .state import State  # noqa: E402

__all__ = [
    "LearnedState", "ModelSpec", "RWKV", "RecurrentState", "State", "StateHubError", "__version__", "detect_format",
    "export_state", "load_model", "load_state", "pip_state", "read_checkpoint", "read_spec", "save_native",
    "state_from_pip", "pull", "push", "search",
]

"""RWKV Runner: install a state into its `state-models/` for the right model, mount it in a running backend."""

from .runner import (
    DEFAULT_URL,
    STATE_FOLDER,
    Installed,
    find_base_model,
    install,
    manifest_sha256,
    models_folder,
    mount,
    runner_problems,
    unmount,
    wkv_as_runner_uses_it,
)

__all__ = [
    "DEFAULT_URL", "STATE_FOLDER", "Installed", "find_base_model", "install", "manifest_sha256", "models_folder",
    "mount", "runner_problems", "unmount", "wkv_as_runner_uses_it",
]

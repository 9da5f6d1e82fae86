"""Ai00 server: install a state into its model folder and Config.toml, and chat with a state per request."""

from .ai00 import (
    CHAT_PATH,
    DEFAULT_URL,
    Installed,
    ai00_model_spec,
    ai00_problems,
    chat,
    config_path,
    install,
    model_folder,
    state_id,
    wkv_as_ai00_reads_it,
)

__all__ = [
    "CHAT_PATH", "DEFAULT_URL", "Installed", "ai00_model_spec", "ai00_problems", "chat", "config_path", "install",
    "model_folder", "state_id", "wkv_as_ai00_reads_it",
]

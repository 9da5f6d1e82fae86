"""The demo page: the base model and a state side by side, in the `rwkv` pip package (what people run).

    engine.py  DemoEngine: the states offered, uploads, bake, inspect, completion and chat (no gradio)
    render.py  the Markdown the page shows: state cards, answers (no gradio)
    page.py    the Gradio page over an engine; create_demo, launch_demo, settings_from_env

`app.py` and `rwkv-state demo` both start it through `create_demo` + `launch_demo`. The page's names are
imported on first use (PEP 562), so that `rwkv_state_hub.demo.engine` can be used, and tested, without gradio.
"""

from __future__ import annotations

import importlib
from typing import Any

from .engine import (
    MAX_MERGED_BYTES,
    MAX_OWN_STATES,
    MAX_PROMPT_CHARS,
    MAX_SCAN_BYTES,
    MAX_UPLOAD_BYTES,
    NO_STATE,
    SCRATCH_TTL_S,
    STATE_SUFFIXES,
    DemoEngine,
    Offered,
    new_session,
)
from .render import MAX_SHOWN_CHARS, describe_state

_PAGE = ("build_demo", "create_demo", "launch_demo", "settings_from_env", "SESSION_TTL_S", "STRANGERS_TEXT")

__all__ = ["MAX_MERGED_BYTES", "MAX_OWN_STATES", "MAX_PROMPT_CHARS", "MAX_SCAN_BYTES", "MAX_SHOWN_CHARS",
           "MAX_UPLOAD_BYTES", "NO_STATE", "SCRATCH_TTL_S", "STATE_SUFFIXES", "DemoEngine", "Offered",
           "describe_state", "new_session", *_PAGE]


def __getattr__(name: str) -> Any:
    if name not in _PAGE:
        raise AttributeError(f"module 'rwkv_state_hub.demo' has no attribute {name!r}")
    value = getattr(importlib.import_module(".page", __name__), name)
    globals()[name] = value
    return value

"""The bundled example model(s) and state(s), shipped inside the package so that they exist in any install.

This module is the one place that knows where they live and which model is the default: the quickstart, the
demo with no `--model`, `app.py` and the tests all ask it.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import InvalidOptionError

HERE = Path(__file__).resolve().parent
# the bundled states (states/) are trained for this model, so a demo with no arguments has something to show
DEFAULT_MODEL = "rwkv7-example-L4-D256.pth"


def example_model(name: str | None = None) -> Path:
    """A bundled model file by name (with or without `.pth`); the default one when no name is given."""
    file = name or DEFAULT_MODEL
    path = HERE / "models" / (file if file.endswith(".pth") else f"{file}.pth")
    if Path(file).name != file or not path.is_file():
        bundled = ", ".join(sorted(p.name for p in (HERE / "models").glob("*.pth"))) or "none"
        raise InvalidOptionError(f"{name}: no such bundled example model (bundled: {bundled})")
    return path


def example_states() -> Path:
    """The folder of bundled states, made for the default example model."""
    return HERE / "states"

"""The errors a user can cause, one class per kind of problem, all under `StateHubError`.

Catch `StateHubError` for everything, or one subclass for one kind (a notebook that tries several states
catches `ModelMismatchError`). A message is one line that names the file (and line) and the parameter to
change. Parameters are written with `option()`: as Python (`force=True`) for library users, and as the
flag (`--force`) once the command line has called `speak_cli()`, so each message is composed once, in the
caller's own words, and no code ever reads a message back. Bugs in our own code raise ordinary exceptions.
"""

from __future__ import annotations

import warnings
from contextvars import ContextVar
from typing import Any

_CLI: ContextVar[bool] = ContextVar("rwkv_state_hub_cli", default=False)
_UNSET = object()
_FLAG_NAMES = {"fmt": "format", "state_path": "state", "base_model": "model"}  # Python name -> flag, where they differ


class StateHubError(Exception):
    """A problem with the user's input: a bad file, a state that does not fit, bad data, a refused download."""


class InvalidOptionError(StateHubError, ValueError):
    """A parameter (a TrainConfig field, a sampling setting, a format name) has a value it cannot have."""


class InvalidCheckpointError(StateHubError):
    """A base-model checkpoint cannot be read, is not an RWKV model, or holds NaN/inf weights."""


class InvalidStateError(StateHubError):
    """A state file cannot be read: not a state, a bad layout or metadata, non-finite values."""


class ModelMismatchError(StateHubError):
    """A state, checkpoint or resume file was made for another base model (or shape) than the one given."""


class InvalidDataError(StateHubError):
    """Training or evaluation data cannot be used; the message names the file and line."""


class TokenizerError(StateHubError):
    """No tokenizer fits the model, or a tokenizer file cannot be read."""


class HubError(StateHubError):
    """The Hugging Face Hub refused or failed: no access, no such repo or file, no network, a bad download."""


class HubEntryNotFoundError(HubError):
    """The Hub repo exists, but the file asked for is not in it."""


class FileAccessError(StateHubError):
    """The operating system refused a read or write: no permission, a full disk, a file where a folder should be."""


class OutputExistsError(StateHubError):
    """A run folder already holds a run: continue it (resume=True) or choose another out."""


class ConsumerError(StateHubError):
    """A consumer's folder or configuration (RWKV Runner, Ai00) is missing or not as expected."""


class TrainingDiverged(StateHubError):
    """A step's loss, gradient or state was not finite; the last good checkpoint is kept."""


class StateHubWarning(UserWarning):
    """Worth knowing, not worth stopping for: a base-model mismatch force=True let through, a mix that fills a
    missing token shift with zeros. The CLI prints each as one `warning:` line."""


def warn(message: str) -> None:
    """Warn the caller of the library function that called this one."""
    warnings.warn(message, StateHubWarning, stacklevel=3)


def speak_cli(on: bool = True) -> None:
    """From now on (in this context), messages name flags (`--force`) instead of parameters (`force=True`)."""
    _CLI.set(on)


def option(name: str, value: Any = _UNSET) -> str:
    """A parameter as the reader will type it: `force=True` / `--force`, `ctx_len=512` / `--ctx-len 512`."""
    if not _CLI.get():
        return name if value is _UNSET else f"{name}={value!r}"
    flag = "--" + _FLAG_NAMES.get(name, name).replace("_", "-")
    if value is _UNSET or value is True:
        return flag
    if isinstance(value, list | tuple):
        value = ",".join(map(str, value))
    return f"{flag} {value}"

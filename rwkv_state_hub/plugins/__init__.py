"""Consumers of our states: RWKV Runner (`rwkv_runner`) and Ai00 (`ai00`), each with its loading rules in one place.

Installed as `rwkv_state_hub.plugins`. What the two share lives here: turning a file or a Hub repo id into a
`State`, and one small JSON-over-HTTP call with errors a user can read.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from rwkv_state_hub.errors import ConsumerError, InvalidOptionError

if TYPE_CHECKING:
    from rwkv_state_hub.checkpoint import ModelSpec
    from rwkv_state_hub.state import State

_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def resolve_state(state_or_repo: str | os.PathLike, spec: ModelSpec | None = None, force: bool = False) -> State:
    """A local state file (any format) or a Hub repo id ("owner/name[@revision]"), pulled and verified against
    `spec` (the base model, when known; `force` lets a base-model mismatch through, as everywhere), as a State."""
    from rwkv_state_hub import hub
    from rwkv_state_hub.formats import load_state

    path = Path(state_or_repo)
    if path.exists():
        return load_state(path)
    text = str(state_or_repo)
    if hub.is_repo_id(text):
        return load_state(hub.pull(text, model=spec, force=force))
    raise InvalidOptionError(f"{text}: no such file, and not a Hub repo id (owner/name)")


def state_stem(state_or_repo: str | os.PathLike) -> str:
    """A short name for a state, for the files we write: the file name without extension, or the repo's name."""
    text = str(state_or_repo)
    path = Path(text)
    if path.exists():
        return path.stem or "state"
    return text.split("@")[0].rstrip("/").split("/")[-1] or "state"


def post_json(url: str, body: dict[str, Any], server: str, timeout: float = 30.0) -> Any:
    """POST `body` as JSON and return the decoded reply; every failure is one line naming `server` and `url`.

    A loopback URL bypasses any HTTP proxy from the environment: the servers we talk to run beside the user.
    """
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", "Accept": "application/json"})
    handlers = [urllib.request.ProxyHandler({})] if urlsplit(url).hostname in _LOOPBACK else []
    try:
        with urllib.request.build_opener(*handlers).open(request, timeout=timeout) as reply:
            raw = reply.read()
    except urllib.error.HTTPError as e:
        raise ConsumerError(f"{server} at {url} answered HTTP {e.code}: {_error_detail(e)}") from None
    except urllib.error.URLError as e:
        reason = getattr(e.reason, "strerror", None) or str(e.reason)
        raise ConsumerError(f"cannot reach {server} at {url} ({reason}): is it running, is the URL right?") from None
    except TimeoutError:
        raise ConsumerError(f"{server} at {url} did not answer within {timeout:g} s") from None
    try:
        return json.loads(raw) if raw.strip() else None
    except ValueError:
        raise ConsumerError(f"{server} at {url} sent a reply that is not JSON: {raw[:120]!r}") from None


def _error_detail(e: urllib.error.HTTPError) -> str:
    """The server's own words: FastAPI's {"detail": ...}, an OpenAI-style {"error": {"message": ...}}, or text."""
    raw = e.read()[:2000]
    try:
        body = json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace").strip() or e.reason
    if isinstance(body, dict):
        detail = body.get("detail") or body.get("error") or body.get("message")
        if isinstance(detail, dict):
            detail = detail.get("message") or detail
        if detail:
            return detail if isinstance(detail, str) else json.dumps(detail)
    return json.dumps(body)

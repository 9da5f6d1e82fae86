"""Shared fixtures: the real tiny checkpoints in ../shared/models, the bundled example, random models."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from rwkv_state_hub.random_model import random_checkpoint, save_checkpoint

REPO = Path(__file__).resolve().parents[1]
SHARED_MODELS = REPO.parent / "shared" / "models"
EXAMPLE_MODEL = REPO / "rwkv_state_hub" / "examples" / "models" / "tiny-rwkv-7v0-834K.pth"
FIXTURES = REPO / "tests" / "fixtures"  # weather-5v2.safetensors: a trained state for the tiny RWKV-5.2

# name, architecture, text encoding of its byte vocabulary
REAL_MODELS = [
    ("tiny-rwkv-5v2-730K", "v5.2", "utf-8"),
    ("tiny-rwkv-6v0-1m", "v6", "utf-16-le"),
    ("tiny-rwkv-7v0-834K", "v7", "utf-8"),
]
ARCHS = ["v5.2", "v6", "v7"]
PROMPT = (
    "Once upon a time, in a quiet village by the sea, there lived an old fisherman who told "
    "stories about the stars to anyone who would listen."
)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Never touch the user's hash cache from a test."""
    monkeypatch.setenv("RWKV_STATE_HUB_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def real_model_path(name: str) -> Path:
    path = SHARED_MODELS / f"{name}.pth"
    if not path.exists():
        pytest.skip(f"{path} not found: the real checkpoints live in ../shared/models beside the repo")
    return path


def prompt_tokens(encoding: str = "utf-8", n: int = 80) -> list[int]:
    toks = list(PROMPT.encode(encoding))[:n]
    assert len(toks) >= 64
    return toks


@pytest.fixture(scope="session")
def random_models(tmp_path_factory) -> dict[str, Path]:
    """Random-weight checkpoints of realistic head size (64), 3 heads, 2 layers, saved in the official layout."""
    folder = tmp_path_factory.mktemp("random-models")
    paths = {}
    for i, arch in enumerate(ARCHS):
        path = folder / f"random-{arch}.pth"
        save_checkpoint(random_checkpoint(arch, n_layer=2, n_embd=192, head_size=64, vocab_size=320, seed=i), path)
        paths[arch] = path
    return paths


def random_state_like(spec, seed: int = 0, scale: float = 1.0, full: bool = False):
    from rwkv_state_hub import State

    g = torch.Generator().manual_seed(seed)
    wkv = torch.randn(spec.state_shape(), generator=g) * scale
    shift = torch.randn(spec.n_layer, 2, spec.n_embd, generator=g) if full else None
    return State(wkv, shift).with_model(spec)


# ---------------------------------------------------------------- the loopback Hub (tests/hub_server.py)

# the loopback Hub's users: alice and bob; BAD is a token it does not know
ALICE, BOB, BAD = "hf_alice_SECRET_token_0001", "hf_bob_SECRET_token_0002", "hf_wrong_SECRET_token_0003"


@pytest.fixture
def hub_env(tmp_path, monkeypatch):
    """A fresh huggingface_hub cache, no stored or environment token, Xet off, online; no sleeping between
    download retries (huggingface_hub waits 1 s before each resume)."""
    import time
    import types

    from huggingface_hub import constants, file_download
    from huggingface_hub.utils import _http as hf_http

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-stored-tokens"))
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    fast = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("_")})
    fast.sleep = lambda seconds: None
    monkeypatch.setattr(file_download, "time", fast)
    monkeypatch.setattr(hf_http, "time", fast)


@pytest.fixture
def hub_server(hub_env, monkeypatch):
    """The loopback Hub with users alice (ALICE) and bob (BOB), serving on HF_ENDPOINT for the test."""
    from hub_server import HubServer

    with HubServer(tokens={ALICE: "alice", BOB: "bob"}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server


# One intra-op thread: these tests run many tiny ops, where a second thread buys nothing, and two
# spinning OpenMP pools on a busy 2-core machine can slow a test a hundredfold.
torch.set_num_threads(1)


class LoopbackPostServer:
    """A real HTTP server on 127.0.0.1, in a thread, standing in for a server our client talks to. It records
    every POST as (path, content type, JSON body) and answers with `answer(path, body)`: a status and a reply,
    sent as JSON (bytes are sent as they are)."""

    def __init__(self):
        self.requests: list[tuple[str, str, dict]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                owner.requests.append((self.path, self.headers["Content-Type"], body))
                status, reply = owner.answer(self.path, body)
                payload = reply if isinstance(reply, bytes) else json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def answer(self, path: str, body: dict) -> tuple[int, object]:
        raise NotImplementedError

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(autouse=True)
def _python_dialect():
    """Every test starts with library messages in Python's words (`force=True`), whatever a CLI test before it did."""
    from rwkv_state_hub.errors import speak_cli

    speak_cli(False)
    yield
    speak_cli(False)

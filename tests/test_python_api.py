"""The Python API as the README and examples/python_api.py use it: RWKV.from_pretrained, train_state,
State.save_pretrained / from_pretrained / push_to_hub, model.generate / evaluate."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ALICE, FIXTURES

from rwkv_state_hub import RWKV, ModelMismatchError, State, load_state
from rwkv_state_hub.examples import example_model

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "python_api.py"
FOLDER_FILES = {"state.safetensors", "state.pth", "state.st", "rwkv-state.json", "README.md", "loss.png"}


@pytest.mark.slow
def test_the_example_script_trains_saves_reloads_compares_and_pushes(hub_server, tmp_path):
    """The tested example: from an unrelated folder, train a few steps in memory, save the folder, load it
    back, print the comparison, and push exactly the saved folder to the (loopback) Hub."""
    env = {**os.environ, "HF_ENDPOINT": hub_server.url, "HF_TOKEN": ALICE, "HF_HUB_DISABLE_XET": "1",
           "HF_HOME": str(tmp_path / "hf-home"), "RWKV_STATE_HUB_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "saved"
    result = subprocess.run([sys.executable, str(SCRIPT), "--steps", "4", "--out", str(out), "--push", "alice/weather"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "held-out loss per token: base model" in result.stdout
    assert "base model:" in result.stdout and "with the state:" in result.stdout
    assert {p.name for p in out.iterdir()} == FOLDER_FILES
    pushed = hub_server.files("alice/weather")
    assert FOLDER_FILES <= set(pushed)
    (tmp_path / "pushed.safetensors").write_bytes(pushed["state.safetensors"])
    local, remote = load_state(out / "state.safetensors"), load_state(tmp_path / "pushed.safetensors")
    assert torch.equal(local.wkv, remote.wkv) and torch.equal(local.shift, remote.shift)
    assert local.metadata == remote.metadata  # (not byte for byte: safetensors orders its header keys at random)
    assert pushed["loss.png"] == (out / "loss.png").read_bytes()
    assert not (tmp_path / "runs").exists(), "train_state wrote files although no out= was given"


@pytest.fixture(scope="module")
def tiny():
    return RWKV.from_pretrained(example_model("tiny-rwkv-5v2-730K.pth"))


def test_state_folder_round_trip_is_checked_against_the_model(tiny, tmp_path):
    state = State.from_pretrained(FIXTURES / "weather-5v2.safetensors", model=tiny)
    folder = state.save_pretrained(tmp_path / "weather", exports=("pth",))
    assert {p.name for p in folder.iterdir()} == {"state.safetensors", "state.pth", "rwkv-state.json", "README.md"}
    again = State.from_pretrained(folder, model=tiny)
    assert torch.equal(again.wkv, state.wkv) and torch.equal(again.shift, state.shift)
    assert again.base_model_sha256 == tiny.spec.sha256
    other = RWKV.from_pretrained(example_model("tiny-rwkv-7v0-834K.pth"))
    with pytest.raises(ModelMismatchError, match="but tiny-rwkv-7v0-834K has 12 layers x 1 heads x 64"):
        State.from_pretrained(folder, model=other)
    with pytest.raises(ModelMismatchError):
        other.generate("W", state=again)


def test_repr_is_one_line_without_tensors(tiny):
    state = State.from_pretrained(FIXTURES / "weather-5v2.safetensors")
    text = repr(state)
    assert "\n" not in text and "tensor(" not in text and len(text) < 300
    assert text.startswith("State(v5.2, 12 layers x 8 heads x 8, wkv + token shift, for tiny-rwkv-5v2-730K")


def test_generate_and_evaluate_use_the_state(tiny):
    state = State.from_pretrained(FIXTURES / "weather-5v2.safetensors", model=tiny)
    greedy = {"max_tokens": 24, "temperature": 0}
    assert tiny.generate("W", state=state, **greedy) == tiny.generate("W", state=state, **greedy)
    assert tiny.generate("W", state=state, **greedy) != tiny.generate("W", **greedy)
    records = [{"text": "WEATHER. Sunny, light winds from the west. END."}]
    with_state, base = tiny.evaluate(records, state=state), tiny.evaluate(records)
    assert with_state.n_tokens == base.n_tokens >= len(records[0]["text"]) - 1
    assert with_state.loss < base.loss

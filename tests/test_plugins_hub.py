"""End to end: a state pushed to the loopback Hub (tests/hub_server.py) with `hub.push`, then installed by
`rwkv-state runner install OWNER/REPO` and `rwkv-state ai00 install OWNER/REPO`, pulled through the real
huggingface_hub client (HF_HUB_DISABLE_XET=1, HF_ENDPOINT set by conftest's hub_server); and a state pushed for
another base model of the same shape, refused at install with nothing written."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import ALICE, random_state_like
from test_plugins_ai00 import CONFIG, ai00_loaded_states, ai00_model
from test_plugins_runner import runner_load_state

from rwkv_state_hub import push, read_spec
from rwkv_state_hub.cli import cli
from rwkv_state_hub.random_model import random_checkpoint, save_checkpoint

# huggingface_hub's own LFS upload passes a file object as data=, which httpx2 deprecates
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")


def invoke(*args) -> tuple[int, str]:
    r = CliRunner().invoke(cli, [str(a) for a in args])
    if r.exception and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r.exit_code, r.output


@pytest.fixture
def consumers(tmp_path, random_models) -> tuple[Path, Path, Path]:
    """A Runner folder and an Ai00 folder, both holding the random v6 model (a .pth, and Ai00's F16 .st)."""
    model = random_models["v6"]
    runner = tmp_path / "RWKV-Runner"
    (runner / "models").mkdir(parents=True)
    shutil.copy(model, runner / "models" / model.name)
    ai00 = tmp_path / "ai00"
    (ai00 / "assets/configs").mkdir(parents=True)
    (ai00 / "assets/models").mkdir(parents=True)
    ai00_model(model, ai00 / "assets/models/model-v6.st")
    (ai00 / "assets/configs/Config.toml").write_text(CONFIG.format(model="model-v6.st"))
    return model, runner, ai00


def state_downloads(hub, repo: str) -> list[str]:
    return [p for p in hub.requests("GET", f"/{repo}/resolve/") if p.endswith("/state.safetensors")]


def test_install_a_state_pulled_from_the_hub(hub_server, consumers):
    model, runner, ai00 = consumers
    state = random_state_like(read_spec(model), seed=7, scale=0.5)
    push(state, "alice/support-bot", token=ALICE)

    code, out = invoke("runner", "install", "alice/support-bot", "--runner-dir", runner)
    assert code == 0, out
    installed = runner / "state-models" / "support-bot--for-random-v6.pth"
    assert str(installed) in out
    wkv = runner_load_state(installed, runner / "models" / model.name)  # Runner's rules, then its transform
    for i in range(state.n_layer):
        assert torch.equal(wkv[i], state.wkv[i].transpose(1, 2))

    code, out = invoke("ai00", "install", "alice/support-bot", "--ai00-dir", ai00, "--model", model)
    assert code == 0, out
    loaded = ai00_loaded_states(ai00, state.n_layer, state.n_head, state.head_size)
    (sid, entry), = loaded.items()
    assert sid in out and entry["name"] == "support-bot" and entry["default"] is False
    for i, t in enumerate(entry["wkv"]):  # [H, K, V] in F16
        assert torch.equal(t, state.wkv[i].transpose(1, 2).half().float())
    assert (ai00 / "assets/models/support-bot--for-model-v6.st").is_file()

    # both went through the real client: the native file, downloaded once into huggingface_hub's cache
    assert len(state_downloads(hub_server, "alice/support-bot")) == 1


def test_a_state_pushed_for_another_model_is_refused_at_install(hub_server, consumers, tmp_path):
    model, runner, ai00 = consumers
    other = tmp_path / "other-v6.pth"  # the same architecture and dims as random-v6, other weights
    save_checkpoint(random_checkpoint("v6", n_layer=2, n_embd=192, head_size=64, vocab_size=320, seed=99), other)
    state = random_state_like(read_spec(other), seed=8, scale=0.5)
    push(state, "alice/other-bot", token=ALICE)
    config_before = (ai00 / "assets/configs/Config.toml").read_text()

    # Runner, model found by sha256: the pulled state records other-v6, which Runner does not have
    code, out = invoke("runner", "install", "alice/other-bot", "--runner-dir", runner)
    assert code == 1 and "made for other-v6" in out and "random-v6.pth" in out and "Traceback" not in out, out
    # Runner, --model named: refused from the manifest, before the state is downloaded again
    code, out = invoke("runner", "install", "alice/other-bot", "--runner-dir", runner, "--model", "random-v6")
    assert code == 1 and "made for other-v6" in out and "--force" in out, out
    assert not (runner / "state-models").exists()

    # Ai00 with the base model to check against
    code, out = invoke("ai00", "install", "alice/other-bot", "--ai00-dir", ai00, "--model", model)
    assert code == 1 and "made for other-v6" in out and "random-v6" in out and "--force" in out, out
    assert (ai00 / "assets/configs/Config.toml").read_text() == config_before
    assert sorted(p.name for p in (ai00 / "assets/models").iterdir()) == ["model-v6.st"]
    assert len(state_downloads(hub_server, "alice/other-bot")) == 1  # only the first Runner install fetched it

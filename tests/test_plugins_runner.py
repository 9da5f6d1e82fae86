"""RWKV Runner plugin: `install` finds the base model by sha256 (Runner's manifest or the file), refuses a state of
another model, and writes a file that passes an independent copy of Runner's loader rules and, after Runner's
transforms, equals our state (and gives our logits in the rwkv pip code Runner runs); `mount`/`unmount` against
a real HTTP server on 127.0.0.1 that checks each request."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import ARCHS, LoopbackPostServer, random_state_like
from pip_reference import pip_model

import rwkv_state_hub.files as files
from rwkv_state_hub import State, StateHubError, export_state, load_model, pip_state, read_spec
from rwkv_state_hub.cli import cli
from rwkv_state_hub.errors import ConsumerError, InvalidOptionError, ModelMismatchError
from rwkv_state_hub.formats import save_native
from rwkv_state_hub.plugins import rwkv_runner
from rwkv_state_hub.random_model import random_checkpoint, save_checkpoint

TOL = 1e-4


# ---------------------------------------------------------------- Runner's loader, independently


class RunnerRefused(Exception):
    pass


def runner_load_state(path: Path, model_path: Path) -> list[torch.Tensor]:
    """What RWKV Runner's `load_rwkv_state` does with a state file for a model, rule by rule: the state list's
    wkv entries, or RunnerRefused with Runner's own message."""
    if not (str(model_path).endswith(".pth") and str(path).endswith(".pth")):
        raise RunnerRefused("file format of the model or state model not supported")
    model = torch.load(model_path, map_location="cpu", weights_only=True)
    n_layer = 1 + max(int(k.split(".")[1]) for k in model if k.startswith("blocks."))
    n_embd = model["emb.weight"].shape[1]
    version = 7 if any("att.r_k" in k for k in model) else 6
    raw = torch.load(path, map_location="cpu", weights_only=True)
    first = next(iter(raw.values())).shape
    if len(raw) != n_layer or first[0] * first[1] != n_embd:
        raise RunnerRefused("state shape mismatch")
    out = []
    for i in range(n_layer):
        t = raw[f"blocks.{i}.att.time_state"]  # a KeyError here is Runner's HTTP 500
        out.append((t if version >= 7 else t.transpose(1, 2)).to(dtype=torch.float).contiguous())
    return out


# ---------------------------------------------------------------- fixtures


@pytest.fixture
def runner_dir(tmp_path, random_models) -> Path:
    """A Runner folder whose models/ holds the three random models (same dims, three architectures)."""
    root = tmp_path / "RWKV-Runner"
    (root / "models").mkdir(parents=True)
    for path in random_models.values():
        shutil.copy(path, root / "models" / path.name)
    return root


def state_for(model_path: Path, seed: int = 0) -> State:
    return random_state_like(read_spec(model_path), seed=seed, scale=0.5)


def saved(state: State, path: Path) -> Path:
    save_native(state, path)
    return path


# ---------------------------------------------------------------- install


@pytest.mark.parametrize("arch", ARCHS)
def test_install_passes_runners_rules_and_equals_our_state(runner_dir, tmp_path, random_models, arch):
    state = state_for(random_models[arch], seed=3)  # made for the original file; Runner has an identical copy
    done = rwkv_runner.install(saved(state, tmp_path / "my-style.safetensors"), runner_dir)
    model_path = runner_dir / "models" / f"random-{arch}.pth"
    assert done.path == runner_dir / "state-models" / f"my-style--for-random-{arch}.pth"
    assert done.model.name == f"random-{arch}" and not done.replaced and done.notes == []
    wkv = runner_load_state(done.path, model_path)
    for i in range(state.n_layer):
        ours = state.wkv[i] if arch == "v7" else state.wkv[i].transpose(1, 2)
        assert wkv[i].dtype == torch.float32 and torch.equal(wkv[i], ours)
        assert torch.equal(wkv[i], pip_state(state)[3 * i + 1])
    assert sorted(p.name for p in done.path.parent.iterdir()) == [done.path.name]  # no temporary file left


@pytest.mark.parametrize("arch", ARCHS)
def test_runners_state_gives_our_logits_in_the_pip_code_runner_runs(runner_dir, tmp_path, random_models, arch):
    """Runner's model is its copy of the rwkv pip package: its state list, built as Runner builds it (zero token
    shift, the wkv after Runner's transform), gives our model's logits."""
    model_path = runner_dir / "models" / f"random-{arch}.pth"
    state = state_for(model_path, seed=4)
    done = rwkv_runner.install(saved(state, tmp_path / "s.safetensors"), runner_dir)
    wkv = runner_load_state(done.path, model_path)
    C = state.n_embd
    runner_list = [t for w in wkv for t in (torch.zeros(C), w, torch.zeros(C))]
    tokens = torch.randint(0, 320, (24,), generator=torch.Generator().manual_seed(5)).tolist()
    ref, _ = pip_model(model_path, arch).forward(tokens, runner_list, full_output=True)
    model = load_model(model_path)
    with torch.no_grad():
        ours = model(torch.tensor([tokens]), state.to_recurrent())[0][0]
        zero = model(torch.tensor([tokens]))[0][0]
    assert (ours - ref.float()).abs().max().item() < TOL
    assert (ours - zero).abs().max().item() > 1e-2  # the state matters


def test_install_uses_runners_manifest_sha256_without_hashing(runner_dir, tmp_path, random_models, monkeypatch):
    model_path = runner_dir / "models" / "random-v6.pth"
    state = state_for(random_models["v6"])
    sha = state.base_model_sha256
    others = [{"name": p.name, "size": p.stat().st_size, "SHA256": "ab" * 32}
              for p in (runner_dir / "models").glob("*.pth") if p != model_path]
    manifest = {"version": "1.9.11", "models": others + [
        {"name": model_path.name, "size": model_path.stat().st_size, "SHA256": sha.upper()}]}
    (runner_dir / "cache.json").write_text(json.dumps(manifest))
    hashed = []
    real = files.sha256_file
    monkeypatch.setattr(rwkv_runner.runner, "sha256_file", lambda p, *a: hashed.append(Path(p).name) or real(p, *a))
    done = rwkv_runner.install(saved(state, tmp_path / "s.safetensors"), runner_dir)
    assert done.model.name == "random-v6" and done.model.sha256 == sha
    assert hashed == []


def test_manifest_entry_of_another_size_is_not_trusted(runner_dir, tmp_path, random_models):
    model_path = runner_dir / "models" / "random-v6.pth"
    state = state_for(random_models["v6"])
    lying = {"models": [{"name": model_path.name, "size": model_path.stat().st_size + 1,
                         "SHA256": state.base_model_sha256}]}
    (runner_dir / "cache.json").write_text(json.dumps(lying))
    model_path.write_bytes(model_path.read_bytes() + b"\0")  # a different file of that size now
    with pytest.raises(StateHubError, match="not among Runner's models"):
        rwkv_runner.install(saved(state, tmp_path / "s.safetensors"), runner_dir)


def test_refuses_a_state_made_for_another_model(runner_dir, tmp_path):
    other = tmp_path / "other-v6.pth"  # same architecture and dims as random-v6, other weights
    save_checkpoint(random_checkpoint("v6", n_layer=2, n_embd=192, head_size=64, vocab_size=320, seed=99), other)
    state = state_for(other)
    source = saved(state, tmp_path / "s.safetensors")
    with pytest.raises(ModelMismatchError) as e:
        rwkv_runner.install(source, runner_dir)
    msg = str(e.value)
    assert "\n" not in msg and "other-v6" in msg and "random-v6.pth" in msg and state.base_model_sha256[:12] in msg
    with pytest.raises(ModelMismatchError) as e:
        rwkv_runner.install(source, runner_dir, model="random-v6")
    assert "other-v6" in str(e.value) and "random-v6" in str(e.value) and "pass force=True" in str(e.value)
    flags = CliRunner().invoke(cli, ["runner", "install", str(source), "--runner-dir", str(runner_dir), "--model",
                                     "random-v6"])
    assert flags.exit_code == 1 and "(pass --force to use it anyway)" in flags.output
    assert not (runner_dir / "state-models").exists()
    forced = rwkv_runner.install(source, runner_dir, model="random-v6.pth", force=True)
    assert any("other-v6" in n for n in forced.notes)
    assert runner_load_state(forced.path, runner_dir / "models" / "random-v6.pth")


def test_force_never_installs_a_state_of_the_wrong_shape(runner_dir, tmp_path):
    wrong = tmp_path / "wide.pth"
    save_checkpoint(random_checkpoint("v6", n_layer=3, n_embd=128, head_size=64, vocab_size=320, seed=5), wrong)
    source = saved(state_for(wrong), tmp_path / "s.safetensors")
    with pytest.raises(StateHubError, match="3 layers x 2 heads x 64"):
        rwkv_runner.install(source, runner_dir, model="random-v6", force=True)


def test_a_state_without_its_base_model_is_matched_by_shape(runner_dir, tmp_path, random_models):
    state = state_for(random_models["v6"])
    bare = tmp_path / "peft-state.pth"  # a foreign .pth: no metadata at all
    torch.save({f"blocks.{i}.att.time_state": state.wkv[i].bfloat16() for i in range(2)}, bare)
    with pytest.raises(InvalidOptionError, match="3 of Runner's models.*; pass model to name one$"):
        rwkv_runner.install(bare, runner_dir)
    for p in (runner_dir / "models").glob("random-v[57]*.pth"):
        p.unlink()
    (runner_dir / "models" / "notes.pth").write_bytes(b"not a model")  # skipped, not fatal
    done = rwkv_runner.install(bare, runner_dir)
    assert done.model.name == "random-v6" and "shape alone" in done.notes[0]
    assert done.path.name == "peft-state--for-random-v6.pth"
    assert torch.equal(runner_load_state(done.path, random_models["v6"])[1], state.wkv[1].bfloat16().float().mT)


def test_install_replaces_and_keeps_a_custom_models_path(tmp_path, random_models):
    root = tmp_path / "runner"
    (root / "my-models").mkdir(parents=True)
    shutil.copy(random_models["v7"], root / "my-models" / "m.pth")
    (root / "config.json").write_text(json.dumps({"settings": {"customModelsPath": "./my-models"}}))
    state = state_for(root / "my-models" / "m.pth")
    source = saved(state, tmp_path / "s.safetensors")
    first = rwkv_runner.install(source, root)
    again = rwkv_runner.install(source, root)
    assert first.path == again.path == root / "state-models" / "s--for-m.pth" and again.replaced


def test_install_errors_are_one_line(tmp_path, runner_dir, random_models):
    source = saved(state_for(random_models["v6"]), tmp_path / "s.safetensors")
    cases = [
        (lambda: rwkv_runner.install(source, tmp_path / "nowhere"), ConsumerError, "^runner_dir=.*: no such folder"),
        (lambda: rwkv_runner.install(tmp_path / "missing.pth", runner_dir), InvalidOptionError, "no such file"),
        (lambda: rwkv_runner.install(source, runner_dir, model="nope"), InvalidOptionError, "^model='nope': no such"),
        (lambda: rwkv_runner.install(source, tmp_path), ConsumerError, "no models folder"),
    ]
    for call, error, words in cases:
        with pytest.raises(error, match=words) as e:
            call()
        assert "\n" not in str(e.value)


def test_runner_rules_catch_what_runner_refuses(random_models):
    spec = read_spec(random_models["v6"])
    good = {f"blocks.{i}.att.time_state": torch.zeros(3, 64, 64) for i in range(2)}
    assert rwkv_runner.runner_problems(good, spec) == []
    assert "exactly 2" in rwkv_runner.runner_problems({**good, "extra": torch.zeros(1)}, spec)[0]
    assert "shape[0] * shape[1]" in rwkv_runner.runner_problems(
        {k: torch.zeros(64, 3, 64) for k in good} | {"blocks.0.att.time_state": torch.zeros(2, 64, 64)}, spec)[0]
    assert "HTTP 500" in rwkv_runner.runner_problems({"blocks.0.att.time_state": torch.zeros(3, 64, 64),
                                                       "blocks.9.att.time_state": torch.zeros(3, 64, 64)}, spec)[0]


def test_install_command(runner_dir, tmp_path, random_models):
    source = saved(state_for(random_models["v5.2"]), tmp_path / "chat.safetensors")
    result = CliRunner().invoke(cli, ["runner", "install", str(source), "--runner-dir", str(runner_dir)])
    assert result.exit_code == 0, result.output
    assert "chat--for-random-v5.2.pth" in result.output and "random-v5.2" in result.output
    bad = CliRunner().invoke(cli, ["runner", "install", str(source), "--runner-dir", str(runner_dir),
                                   "--model", "random-v6"])
    assert bad.exit_code == 1 and bad.output.startswith("Error: ") and "Traceback" not in bad.output


# ---------------------------------------------------------------- mount / unmount against a real HTTP server


class FakeRunner(LoopbackPostServer):
    """Stands in for Runner's backend: answers what Runner's /update-config answers (FastAPI: "success", or
    {"detail": ...} with the status)."""

    def __init__(self, status: int = 200, detail: str | None = None):
        super().__init__()
        self.status, self.detail = status, detail

    def answer(self, path: str, body: dict) -> tuple[int, object]:
        return self.status, "success" if self.status == 200 else {"detail": self.detail}


def installed(runner_dir, tmp_path, random_models) -> Path:
    return rwkv_runner.install(saved(state_for(random_models["v6"]), tmp_path / "s.safetensors"), runner_dir).path


def test_mount_and_unmount_send_runners_request(runner_dir, tmp_path, random_models):
    path = installed(runner_dir, tmp_path, random_models)
    with FakeRunner() as server:
        assert rwkv_runner.mount(path, server.url + "/") == str(path.resolve())
        assert rwkv_runner.mount("state-models/other.pth", server.url) == "state-models/other.pth"  # Runner's view
        rwkv_runner.unmount(server.url)
    assert server.requests == [
        ("/update-config", "application/json", {"state": str(path.resolve())}),
        ("/update-config", "application/json", {"state": "state-models/other.pth"}),
        ("/update-config", "application/json", {"state": ""}),
    ]


def test_mount_shows_runners_refusal_plainly(runner_dir, tmp_path, random_models):
    path = installed(runner_dir, tmp_path, random_models)
    with FakeRunner(400, "state shape mismatch") as server:
        result = CliRunner().invoke(cli, ["runner", "mount", str(path), "--url", server.url])
    assert result.exit_code == 1 and "Traceback" not in result.output
    want = f"Error: RWKV Runner at {server.url}/update-config answered HTTP 400: state shape mismatch"
    assert result.output.strip() == want


def test_mount_refuses_locally_what_runner_cannot_read(tmp_path, random_models):
    state = state_for(random_models["v6"])
    native = saved(state, tmp_path / "s.safetensors")
    merged = tmp_path / "merged.pth"
    export_state(state, merged, "merged", base_model=random_models["v6"])
    with FakeRunner() as server:
        with pytest.raises(StateHubError, match="only .pth"):
            rwkv_runner.mount(native, server.url)
        with pytest.raises(StateHubError, match="plain state .pth"):
            rwkv_runner.mount(merged, server.url)
    assert server.requests == []


def test_mount_without_a_runner_says_so(runner_dir, tmp_path, random_models):
    path = installed(runner_dir, tmp_path, random_models)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    result = CliRunner().invoke(cli, ["runner", "unmount", "--url", f"http://127.0.0.1:{port}", "--timeout", "5"])
    assert result.exit_code == 1 and "cannot reach RWKV Runner" in result.output and "Traceback" not in result.output
    with pytest.raises(StateHubError, match="cannot reach"):
        rwkv_runner.mount(path, f"http://127.0.0.1:{port}", timeout=5)


# ---------------------------------------------------------------- a Hub repo instead of a file


def test_install_from_a_hub_repo_id(runner_dir, tmp_path, random_models, monkeypatch):
    """The repo path of resolve_state: hub.pull is replaced (the real pull is tested in test_hub.py); install
    names the file after the repo and finds the model by the pulled state's sha256."""
    from rwkv_state_hub import hub

    state = state_for(random_models["v7"], seed=8)
    pulled = saved(state, tmp_path / "state.safetensors")
    calls = []
    monkeypatch.setattr(hub, "pull", lambda repo, model=None, **kw: calls.append((repo, model, kw)) or pulled)
    done = rwkv_runner.install("someone/support-bot@v2", runner_dir)
    assert done.path.name == "support-bot--for-random-v7.pth" and done.model.name == "random-v7"
    assert calls == [("someone/support-bot@v2", None, {"force": False})]
    assert torch.equal(runner_load_state(done.path, random_models["v7"])[1], state.wkv[1])
    done = rwkv_runner.install("someone/support-bot", runner_dir, model="random-v7", force=True)
    assert calls[1][1].name == "random-v7" and calls[1][2] == {"force": True}  # pull checks the named model too

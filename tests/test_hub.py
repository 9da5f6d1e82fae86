"""push / pull / search against a loopback Hub (tests/hub_server.py), driven by the real huggingface_hub client
with HF_HUB_DISABLE_XET=1: through the Python API and through the `rwkv-state` command."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import ALICE, BAD, BOB, REPO
from hub_server import HubServer
from huggingface_hub import constants
from PIL import Image

from rwkv_state_hub import State, StateHubError, load_state, pull, push, read_spec, search
from rwkv_state_hub.cli import cli
from rwkv_state_hub.files import sha256_file
from rwkv_state_hub.formats import save_native
from rwkv_state_hub.hub import is_repo_id, model_card, model_identity, pull_state, resolve_model
from rwkv_state_hub.hub_card import MANIFEST, hash_tag

V5_MODEL = REPO / "rwkv_state_hub" / "examples" / "models" / "tiny-rwkv-5v2-730K.pth"
V7_MODEL = REPO / "rwkv_state_hub" / "examples" / "models" / "tiny-rwkv-7v0-834K.pth"
BASE_REPO = "BlinkDL/tiny-models"
# huggingface_hub's own LFS upload passes a file object as data=, which httpx2 deprecates
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")
HF_V5 = f"hf://{BASE_REPO}/{V5_MODEL.name}"


@pytest.fixture(autouse=True)
def _hub_env(hub_env):
    """Every test here runs with huggingface_hub isolated (conftest.hub_env), a Hub or not."""


@pytest.fixture
def hub(hub_server):
    hub_server.add_file(BASE_REPO, V5_MODEL.name, V5_MODEL.read_bytes())
    return hub_server


@pytest.fixture(scope="module")
def spec():
    return read_spec(V5_MODEL)


@pytest.fixture
def state_file(tmp_path, spec) -> Path:
    """A trained-looking native state for the bundled v5.2 model, with its loss plot beside it."""
    g = torch.Generator().manual_seed(0)
    training = {"method": "state-tuning", "steps": 120, "tokens_seen": 61440, "best_val_loss": 2.6372,
                "hyperparameters": {"lr_init": 1.0, "ctx_len": 512}}
    state = State(torch.randn(spec.state_shape(), generator=g), None, {"training": training}).with_model(spec)
    folder = tmp_path / "run"
    folder.mkdir()
    Image.new("RGB", (8, 8), "white").save(folder / "loss.png")
    return save_native(state, folder / "state.safetensors")


def invoke(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(cli, [str(a) for a in args])
    if r.exception and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r.exit_code, r.output


def pushed(hub, state_file, repo="alice/weather", *extra) -> str:
    code, out = invoke("push", state_file, repo, "--token", ALICE, "--endpoint", hub.url, *extra)
    assert code == 0, out
    return repo


# ---------------------------------------------------------------- the round trip


def test_push_search_pull_round_trip(hub, state_file, spec, tmp_path):
    repo = pushed(hub, state_file)
    files = hub.files(repo)
    assert {"state.safetensors", "state.pth", "state.st", "loss.png", MANIFEST, "README.md"} <= set(files)
    assert len({oid for oid in hub.repos[repo].commits}) == 2  # the repo's creation, then one commit
    manifest = json.loads(files[MANIFEST])
    assert manifest["base_model_sha256"] == spec.sha256 and manifest["arch"] == "v5.2"
    assert (manifest["n_layer"], manifest["n_head"], manifest["head_size"]) == (12, 8, 8)
    assert manifest["base_model"]["size"] == V5_MODEL.stat().st_size
    for entry in manifest["files"].values():
        data = files[entry["path"]]
        assert (hashlib.sha256(data).hexdigest(), len(data)) == (entry["sha256"], entry["size"])
    card = files["README.md"].decode()
    for needle in ("- rwkv\n", "- rwkv-state\n", "- rwkv-v5\n", f"- {hash_tag(spec.sha256)}\n", "| steps | 120 |",
                   "![training and validation loss](loss.png)", "pip_state(state)", "state-models/weather.pth",
                   "[[state]]", "lr_init=1.0"):
        assert needle in card, needle
    assert files["state.safetensors"] == state_file.read_bytes()  # a labelled native file goes up as it is

    code, out = invoke("search", "--sha256", spec.sha256.upper())
    assert code == 0 and repo in out and "12 layers x 8 heads x 8" in out and "v5.2" in out, out
    assert [r.repo_id for r in search(V5_MODEL)] == [repo]
    assert search(sha256="0" * 64) == []

    out_file = tmp_path / "pulled" / "weather.safetensors"
    code, out = invoke("pull", repo, "--model", V5_MODEL, "-o", out_file)
    assert code == 0 and out.strip().endswith(str(out_file)), out
    assert out_file.read_bytes() == state_file.read_bytes()
    pth = pull(repo, V5_MODEL, fmt="pth", output=tmp_path)
    assert pth == tmp_path / "state.pth" and torch.equal(load_state(pth).wkv, load_state(state_file).wkv)
    ai00 = pull(repo, spec, fmt="ai00")  # a ModelSpec works too; no output: the verified file in the cache
    assert torch.allclose(load_state(ai00).wkv, load_state(state_file).wkv, atol=1e-2, rtol=1e-3)
    assert "# weather" in model_card(repo)


def test_hf_model_sha256_comes_from_lfs_metadata_without_download(hub, state_file, spec, tmp_path):
    repo = pushed(hub, state_file)
    base = model_identity(HF_V5)
    assert (base.sha256, base.size, base.repo, base.file) == (spec.sha256, V5_MODEL.stat().st_size, BASE_REPO,
                                                              V5_MODEL.name)
    code, out = invoke("search", "--model", HF_V5)
    assert code == 0 and repo in out, out
    code, out = invoke("pull", repo, "--model", HF_V5, "-o", tmp_path / "s.safetensors")
    assert code == 0, out
    assert hub.requests("POST", "/paths-info/")
    assert hub.requests("GET", V5_MODEL.name) == [] and hub.requests("HEAD", V5_MODEL.name) == []


def test_push_with_a_hub_model_records_its_repo(hub, state_file, spec):
    repo = pushed(hub, state_file, "alice/labelled", "--model", HF_V5, "--exports", "")
    files = hub.files(repo)
    assert "state.pth" not in files and "state.st" not in files
    manifest = json.loads(files[MANIFEST])
    assert manifest["base_model"] == {"sha256": spec.sha256, "name": V5_MODEL.stem, "size": V5_MODEL.stat().st_size,
                                      "repo": BASE_REPO, "file": V5_MODEL.name}
    assert f"base_model: {BASE_REPO}\n" in files["README.md"].decode()
    with pytest.raises(StateHubError, match="no pth file in this repo \\(it has: safetensors\\)"):
        pull(repo, HF_V5, fmt="pth")
    relabelled = load_state(pull(repo))  # the native file now records where its base model lives
    assert (relabelled.metadata["base_model_repo"], relabelled.metadata["base_model_file"]) == (BASE_REPO,
                                                                                               V5_MODEL.name)
    again = push(relabelled, "alice/again", model=V5_MODEL, token=ALICE)  # a local copy of the same model
    assert (again.base_model.repo, again.base_model.file) == (BASE_REPO, V5_MODEL.name)
    assert hub.requests("GET", V5_MODEL.name) == []


def test_hf_model_works_wherever_the_cli_takes_a_model(hub, state_file):
    code, out = invoke("check", state_file, "--model", HF_V5)
    assert code == 0 and out.startswith("ok:"), out
    assert len(hub.requests("GET", V5_MODEL.name)) == 1  # downloaded once, into huggingface_hub's cache
    code, out = invoke("check", state_file, "--model", f"hf://{BASE_REPO}/missing.pth")
    assert code != 0 and "missing.pth is not in the repo" in out and "Traceback" not in out, out


def test_an_hf_model_in_a_config_file_and_for_the_demo(hub, tmp_path):
    """hub.resolve_model, the one place that resolves hf://, serves a --config file's model and the demo too."""
    from rwkv_state_hub.demo import DemoEngine

    data = tmp_path / "one.jsonl"
    data.write_text('{"text": "WEATHER. Oslo: snowy."}\n')
    config = tmp_path / "run.toml"
    config.write_text(f"model = {json.dumps(HF_V5)}\ndata = [{json.dumps(str(data))}]\n"
                      f"out = {json.dumps(str(tmp_path / 'run'))}\n")
    code, out = invoke("train", "--config", config, "--dry-run")
    assert code == 0 and "(v5.2, 12 layers x 8 heads x 8, vocab 256)" in out, out
    engine = DemoEngine(HF_V5)
    assert engine.spec.sha256 == sha256_file(V5_MODEL) and engine.model_path != V5_MODEL
    assert len(hub.requests("GET", V5_MODEL.name)) == 1  # one download, into huggingface_hub's cache


# ---------------------------------------------------------------- the base model must match


@pytest.fixture
def fine_tune(tmp_path) -> Path:
    """The bundled model with one weight nudged: same shape, another sha256 (a fine-tune of it)."""
    sd = torch.load(V5_MODEL, map_location="cpu", weights_only=True)
    sd["emb.weight"] = sd["emb.weight"].clone()
    sd["emb.weight"][0, 0] += 1.0
    path = tmp_path / "tiny-finetune.pth"
    torch.save(sd, path)
    return path


def test_mismatch_refused_with_one_line_and_force_overrides(hub, state_file, spec, fine_tune, tmp_path):
    repo = pushed(hub, state_file)
    before = len(hub.requests("GET", "state.safetensors"))
    out_file = tmp_path / "s.safetensors"
    code, out = invoke("pull", repo, "--model", fine_tune, "-o", out_file)
    assert code == 1 and not out_file.exists()
    line = out.strip()
    assert "\n" not in line and "made for tiny-rwkv-5v2-730K" in line and "tiny-finetune" in line, out
    assert spec.sha256[:12] in line and sha256_file(fine_tune)[:12] in line and "--force" in line
    assert len(hub.requests("GET", "state.safetensors")) == before  # refused before downloading the state

    code, out = invoke("pull", repo, "--model", fine_tune, "-o", out_file, "--force")
    assert code == 0 and "warning: " in out and out_file.read_bytes() == state_file.read_bytes(), out

    code, out = invoke("pull", repo, "--model", V7_MODEL, "--force")  # another shape: force cannot help
    assert code == 1 and "12 layers x 8 heads x 8" in out, out

    code, out = invoke("push", state_file, "alice/other", "--model", fine_tune, "--token", ALICE)
    assert code == 1 and "made for tiny-rwkv-5v2-730K" in out and "alice/other" not in hub.repos, out
    code, out = invoke("push", state_file, "alice/other", "--model", fine_tune, "--token", ALICE, "--force")
    assert code == 0 and "warning: " in out, out
    assert json.loads(hub.files("alice/other")[MANIFEST])["base_model_sha256"] == sha256_file(fine_tune)


def test_a_state_file_that_contradicts_its_manifest_is_refused(hub, state_file, spec, fine_tune, tmp_path):
    """The manifest is edited to claim another base model than the one the state file itself records: pull
    refuses, whatever model it is given, and writes nothing."""
    repo = pushed(hub, state_file)
    tree = hub.files(repo)
    manifest = json.loads(tree[MANIFEST])
    manifest["base_model_sha256"] = sha256_file(fine_tune)
    tree[MANIFEST] = json.dumps(manifest).encode()
    out_file = tmp_path / "s.safetensors"
    for model in (fine_tune, None):
        with pytest.raises(StateHubError, match=f"records base model sha256 {spec.sha256[:12]}.*inconsistent"):
            pull(repo, model, output=out_file, force=True)
    assert not out_file.exists()


def test_damaged_manifest_entries_and_gated_repos_say_so(tmp_path):
    import httpx2
    from huggingface_hub.errors import GatedRepoError

    from rwkv_state_hub.hub import _hub_errors
    from rwkv_state_hub.hub_card import read_manifest

    good = {"format": "rwkv-state-hub/state-repo", "format_version": 1, "base_model_sha256": "ab" * 32}
    for path in ("..", ".", "", "a/b", "a\\b", MANIFEST):
        entry = {"path": path, "size": 1, "sha256": "cd" * 32}
        (tmp_path / "m.json").write_text(json.dumps({**good, "files": {"native": entry}}))
        with pytest.raises(StateHubError, match="damaged entry for the native file"):
            read_manifest(tmp_path / "m.json", "x/y")
    response = httpx2.Response(403, request=httpx2.Request("GET", "http://127.0.0.1/x"))
    with pytest.raises(StateHubError, match="x/y: the repo is gated: request access"):
        with _hub_errors("x/y", None):
            raise GatedRepoError("Access to model x/y is restricted", response=response)


# ---------------------------------------------------------------- damaged and interrupted downloads


def test_corrupted_download_detected_nothing_written_cache_not_poisoned(hub, state_file, tmp_path, monkeypatch):
    repo = pushed(hub, state_file)
    hub.corrupt.add((repo, "state.safetensors"))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(StateHubError, match="does not match the manifest.*removed from the cache"):
        pull(repo, V5_MODEL, output=out_dir / "s.safetensors")
    assert list(out_dir.iterdir()) == []
    blobs = Path(constants.HF_HUB_CACHE) / "models--alice--weather" / "blobs"
    assert hashlib.sha256(state_file.read_bytes()).hexdigest() not in [p.name for p in blobs.iterdir()]
    hub.corrupt = {(repo, MANIFEST)}  # the manifest too: checked against its git blob sha1 (its ETag)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "fresh-cache"))
    with pytest.raises(StateHubError, match=f"{MANIFEST}: the download does not match its ETag"):
        pull(repo, V5_MODEL, output=out_dir / "s.safetensors")
    assert list(out_dir.iterdir()) == []
    hub.corrupt.clear()
    assert pull(repo, V5_MODEL, output=out_dir / "s.safetensors").read_bytes() == state_file.read_bytes()


def test_interrupted_download_is_resumed(hub, state_file, tmp_path):
    repo = pushed(hub, state_file)
    hub.cuts[(repo, "state.safetensors")] = 1  # a small file: huggingface_hub starts it again
    assert pull(repo, V5_MODEL, output=tmp_path / "s.safetensors").read_bytes() == state_file.read_bytes()
    assert len(hub.requests("GET", "/state.safetensors")) == 2

    # a 25 MB state (L24 H64 N64), cut after half: huggingface_hub resumes from its last 10 MiB chunk
    big = State(torch.rand(24, 64, 64, 64), None, {"arch": "v7", "base_model_sha256": "ab" * 32})
    push(big, "alice/big", exports=[], token=ALICE)
    hub.cuts[("alice/big", "state.safetensors")] = 1
    out = pull("alice/big", output=tmp_path / "big.safetensors")
    assert torch.equal(load_state(out).wkv, big.wkv)
    ranges = [h.get("Range") for m, p, h in hub.log if m == "GET" and p.startswith("/alice/big/resolve/")
              and p.endswith("/state.safetensors")]
    assert ranges == [None, f"bytes={10 << 20}-"]


def test_download_cut_every_time_fails_cleanly_then_resumes(hub, state_file, tmp_path):
    repo = pushed(hub, state_file)
    hub.cuts[(repo, "state.safetensors")] = 100
    target = tmp_path / "s.safetensors"
    with pytest.raises(StateHubError, match="run again"):
        pull(repo, V5_MODEL, output=target)
    assert not target.exists()
    cache = Path(constants.HF_HUB_CACHE) / "models--alice--weather"
    assert not [p for p in cache.rglob("*") if "state.safetensors" in p.name or p.suffix == ".incomplete"]
    hub.cuts.clear()
    assert pull(repo, V5_MODEL, output=target).read_bytes() == state_file.read_bytes()


# ---------------------------------------------------------------- auth, privacy, errors that say what to do


def test_bad_token_clear_message_and_token_never_printed(hub, state_file, tmp_path, caplog):
    code, out = invoke("push", state_file, "alice/weather", "--token", BAD)
    assert code == 1 and "refused the token" in out and "hf auth login" in out and BAD not in out, out
    repo = pushed(hub, state_file)
    code, out = invoke("pull", repo, "--token", BAD, "--model", V5_MODEL)
    assert code == 1 and "refused the token" in out and BAD not in out, out
    code, out = invoke("search", "--sha256", "a" * 64, "--token", BAD)
    assert code == 1 and "refused the token" in out and BAD not in out, out
    for data in hub.files(repo).values():  # nothing we wrote carries the token we pushed with
        assert ALICE.encode() not in data
    assert BAD not in caplog.text and ALICE not in caplog.text


@pytest.mark.slow
def test_command_in_a_real_process_takes_token_and_endpoint_from_the_environment(hub, state_file, tmp_path):
    """HF_TOKEN / HF_ENDPOINT / HF_HUB_DISABLE_XET as a user sets them; a bad token: one line, no traceback."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf-home"), "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1",
           "HF_TOKEN": ALICE}
    cmd = [sys.executable, "-m", "rwkv_state_hub.cli"]
    r = subprocess.run([*cmd, "push", str(state_file), "alice/env"], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and "pushed" in r.stdout and ALICE not in r.stdout + r.stderr, r.stderr
    r = subprocess.run([*cmd, "pull", "alice/env", "--model", str(V5_MODEL)], env={**env, "HF_TOKEN": BAD},
                       capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "refused the token" in r.stderr, r.stderr
    assert BAD not in r.stdout + r.stderr and "Traceback" not in r.stderr


def test_push_needs_a_token_and_write_access(hub, state_file):
    code, out = invoke("push", state_file, "alice/weather")
    assert code == 1 and "needs a Hugging Face token" in out, out
    code, out = invoke("push", state_file, "alice/weather", "--token", BOB)
    assert code == 1 and "403" in out and "write access" in out and BOB not in out, out


def test_private_repo_is_invisible_without_its_owners_token(hub, state_file, spec, monkeypatch):
    repo = pushed(hub, state_file, "alice/secret", "--private")
    assert hub.repos[repo].private
    for token in (None, BOB):
        with pytest.raises(StateHubError, match="no such repo on the Hub, or it is private"):
            pull(repo, V5_MODEL, token=token)
        assert search(sha256=spec.sha256, token=token) == []
    assert [r.repo_id for r in search(sha256=spec.sha256, token=ALICE)] == [repo]
    monkeypatch.setenv("HF_TOKEN", ALICE)  # the huggingface_hub way, without --token
    code, out = invoke("pull", repo, "--model", V5_MODEL)
    assert code == 0 and ALICE not in out, out


def test_not_a_state_repo_and_missing_repo(hub):
    hub.add_file("someone/plain-model", "README.md", b"# just a model\n")
    with pytest.raises(StateHubError, match="not an rwkv-state repo"):
        pull("someone/plain-model")
    code, out = invoke("pull", "nobody/nothing")
    assert code == 1 and "no such repo on the Hub" in out and "hf auth login" in out, out


def test_network_failure_says_so(hub, state_file, tmp_path, monkeypatch):
    with HubServer() as gone:
        dead = gone.url
    monkeypatch.setenv("HF_ENDPOINT", dead)
    code, out = invoke("pull", "alice/weather", "-o", tmp_path / "s.safetensors")
    assert code == 1 and "cannot reach the Hub" in out and not (tmp_path / "s.safetensors").exists(), out
    code, out = invoke("search", "--sha256", "a" * 64)
    assert code == 1 and "network failure" in out, out
    code, out = invoke("push", state_file, "alice/weather", "--token", ALICE)
    assert code == 1 and "network failure" in out and ALICE not in out, out


def test_offline_mode_pulls_from_the_cache(hub, state_file, tmp_path, monkeypatch):
    repo = pushed(hub, state_file)
    first = pull(repo, V5_MODEL)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    n = len(hub.log)
    again = pull(repo, V5_MODEL, output=tmp_path / "offline.safetensors")
    assert again.read_bytes() == first.read_bytes() == state_file.read_bytes() and len(hub.log) == n
    with pytest.raises(StateHubError, match="HF_HUB_OFFLINE is set"):
        pull(repo, V5_MODEL, fmt="pth")
    with pytest.raises(StateHubError, match="HF_HUB_OFFLINE is set"):  # its sha256 needs the Hub or the file
        pull(repo, HF_V5)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    resolve_model(HF_V5)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    n = len(hub.log)
    assert pull(repo, HF_V5).read_bytes() == state_file.read_bytes() and len(hub.log) == n


# ---------------------------------------------------------------- smaller things


def test_revision_branch(hub, state_file, tmp_path):
    repo = pushed(hub, state_file, "alice/weather", "--revision", "dev")
    assert MANIFEST not in hub.files(repo) and MANIFEST in hub.files(repo, "dev")
    assert pull_state(f"{repo}@dev", V5_MODEL).commit == hub.repos[repo].branches["dev"]
    assert pull(repo, V5_MODEL, revision="dev").read_bytes() == state_file.read_bytes()


def test_push_needs_to_know_the_base_model(hub, state_file, spec, tmp_path):
    bare = tmp_path / "bare.pth"
    torch.save({f"blocks.{i}.att.time_state": load_state(state_file).wkv[i] for i in range(spec.n_layer)}, bare)
    with pytest.raises(StateHubError, match="does not record its base model"):
        push(bare, "alice/bare", token=ALICE)
    result = push(bare, "alice/bare", model=V5_MODEL, token=ALICE)
    assert result.base_model.sha256 == spec.sha256
    assert load_state(pull("alice/bare", V5_MODEL)).base_model_sha256 == spec.sha256
    with pytest.raises(StateHubError, match="unknown format 'merged'"):
        push(state_file, "alice/x", exports=["merged"], token=ALICE)


def test_is_repo_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "state.safetensors").write_bytes(b"x")
    assert is_repo_id("alice/weather") and is_repo_id("alice/weather@dev") and is_repo_id("Org-1/my.state_v2")
    assert not is_repo_id("runs/state.safetensors") and not is_repo_id("weather")
    assert not is_repo_id("hf://alice/weather/x.pth") and not is_repo_id("a/b/c")

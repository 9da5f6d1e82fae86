"""Ai00 plugin: `install` writes an F16 [H, K, V] safetensors state that an independent reader applying Ai00's
rules (header parsed by hand, no safetensors library) takes, and adds a `[[state]]` entry to Config.toml keeping
every comment and line of the user's file; duplicates and states that do not fit Ai00's model are refused with
nothing written; the chat helper sends the per-request `state` to a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import json
import shutil
import struct
import tomllib
import uuid
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
import safetensors.torch
import torch
from click.testing import CliRunner
from conftest import ARCHS, LoopbackPostServer, random_state_like
from safetensors.torch import save_file
from web_rwkv_fixture import as_web_rwkv

from rwkv_state_hub import State, StateHubError, read_spec
from rwkv_state_hub.cli import cli
from rwkv_state_hub.errors import ConsumerError, ModelMismatchError
from rwkv_state_hub.formats import save_native
from rwkv_state_hub.plugins import ai00
from rwkv_state_hub.random_model import random_checkpoint, save_checkpoint

CONFIG = """\
# my Ai00 setup: keep these notes
[model]
embed_device = "Cpu"   # where the embedding lives
max_batch = 8
name = "{model}"   # the model file
path = "assets/models"    # models folder
precision = "Fp16"
quant = 0
stop = ["\\n\\n"]

# [[state]] # an example, commented out
# id = "fd7a60ed-7807-449f-8256-bccae3246222"
# path = "example.state"

[tokenizer]
path = "assets/tokenizer/rwkv_vocab_v20230424.json" # tokenizer

[listen]
ip = "0.0.0.0"   # all interfaces
port = 65530

[[listen.app_keys]] # keys
app_id = "admin"
secret_key = "ai00_is_good"
"""

EXISTING_STATE = """
[[state]] # one I added by hand
id = "6a9c60a4-0f4c-40b1-a31f-987f73e20315"
name = "by-hand"
path = "by-hand.st"
"""


# ---------------------------------------------------------------- Ai00's reader, independently


def read_st(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def ai00_loaded_states(ai00_dir: Path, n_layer: int, n_head: int, head_size: int) -> dict[str, dict]:
    """What Ai00 loads from its Config.toml, rule by rule: id -> name, default, the [H, K, V] tensors (float32)."""
    config = tomllib.loads((ai00_dir / "assets/configs/Config.toml").read_text())
    folder = ai00_dir / config["model"].get("path", "assets/models")
    out = {}
    for entry in config.get("state", []):
        rel = PurePosixPath(entry["path"])
        assert ".." not in rel.parts and not rel.is_absolute(), entry  # build_path: "cannot have .. in names"
        sid = str(uuid.UUID(entry["id"]))
        header, blob = read_st(folder / rel)  # a missing / broken file fails the whole model reload
        layers = []
        for i in range(n_layer):
            t = header[f"blocks.{i}.att.time_state"]
            assert t["dtype"] == "F16", "data type mismatch"
            assert t["shape"] == [n_head, head_size, head_size]
            begin, end = t["data_offsets"]
            layers.append(torch.from_numpy(np.frombuffer(blob[begin:end], dtype="<f2").astype(np.float32))
                          .reshape(n_head, head_size, head_size))
        out[sid] = {"name": entry.get("name") or rel.name, "default": entry.get("default", False), "wkv": layers}
    return out


# ---------------------------------------------------------------- fixtures


def ai00_model(pth: Path, target: Path) -> Path:
    """Ai00's model file as web-rwkv's converter writes it from an official (bf16) checkpoint (the random
    models are fp32: rounded to bf16 first, as the official ones are)."""
    sd = torch.load(pth, map_location="cpu", weights_only=True)
    return as_web_rwkv({k: v.to(torch.bfloat16) for k, v in sd.items()}, target)


@pytest.fixture
def make_ai00(tmp_path, random_models):
    def make(arch: str, extra: str = "") -> Path:
        root = tmp_path / f"ai00-{arch}"
        (root / "assets/configs").mkdir(parents=True)
        (root / "assets/models").mkdir(parents=True)
        ai00_model(random_models[arch], root / f"assets/models/model-{arch}.st")
        text = CONFIG.format(model=f"model-{arch}.st")
        if extra:
            text = text.replace("[tokenizer]", extra.lstrip("\n") + "\n[tokenizer]")
        (root / "assets/configs/Config.toml").write_text(text)
        return root
    return make


def native(tmp_path: Path, spec_path: Path, name: str = "my-style", seed: int = 0) -> tuple[State, Path]:
    state = random_state_like(read_spec(spec_path), seed=seed, scale=0.5)
    path = tmp_path / f"{name}.safetensors"
    save_native(state, path)
    return state, path


def config_text(root: Path) -> str:
    return (root / "assets/configs/Config.toml").read_text()


# ---------------------------------------------------------------- install


@pytest.mark.parametrize("arch", ARCHS)
def test_install_writes_what_ai00_reads(make_ai00, tmp_path, random_models, arch):
    root = make_ai00(arch)
    before = config_text(root)
    state, source = native(tmp_path, random_models[arch])
    done = ai00.install(source, root)
    assert done.path == root / f"assets/models/my-style--for-model-{arch}.st"
    (note,) = done.notes  # Ai00's .st is the state's base model in another file: confirmed by the fingerprint
    assert f"model-{arch} holds the same weights in another file" in note
    after = config_text(root)
    assert after.startswith(before)  # every comment, alignment and line of the user's file, untouched
    assert after[len(before):].strip().splitlines() == [
        "[[state]]", f'path = "my-style--for-model-{arch}.st"', f'id = "{done.id}"', 'name = "my-style"',
        "default = false"]
    loaded = ai00_loaded_states(root, state.n_layer, state.n_head, state.head_size)
    assert list(loaded) == [done.id] and loaded[done.id]["name"] == "my-style" and loaded[done.id]["default"] is False
    for i, t in enumerate(loaded[done.id]["wkv"]):  # [H, K, V]: the transpose of ours, in F16
        assert torch.equal(t, state.wkv[i].transpose(1, 2).half().float())
        assert (t - state.wkv[i].transpose(1, 2)).abs().max().item() < 2e-3
        assert torch.equal(ai00.wkv_as_ai00_reads_it(t.half()), state.wkv[i].half().float())
    assert sorted(p.name for p in (root / "assets/models").iterdir()) == sorted([f"model-{arch}.st", done.path.name])
    assert sorted(p.name for p in (root / "assets/configs").iterdir()) == ["Config.toml"]


def test_install_appends_to_the_users_state_tables(make_ai00, tmp_path, random_models):
    root = make_ai00("v6", EXISTING_STATE)
    (root / "assets/models/by-hand.st").write_bytes(b"")  # not read by this test's reader below
    before = config_text(root)
    _, source = native(tmp_path, random_models["v6"])
    done = ai00.install(source, root, name="support-bot")
    after = config_text(root)
    assert [line for line in before.splitlines() if line.strip()] == \
        [line for line in after.splitlines() if line.strip() and line not in _entry_lines(done)]
    states = tomllib.loads(after)["state"]
    assert [s["name"] for s in states] == ["by-hand", "support-bot"]
    assert tomllib.loads(after)["tokenizer"]["path"].endswith(".json")  # the tables after it still parse as before


def _entry_lines(done) -> set[str]:
    return {"[[state]]", f'path = "{done.path.name}"', f'id = "{done.id}"', f'name = "{done.name}"', "default = false"}


@pytest.mark.parametrize("clash", ["name", "path"])
def test_refuses_a_duplicate_and_writes_nothing(make_ai00, tmp_path, random_models, clash):
    root = make_ai00("v6")
    _, source = native(tmp_path, random_models["v6"])
    first = ai00.install(source, root)
    before = config_text(root)
    st_before = first.path.read_bytes()
    _, again = native(tmp_path / "other", random_models["v6"], seed=1)
    kwargs = {} if clash == "path" else {"name": "my-style"}
    source2 = again if clash == "path" else again.rename(again.with_name("else.safetensors"))
    with pytest.raises(ConsumerError, match="already has a \\[\\[state\\]\\].*or pass another name$") as e:
        ai00.install(source2, root, **kwargs)
    assert "\n" not in str(e.value) and first.id in str(e.value)
    assert config_text(root) == before and first.path.read_bytes() == st_before
    assert sorted(p.name for p in (root / "assets/models").iterdir()) == ["model-v6.st", first.path.name]


def test_refuses_a_state_that_does_not_fit_ai00s_model(make_ai00, tmp_path):
    root = make_ai00("v6")
    before = config_text(root)
    wide = tmp_path / "wide.pth"
    save_checkpoint(random_checkpoint("v6", n_layer=3, n_embd=128, head_size=64, vocab_size=320, seed=5), wide)
    _, source = native(tmp_path, wide)
    with pytest.raises(ModelMismatchError, match=r"3 layers x 2 heads x 64, but .* has 2 layers x 3 heads x 64 "
                                                 r"\(Ai00's model is model-v6.st\)$"):
        ai00.install(source, root)
    assert config_text(root) == before and sorted(p.name for p in (root / "assets/models").iterdir()) == ["model-v6.st"]


def test_refuses_a_state_of_another_architecture(make_ai00, tmp_path, random_models):
    root = make_ai00("v7")
    _, source = native(tmp_path, random_models["v6"])  # same dims, v6
    with pytest.raises(ModelMismatchError, match=r"RWKV v6 model, but .* is v7 \(Ai00's model is model-v7.st\)$"):
        ai00.install(source, root)


def test_base_model_sha256_is_checked_with_model(make_ai00, tmp_path, random_models):
    root = make_ai00("v6")
    other = tmp_path / "other-v6.pth"
    save_checkpoint(random_checkpoint("v6", n_layer=2, n_embd=192, head_size=64, vocab_size=320, seed=99), other)
    _, source = native(tmp_path, other)
    with pytest.raises(ModelMismatchError, match="other-v6.*random-v6") as e:
        ai00.install(source, root, model=random_models["v6"])
    assert "pass force=True" in str(e.value) and not list((root / "assets/models").glob("my-style*"))
    done = ai00.install(source, root, model=random_models["v6"], force=True)
    assert "other-v6" in done.notes[0]


def test_a_state_for_another_model_of_the_same_shape_is_refused_by_its_weights(make_ai00, tmp_path):
    """Ai00's model is another file than the .pth a state records: the weights fingerprint tells the state's own
    base model (installed above) from another model of the same shape (refused here, unless forced)."""
    root = make_ai00("v6")
    other = tmp_path / "other-v6.pth"
    save_checkpoint(random_checkpoint("v6", n_layer=2, n_embd=192, head_size=64, vocab_size=320, seed=99), other)
    _, source = native(tmp_path, other)
    with pytest.raises(ModelMismatchError, match=r"made for other-v6 .* and other weights .*\(Ai00's model is "):
        ai00.install(source, root)
    assert not list((root / "assets/models").glob("my-style*"))


def test_refuses_non_finite_values_and_writes_nothing(make_ai00, tmp_path, random_models):
    """No --model (so no State.check): the export's own check still refuses a NaN, which F16 would carry."""
    root = make_ai00("v6")
    before = config_text(root)
    state = random_state_like(read_spec(random_models["v6"]), seed=2)
    state.wkv[1, 0, 0, 0] = float("nan")
    source = tmp_path / "nan.safetensors"  # written by hand: our own writers refuse a non-finite state
    safetensors.torch.save_file({f"blocks.{i}.att.time_state": t for i, t in enumerate(state.wkv)}, source)
    with pytest.raises(StateHubError, match="non-finite"):
        ai00.install(source, root)
    assert config_text(root) == before and sorted(p.name for p in (root / "assets/models").iterdir()) == ["model-v6.st"]


def test_an_unreadable_ai00_model_skips_only_the_shape_check(make_ai00, tmp_path, random_models):
    root = make_ai00("v6")
    cfg = root / "assets/configs/Config.toml"
    cfg.write_text(cfg.read_text().replace("model-v6.st", "model-v6.prefab"))
    (root / "assets/models/model-v6.prefab").write_bytes(b"\x93prefab")
    state, source = native(tmp_path, random_models["v6"])
    done = ai00.install(source, root)
    assert "could not read the dims" in done.notes[0] and done.path.name == "my-style--for-model-v6.st"
    assert ai00_loaded_states(root, 2, 3, 64)[done.id]["wkv"][0].shape == (3, 64, 64)


def test_problems_ai00_would_have(tmp_path):
    path = tmp_path / "s.st"
    save_file({f"blocks.{i}.att.time_state": torch.zeros(3, 64, 64, dtype=torch.bfloat16) for i in range(2)}, str(path))
    assert "data type mismatch" in ai00.ai00_problems(path, 2, 3, 64)[0]
    save_file({"blocks.0.att.time_state": torch.zeros(3, 64, 64, dtype=torch.float16)}, str(path))
    assert ai00.ai00_problems(path, 2, 3, 64) == ["no blocks.1.att.time_state"]
    assert "shape" in ai00.ai00_problems(path, 1, 2, 64)[0]
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken")
    assert "not valid safetensors" in ai00.ai00_problems(path, 1, 3, 64)[0]


def test_install_errors_are_one_line(make_ai00, tmp_path, random_models):
    root = make_ai00("v6")
    _, source = native(tmp_path, random_models["v6"])
    (tmp_path / "broken.toml").write_text("[model\nname = 1")
    cases = [
        (lambda: ai00.install(source, tmp_path / "nowhere"), "no such file"),
        (lambda: ai00.install(source, root, config=tmp_path / "broken.toml"), "not valid TOML"),
        (lambda: ai00.install(tmp_path / "missing.st", root), "no such file"),
    ]
    for call, words in cases:
        with pytest.raises(StateHubError, match=words) as e:
            call()
        assert "\n" not in str(e.value)


def test_install_and_chat_commands(make_ai00, tmp_path, random_models):
    root = make_ai00("v5.2")
    _, source = native(tmp_path, random_models["v5.2"], name="weather")
    result = CliRunner().invoke(cli, ["ai00", "install", str(source), "--ai00-dir", str(root)])
    assert result.exit_code == 0, result.output
    sid = tomllib.loads(config_text(root))["state"][0]["id"]
    assert sid in result.output
    with FakeAi00("Sunny, 21 C.") as server:
        result = CliRunner().invoke(cli, ["ai00", "chat", "Weather?", "--url", server.url, "--state", "weather",
                                          "--ai00-dir", str(root)])
    assert result.exit_code == 0, result.output
    assert result.output == "Sunny, 21 C.\n" and server.requests[0][2]["state"] == sid
    again = CliRunner().invoke(cli, ["ai00", "install", str(source), "--ai00-dir", str(root)])
    assert again.exit_code == 1 and again.output.endswith("or pass another --name\n")  # the flag, on the command line


# ---------------------------------------------------------------- chat against a real HTTP server


class FakeAi00(LoopbackPostServer):
    """Answers like Ai00's chat endpoint (an error status comes with a plain-text body)."""

    def __init__(self, content: str = "", status: int = 200, error: str = ""):
        super().__init__()
        self.content, self.status, self.error = content, status, error

    def answer(self, path: str, body: dict) -> tuple[int, object]:
        if self.status != 200:
            return self.status, self.error.encode()
        return 200, {"object": "chat.completion", "model": "assets/models/x.st", "choices": [
            {"message": {"role": "Assistant", "content": self.content}, "index": 0, "finish_reason": "stop"}]}


def test_chat_sends_the_state_per_request():
    sid = str(uuid.uuid4())
    with FakeAi00("Hello there.") as server:
        text = ai00.chat(server.url, "Hi!", state=sid.upper(), max_tokens=40, temperature=0.5)
        default = ai00.chat(server.url, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    assert text == default == "Hello there."
    (path, _, body), (_, _, body2) = server.requests
    assert path == "/api/oai/v1/chat/completions"
    assert body == {"messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 40, "stream": False,
                    "temperature": 0.5, "state": sid}
    assert "state" not in body2 and body2["messages"][1] == {"role": "assistant", "content": "b"}


def test_chat_errors_are_plain():
    with FakeAi00(status=500, error="failed to load state") as server:
        with pytest.raises(StateHubError, match="answered HTTP 500: failed to load state"):
            ai00.chat(server.url, "Hi!", state=str(uuid.uuid4()))
        with pytest.raises(StateHubError, match="by its UUID"):
            ai00.chat(server.url, "Hi!", state="weather")
    assert len(server.requests) == 1


def test_state_id_by_name(make_ai00):
    root = make_ai00("v6", EXISTING_STATE)
    assert ai00.state_id(root, "by-hand") == "6a9c60a4-0f4c-40b1-a31f-987f73e20315"
    assert ai00.state_id(root, "by-hand.st") == "6a9c60a4-0f4c-40b1-a31f-987f73e20315"
    with pytest.raises(StateHubError, match="no \\[\\[state\\]\\] named 'nope'"):
        ai00.state_id(root, "nope")


def test_config_copy_is_left_alone(make_ai00, tmp_path, random_models):
    """--config points at another file: that one is edited, Ai00's default one is not."""
    root = make_ai00("v6")
    own = tmp_path / "Other.toml"
    shutil.copy(root / "assets/configs/Config.toml", own)
    before = config_text(root)
    _, source = native(tmp_path, random_models["v6"])
    done = ai00.install(source, root, config=own)
    assert config_text(root) == before and done.config == own and done.id in own.read_text()


def test_install_from_a_hub_repo_id(make_ai00, tmp_path, random_models, monkeypatch):
    from rwkv_state_hub import hub

    root = make_ai00("v6")
    state, pulled = native(tmp_path, random_models["v6"])
    monkeypatch.setattr(hub, "pull", lambda repo, model=None, **kw: pulled)
    done = ai00.install("someone/support-bot", root)
    assert done.path.name == "support-bot--for-model-v6.st" and done.name == "support-bot"
    loaded = ai00_loaded_states(root, 2, 3, 64)[done.id]["wkv"]
    assert torch.equal(loaded[0], state.wkv[0].transpose(1, 2).half().float())


def test_duplicate_path_written_another_way_and_inline_arrays(make_ai00, tmp_path, random_models):
    root = make_ai00("v6")
    folder = root / "assets/models"
    _, source = native(tmp_path, random_models["v6"])
    cfg = root / "assets/configs/Config.toml"
    text = cfg.read_text()
    for listed in ("./my-style--for-model-v6.st", str(folder / "my-style--for-model-v6.st")):
        cfg.write_text(text + f'\n[[state]]\nid = "{uuid.uuid4()}"\npath = "{listed}"\n')
        with pytest.raises(StateHubError, match="already has a"):
            ai00.install(source, root, name="new-name")
    cfg.write_text(f'state = [{{ path = "x.st", id = "{uuid.uuid4()}" }}]\n' + text)  # top-level, before [model]
    before = cfg.read_text()
    with pytest.raises(StateHubError, match="inline array"):
        ai00.install(source, root)
    assert cfg.read_text() == before and not list(folder.glob("my-style*"))

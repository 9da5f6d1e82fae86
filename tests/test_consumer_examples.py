"""The README's per-consumer examples, run exactly as written: the `rwkv` pip package v5/v6 (merged file, state
list) and v7 (state list through `pip_state`) give our model's logits from the same state; the Runner and Ai00
commands run as shown. Also: every package folder ships (packages.find finds them all, plugins included)."""

from __future__ import annotations

import shlex
import shutil
import sys
import tomllib
from pathlib import Path

import pip_reference  # noqa: F401 - sets RWKV_JIT_ON=0 / RWKV_CUDA_ON=0 before any rwkv import
import pytest
import torch
from click.testing import CliRunner
from conftest import REAL_MODELS, REPO, random_state_like, real_model_path

from rwkv_state_hub import load_model
from rwkv_state_hub.cli import cli
from rwkv_state_hub.formats import save_native

TOL = 1e-4
TOKENS = [72, 101, 108, 108, 111]

# ---- the README's snippets, verbatim (README section "Using a state in other programs")

MERGE_COMMAND = "rwkv-state export my-state.safetensors --format merged --model base.pth -o base-with-state.pth"

PIP_MERGED = '''\
from rwkv.model import RWKV

model = RWKV("base-with-state", strategy="cpu fp32")  # finds the time_state keys: every forward starts from them
out, state = model.forward([72, 101, 108, 108, 111], None)
'''

PIP_STATE_LIST = '''\
from rwkv.model import RWKV
from rwkv_state_hub import load_state, pip_state

model = RWKV("base", strategy="cpu fp32")
out, state = model.forward([72, 101, 108, 108, 111], pip_state(load_state("my-state.safetensors")))
'''

PIP_V7 = '''\
import os

os.environ["RWKV_V7_ON"] = "1"  # before importing rwkv: its RWKV-7 code, which ignores time_state in files
from rwkv.model import RWKV
from rwkv_state_hub import load_state, pip_state

model = RWKV("base", strategy="cpu fp32")
out, state = model.forward([72, 101, 108, 108, 111], pip_state(load_state("my-state.safetensors")))
'''

RUNNER_INSTALL = "rwkv-state runner install my-state.safetensors --runner-dir RWKV-Runner"
AI00_INSTALL = "rwkv-state ai00 install my-state.safetensors --ai00-dir ai00"

SNIPPETS = {"v5.2": [PIP_MERGED, PIP_STATE_LIST], "v6": [PIP_MERGED, PIP_STATE_LIST], "v7": [PIP_V7]}


def model_path(name: str) -> Path:
    bundled = REPO / "rwkv_state_hub" / "examples" / "models" / f"{name}.pth"
    return bundled if bundled.exists() else real_model_path(name)


@pytest.fixture
def fresh_rwkv_import(monkeypatch):
    """Each snippet imports `rwkv.model` itself (its v7 class exists only if RWKV_V7_ON=1 at import): give it a
    fresh import, and leave sys.modules and the environment as they were."""
    import rwkv

    monkeypatch.delitem(sys.modules, "rwkv.model", raising=False)
    monkeypatch.delattr(rwkv, "model", raising=False)
    monkeypatch.setenv("RWKV_V7_ON", "0")
    yield
    sys.modules.pop("rwkv.model", None)


def run_cli(command: str) -> str:
    args = shlex.split(command)
    assert args[0] == "rwkv-state"
    result = CliRunner().invoke(cli, args[1:])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.slow
@pytest.mark.parametrize("name,arch,encoding", REAL_MODELS, ids=[a for _, a, _ in REAL_MODELS])
def test_pip_snippets_give_our_logits(tmp_path, monkeypatch, fresh_rwkv_import, name, arch, encoding):
    base = model_path(name)
    monkeypatch.chdir(tmp_path)
    shutil.copy(base, "base.pth")
    model = load_model("base.pth")
    state = random_state_like(model.spec, seed=21, scale=0.5)
    save_native(state, "my-state.safetensors")
    with torch.no_grad():
        ours = model(torch.tensor([TOKENS]), state.to_recurrent())[0][0][-1]
        zero = model(torch.tensor([TOKENS]))[0][0][-1]
    assert (ours - zero).abs().max().item() > 1e-2  # the state matters, so a snippet that ignores it fails
    for snippet in SNIPPETS[arch]:
        if snippet is PIP_MERGED:
            run_cli(MERGE_COMMAND)
        sys.modules.pop("rwkv.model", None)
        scope: dict = {}
        exec(compile(snippet, f"README snippet ({arch})", "exec"), scope)
        out = scope["out"].float()
        assert out.shape == ours.shape
        assert (out - ours).abs().max().item() < TOL, snippet


def test_runner_and_ai00_commands_run_as_shown(tmp_path, monkeypatch):
    base = model_path("tiny-rwkv-5v2-730K")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "RWKV-Runner/models").mkdir(parents=True)
    shutil.copy(base, "RWKV-Runner/models/base.pth")
    model = load_model("RWKV-Runner/models/base.pth")
    save_native(random_state_like(model.spec, seed=3), "my-state.safetensors")
    assert "state-models/my-state--for-base.pth" in run_cli(RUNNER_INSTALL)
    assert Path("RWKV-Runner/state-models/my-state--for-base.pth").is_file()
    (tmp_path / "ai00/assets/configs").mkdir(parents=True)
    (tmp_path / "ai00/assets/models").mkdir(parents=True)
    Path("ai00/assets/configs/Config.toml").write_text("[model]\nname = \"base.st\"\npath = \"assets/models\"\n")
    out = run_cli(AI00_INSTALL)
    entry = tomllib.loads(Path("ai00/assets/configs/Config.toml").read_text())["state"][0]
    assert entry["id"] in out and Path("ai00/assets/models", entry["path"]).is_file()


def test_readme_shows_these_snippets():
    """Once the README section is merged, it must show exactly the snippets tested above."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    if "## Using a state in other programs" not in readme:
        pytest.skip("README.md has no 'Using a state in other programs' section yet (proposed in issue 7)")
    for text in (MERGE_COMMAND, PIP_MERGED, PIP_STATE_LIST, PIP_V7, RUNNER_INSTALL, AI00_INSTALL):
        assert text in readme, text


def test_every_package_folder_ships():
    """The plugins are an ordinary subpackage: setuptools' packages.find (the config pyproject gives it) finds
    every package folder under rwkv_state_hub/, plugins included, with no folder mapped to another name."""
    from setuptools import find_packages

    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "package-dir" not in config
    find = config["packages"]["find"]
    assert find.get("namespaces") is False  # data folders (csrc/, examples/models/) are not packages
    found = set(find_packages(str(REPO), include=find["include"], exclude=find.get("exclude", ())))
    folders = {".".join(init.parent.relative_to(REPO).parts) for init in (REPO / "rwkv_state_hub").rglob("__init__.py")}
    assert found == folders
    assert {"rwkv_state_hub.plugins.ai00", "rwkv_state_hub.plugins.rwkv_runner"} <= found
    from rwkv_state_hub.plugins import ai00, rwkv_runner

    assert Path(ai00.__file__).parent == REPO / "rwkv_state_hub" / "plugins" / "ai00"
    assert Path(rwkv_runner.__file__).parent == REPO / "rwkv_state_hub" / "plugins" / "rwkv_runner"

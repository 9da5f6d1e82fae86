"""A plain wheel carries everything: the kernel sources, the bundled example model and states, the plugins.

Fast: pyproject's package-data names every data file in the package; the loader's sources live inside the
package and a missing one is said before any machine reason; the one module that knows the examples; the
demo's default. Slow: the wheel built, installed without -e into a fresh virtualenv, and used from an
unrelated folder (train two steps on the bundled model, export ai00, serve the demo, find the kernel sources).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
import tomllib
import urllib.request
import zipfile
from pathlib import Path

import pytest
from conftest import REPO

import rwkv_state_hub
from rwkv_state_hub import StateHubError, load_state, read_spec
from rwkv_state_hub.examples import DEFAULT_MODEL, example_model, example_states
from rwkv_state_hub.wkv import cpu, cuda

PACKAGE = Path(rwkv_state_hub.__file__).resolve().parent


def package_data_files() -> set[Path]:
    """Every file pyproject's [tool.setuptools.package-data] globs select, as setuptools globs them."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    return {file for package, patterns in config.items() for pattern in patterns
            for file in (REPO.joinpath(*package.split(".")).glob(pattern)) if file.is_file()}


def test_package_data_names_every_data_file_in_the_package():
    """A file in the package that no pattern selects would silently be missing from the wheel."""
    data = {p for p in PACKAGE.rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc")
            and "__pycache__" not in p.parts}
    assert data - package_data_files() == set(), "add these to [tool.setuptools.package-data] in pyproject.toml"
    names = {p.name for p in data}
    assert set(cuda.SOURCES + cuda.HEADERS + cpu.LIBRARY.sources) <= names and DEFAULT_MODEL in names
    bundled = {p.name for p in example_states().iterdir()}
    assert bundled >= {"weather.safetensors", "devils-dictionary.safetensors", "README.md"}


def test_the_loader_finds_its_sources_inside_the_package_and_says_first_when_they_are_missing(monkeypatch):
    assert cuda.SOURCE_DIR.parent == PACKAGE / "wkv"
    assert all((cuda.SOURCE_DIR / name).is_file() for name in cuda.SOURCES + cuda.HEADERS)
    for kernels in (cuda, cpu):  # a broken install, on any machine
        monkeypatch.setattr(kernels.LIBRARY, "source_dir", PACKAGE / "no-such-folder")
        reason = kernels.unavailable_reason()
        assert reason == f"kernel sources not found ({PACKAGE / 'no-such-folder' / kernels.LIBRARY.sources[0]}; " \
                         "reinstall rwkv-state-hub)"


def test_the_bundled_examples_are_found_by_name_and_the_states_fit_the_default_model():
    assert example_model() == PACKAGE / "examples" / "models" / DEFAULT_MODEL
    v7 = example_model("tiny-rwkv-7v0-834K")
    assert v7 == example_model("tiny-rwkv-7v0-834K.pth") and v7.is_file()
    for bad in ("no-such-model", "../states/weather.safetensors", "/etc/passwd"):
        with pytest.raises(StateHubError, match=r"no such bundled example model \(bundled: .*tiny-rwkv-5v2") as e:
            example_model(bad)
        assert "\n" not in str(e.value)
    spec = read_spec(example_model())
    for file in example_states().glob("*.safetensors"):
        assert load_state(file).check(spec) == []  # the demo with no arguments offers every bundled state


def test_cli_demo_without_model_serves_the_bundled_example(monkeypatch):
    from click.testing import CliRunner

    from rwkv_state_hub import demo
    from rwkv_state_hub.cli import cli

    calls = []

    class Page:
        engine = type("Engine", (), {"skipped": []})

    monkeypatch.setattr(demo, "create_demo", lambda model, states, **kw: calls.append((model, states)) or Page())
    monkeypatch.setattr(demo, "launch_demo", lambda page, **kw: None)
    for args in ([], ["--states", "mine"], ["--model", "m.pth"]):
        result = CliRunner().invoke(cli, ["demo", *args])
        assert result.exit_code == 0, result.output
    assert calls == [(str(example_model()), [str(example_states())]), (str(example_model()), ["mine"]),
                     ("m.pth", [])]


# ---- the wheel, installed without -e, used from an unrelated folder -------------------------------------------


def check(cmd: list[str]) -> None:
    """Run a set-up step, failing with its own output."""
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{' '.join(cmd)}: {r.stdout}{r.stderr}"


def build_wheel(tmp_path: Path) -> Path:
    """The wheel of a copy of what the build reads (so that no build/ or egg-info lands in the checkout)."""
    src = tmp_path / "src"
    shutil.copytree(REPO / "rwkv_state_hub", src / "rwkv_state_hub",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    check([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
           str(tmp_path / "dist"), str(src)])
    (wheel,) = (tmp_path / "dist").glob("rwkv_state_hub-*.whl")
    return wheel


def fresh_venv(tmp_path: Path, wheel: Path) -> Path:
    """A virtualenv holding only the wheel (no -e), seeing this venv's dependencies through a .pth file: a
    plain path line, so this venv's own .pth files (the editable install's finder among them) are not run."""
    venv = tmp_path / "venv"
    check([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    site = Path(sysconfig.get_paths(vars={"base": str(venv), "platbase": str(venv)})["purelib"])
    (site / "outer-venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    check([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q", "--no-deps",
           "--no-index", str(wheel)])
    return venv


PROBE = """
import json, torch, rwkv_state_hub
from rwkv_state_hub.examples import example_model, example_states
from rwkv_state_hub.wkv import cuda
print(json.dumps({"package": rwkv_state_hub.__file__, "model": str(example_model()), "states": str(example_states()),
                  "sources": str(cuda.SOURCE_DIR), "reason": cuda.unavailable_reason(),
                  "found": [n for n in cuda.SOURCES + cuda.HEADERS if (cuda.SOURCE_DIR / n).is_file()]}))
"""


def wait_for_page(url: str, proc: subprocess.Popen, timeout: float) -> str:
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise AssertionError(f"the demo exited with {proc.returncode}: {proc.stdout.read()}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.read().decode()
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout} s")


@pytest.mark.slow
def test_the_wheel_installs_and_works_from_any_folder(tmp_path):
    wheel = build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    assert {f"rwkv_state_hub/wkv/csrc/{n}" for n in cuda.SOURCES + cuda.HEADERS + cpu.LIBRARY.sources} <= set(names)
    assert {f"rwkv_state_hub/examples/models/{DEFAULT_MODEL}", "rwkv_state_hub/plugins/ai00/ai00.py",
            "rwkv_state_hub/examples/states/weather.safetensors"} <= set(names)
    assert wheel.stat().st_size < 32 << 20, f"{wheel.name}: {wheel.stat().st_size:,} bytes"
    venv = fresh_venv(tmp_path, wheel)
    bin_, elsewhere = venv / "bin", tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RWKV_STATE_HUB_MODEL")}
    env.update(GRADIO_ANALYTICS_ENABLED="False", OMP_NUM_THREADS="1")

    def run(*cmd: str) -> str:
        r = subprocess.run(cmd, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"{cmd}: {r.stdout}{r.stderr}"
        return r.stdout

    found = json.loads(run(str(bin_ / "python"), "-c", PROBE))
    installed = Path(found["package"]).parent
    assert venv in installed.parents and REPO not in installed.parents  # the wheel, not the checkout
    assert found["found"] == list(cuda.SOURCES + cuda.HEADERS) and Path(found["sources"]) == installed / "wkv/csrc"
    assert found["reason"] == cuda.unavailable_reason()  # only the machine's reason (a CPU build here)
    assert "sources" not in (found["reason"] or "")
    model = Path(found["model"])
    assert model.parent == installed / "examples" / "models" and model.name == DEFAULT_MODEL
    assert Path(found["states"]) == installed / "examples" / "states"

    (elsewhere / "d.jsonl").write_text("".join(json.dumps({"text": f"WEATHER. Town {i}: sunny. END."}) + "\n"
                                               for i in range(8)))
    run(str(bin_ / "rwkv-state"), "train", "--model", str(model), "--data", "d.jsonl", "--steps", "2",
        "--ctx-len", "32", "--micro-bsz", "2", "--val-every", "100", "--out", "run", "--export", "ai00")
    assert (elsewhere / "run" / "state.safetensors").is_file() and (elsewhere / "run" / "state.st").is_file()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = subprocess.Popen([str(bin_ / "rwkv-state"), "demo", "--port", str(port)], cwd=elsewhere, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        page = wait_for_page(f"http://127.0.0.1:{port}/config", demo, 240)
        assert model.stem in page and "weather.safetensors" in page
    finally:
        demo.terminate()
        demo.wait(30)

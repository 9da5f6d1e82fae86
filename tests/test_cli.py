"""End-to-end tests of the `rwkv-state` command: real processes where it matters (exit codes, no
tracebacks), click's runner for the rest."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from conftest import EXAMPLE_MODEL, random_state_like

from rwkv_state_hub import __version__, load_state, read_spec, save_native
from rwkv_state_hub.cli import cli

COMMANDS = ["info", "check", "export", "train", "eval", "generate", "bake", "mix", "diff"]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rwkv_state_hub.cli", *args], capture_output=True, text=True)


def test_version_and_help():
    r = CliRunner().invoke(cli, ["--version"])
    assert r.exit_code == 0 and __version__ in r.output
    for cmd in [[], *([c] for c in COMMANDS)]:
        r = CliRunner().invoke(cli, [*cmd, "--help"])
        assert r.exit_code == 0 and "Usage:" in r.output


@pytest.mark.slow
def test_info_on_the_bundled_checkpoint_as_json():
    r = run("info", str(EXAMPLE_MODEL), "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert (d["kind"], d["arch"], d["n_layer"], d["n_head"], d["head_size"]) == ("checkpoint", "v7", 12, 1, 64)
    assert d["sha256"] == "c133947fad822e9cec8d4c9fc4138aaf97ac08d03a07b8280691a982ca7433db"
    assert d["tokenizer"] == "bytes"


@pytest.fixture
def state_file(tmp_path, random_models):
    spec = read_spec(random_models["v6"])
    path = tmp_path / "s.safetensors"
    save_native(random_state_like(spec, seed=1, full=True), path)
    return path


def test_info_on_a_state(state_file, random_models):
    r = CliRunner().invoke(cli, ["info", str(state_file), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["kind"] == "state" and d["format"] == "safetensors" and d["token_shift"] is True
    assert d["metadata"]["base_model_sha256"] == read_spec(random_models["v6"]).sha256


@pytest.mark.slow
def test_check_accepts_the_right_model_and_refuses_another(state_file, random_models):
    ok = run("check", str(state_file), "--model", str(random_models["v6"]))
    assert ok.returncode == 0 and ok.stdout.startswith("ok:"), ok.stderr
    bad = run("check", str(state_file), "--model", str(random_models["v7"]))
    assert bad.returncode == 1
    assert "Traceback" not in bad.stderr
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and str(state_file) in lines[0] and "v7" in lines[0]


@pytest.mark.slow
def test_check_refuses_a_same_shape_model_by_hash(state_file, random_models, tmp_path):
    """A model of the same shape but another file (here: other weights) has another sha256."""
    from rwkv_state_hub.random_model import random_checkpoint, save_checkpoint

    other = tmp_path / "other-v6.pth"
    save_checkpoint(random_checkpoint("v6", n_layer=2, n_embd=192, head_size=64, vocab_size=320, seed=99), other)
    bad = run("check", str(state_file), "--model", str(other))
    assert bad.returncode == 1 and "sha256" in bad.stderr and "--force" in bad.stderr
    forced = run("check", str(state_file), "--model", str(other), "--force")
    assert forced.returncode == 0 and "warning:" in forced.stderr


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["safetensors", "pth", "ai00", "merged"])
def test_export_every_format(state_file, random_models, tmp_path, fmt):
    out = tmp_path / f"out.{fmt}"
    r = run("export", str(state_file), "--format", fmt, "-o", str(out), "--model", str(random_models["v6"]))
    assert r.returncode == 0, r.stderr
    back = load_state(out)
    assert torch.allclose(back.wkv, load_state(state_file).wkv, atol=1e-2 if fmt == "ai00" else 0)
    if fmt != "safetensors":
        assert "token shift" in r.stderr


def test_export_merged_refuses_v7(tmp_path, random_models):
    spec = read_spec(random_models["v7"])
    src = tmp_path / "s7.safetensors"
    save_native(random_state_like(spec), src)
    out = tmp_path / "m.pth"
    r = run("export", str(src), "--format", "merged", "-o", str(out), "--model", str(random_models["v7"]))
    assert r.returncode == 1 and "pip_state" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


@pytest.mark.slow
def test_bad_input_is_one_line(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x00not a checkpoint" * 10)
    for args in (["info", str(junk)], ["info", str(tmp_path / "missing.pth")]):
        r = run(*args)
        assert r.returncode == 1 and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and args[1] in r.stderr

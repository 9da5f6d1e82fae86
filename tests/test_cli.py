"""End-to-end tests of the `rwkv-state` command: real processes where it matters (exit codes, no
tracebacks), click's runner for the rest."""

from __future__ import annotations

import json
import subprocess
import sys

import click
import pytest
import torch
from click.testing import CliRunner
from conftest import EXAMPLE_MODEL, random_state_like

import rwkv_state_hub
from rwkv_state_hub import State, __version__, load_state, read_spec
from rwkv_state_hub.cli import cli
from rwkv_state_hub.errors import InvalidOptionError, option
from rwkv_state_hub.files import sha256_file
from rwkv_state_hub.formats import PIP_V7_ADVICE, export_state, save_native
from rwkv_state_hub.pip_bridge import load_pip_model

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
    assert r.returncode == 1 and PIP_V7_ADVICE in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


def test_the_advice_for_a_merged_v7_is_a_call_that_works(random_models):
    """The advised call, run as written, gives the rwkv pip package's RWKV-7 the state: its logits are ours."""
    spec = read_spec(random_models["v7"])
    state = random_state_like(spec, seed=3, scale=0.5, full=True)
    advised = eval(PIP_V7_ADVICE, {"rwkv_state_hub": rwkv_state_hub, "state": State(state.wkv, state.shift)})
    tokens = [5, 17, 42]
    theirs, _ = load_pip_model(random_models["v7"]).forward(tokens, advised)
    with torch.no_grad():
        ours = rwkv_state_hub.load_model(random_models["v7"])(torch.tensor([tokens]), state.to_recurrent())[0][0, -1]
    assert (theirs.float() - ours).abs().max() < 1e-4


@pytest.mark.slow
def test_bad_input_is_one_line(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x00not a checkpoint" * 10)
    for args in (["info", str(junk)], ["info", str(tmp_path / "missing.pth")]):
        r = run(*args)
        assert r.returncode == 1 and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and args[1] in r.stderr


def walk(group: click.Group, path: tuple[str, ...] = ()):
    """(command path, command) for every command, the plugins' included."""
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            yield from walk(command, (*path, name))
        else:
            yield " ".join((*path, name)), command


def test_every_option_has_help_and_model_is_shown_alike():
    ctx = click.Context(cli)
    commands = dict(walk(cli))
    assert {"export", "train", "demo", "runner install", "ai00 chat"} <= set(commands)
    no_help = [f"{name} {p.opts[0]}" for name, c in commands.items() for p in c.params
               if isinstance(p, click.Option) and not (p.help or "").strip()]
    assert no_help == []
    metavars = {name: p.make_metavar(ctx) for name, c in commands.items() for p in c.params if p.name == "model"}
    assert len(metavars) >= 10 and set(metavars.values()) == {"MODEL"}, metavars


def test_one_name_for_our_format_and_native_still_taken(state_file, tmp_path):
    for command in ("export", "bake", "pull"):
        fmt = next(p for p in cli.commands[command].params if p.name == "fmt")
        assert "safetensors" in fmt.type.choices and "native" not in fmt.type.choices
        assert fmt.type.convert("native", fmt, None) == "safetensors"
    out = tmp_path / "copy.safetensors"
    r = CliRunner().invoke(cli, ["export", str(state_file), "--format", "native", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert torch.equal(load_state(out).shift, load_state(state_file).shift)  # our format: token shift kept


def test_ai00_refuses_a_dtype_it_cannot_hold_in_the_callers_words(state_file, tmp_path):
    out = tmp_path / "s.st"
    r = CliRunner().invoke(cli, ["export", str(state_file), "--format", "ai00", "--dtype", "bf16", "-o", str(out)])
    assert r.exit_code == 1 and "--dtype bf16: the ai00 format holds fp16 only" in r.output and not out.exists()
    assert option("force", True) == "force=True"  # the command line's words stay with the command line
    with pytest.raises(InvalidOptionError, match="^dtype='bf16': the ai00 format holds fp16 only"):
        export_state(load_state(state_file), out, "ai00", dtype="bf16")
    assert CliRunner().invoke(cli, ["export", str(state_file), "--format", "ai00", "-o", str(out)]).exit_code == 0


def test_mix_warns_of_a_missing_token_shift_and_info_shows_parents_readably(state_file, tmp_path):
    wkv_only = tmp_path / "wkv-only.pth"
    assert CliRunner().invoke(cli, ["export", str(state_file), "--format", "pth", "-o", str(wkv_only)]).exit_code == 0
    mixed = tmp_path / "mixed.safetensors"
    r = CliRunner().invoke(cli, ["mix", str(state_file), str(wkv_only), "--weights", "0.7,0.3", "-o", str(mixed)])
    assert r.exit_code == 0, r.output
    assert "warning: wkv-only.pth has no token-shift state" in r.stderr and "0.7 x s.safetensors's" in r.stderr
    assert torch.allclose(load_state(mixed).shift, 0.7 * load_state(state_file).shift)
    r = CliRunner().invoke(cli, ["info", str(mixed)])
    assert r.exit_code == 0, r.output
    assert f"- file s.safetensors, weight 0.7, sha256 {sha256_file(state_file)[:12]}\n" in r.output
    assert "- file wkv-only.pth, weight 0.3, sha256 " in r.output and "{" not in r.output

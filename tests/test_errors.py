"""The typed errors: one hierarchy, messages in the caller's own words (Python parameters or CLI flags),
and no code that reads a message back."""

from __future__ import annotations

import contextvars
import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import FIXTURES

import rwkv_state_hub
from rwkv_state_hub import errors
from rwkv_state_hub.errors import option, speak_cli

PACKAGE = Path(rwkv_state_hub.__file__).parent
CLI_MODULES = {PACKAGE / "cli.py", *PACKAGE.glob("plugins/*/cli.py")}


def test_every_error_is_a_state_hub_error_and_public():
    classes = [v for v in vars(errors).values() if isinstance(v, type) and issubclass(v, Exception)
               and not issubclass(v, Warning)]
    assert len(classes) >= 10
    for cls in classes:
        assert issubclass(cls, errors.StateHubError), cls
        assert getattr(rwkv_state_hub, cls.__name__) is cls, f"{cls.__name__} is not importable from the package"
    assert issubclass(errors.InvalidOptionError, ValueError)  # what a notebook's generic handler expects
    assert issubclass(errors.HubEntryNotFoundError, errors.HubError)
    assert issubclass(errors.StateHubWarning, UserWarning) and rwkv_state_hub.StateHubWarning is errors.StateHubWarning


def test_option_speaks_python_until_the_cli_asks():
    def spoken() -> list[str]:
        return [option("force", True), option("ctx_len", 0), option("fmt", "pth"), option("exports", ["pth", "ai00"]),
                option("token")]

    assert spoken() == ["force=True", "ctx_len=0", "fmt='pth'", "exports=['pth', 'ai00']", "token"]

    def as_cli() -> list[str]:
        speak_cli()
        return spoken()

    assert contextvars.copy_context().run(as_cli) == ["--force", "--ctx-len 0", "--format pth",
                                                      "--exports pth,ai00", "--token"]
    assert spoken()[0] == "force=True"  # the CLI's choice stayed in its own context


def _two_states(tmp_path):
    """A state made for the bundled tiny v5.2 model, and a copy of that model with other bytes (another sha256)."""
    from rwkv_state_hub.examples import example_model

    model = example_model("tiny-rwkv-5v2-730K.pth")
    other = tmp_path / "fine-tune.pth"
    other.write_bytes(model.read_bytes() + b"")
    import torch

    sd = torch.load(model, weights_only=True)
    sd["emb.weight"] = sd["emb.weight"] * 1.0001  # same shape, other file: a fine-tune
    torch.save(sd, other)
    return FIXTURES / "weather-5v2.safetensors", other


def test_a_mismatch_names_force_as_python_in_the_library_and_as_a_flag_in_the_cli(tmp_path):
    from rwkv_state_hub import ModelMismatchError, State, StateHubWarning, read_spec
    from rwkv_state_hub.cli import cli

    state_path, other = _two_states(tmp_path)
    with pytest.raises(ModelMismatchError) as err:
        State.from_pretrained(state_path, model=other)
    assert str(err.value).endswith("(pass force=True to use it anyway)")
    with pytest.warns(StateHubWarning, match="made for tiny-rwkv-5v2-730K"):
        State.from_pretrained(state_path, model=read_spec(other), force=True)

    result = CliRunner().invoke(cli, ["check", str(state_path), "--model", str(other)])
    assert result.exit_code == 1
    assert "(pass --force to use it anyway)" in result.output and "force=True" not in result.output


_HARD_CODED_FLAG = re.compile(r"""(raise \w+\(|Error\()\s*f?["'][^"'\n]*--[a-z]""")


def test_library_messages_do_not_hard_code_flags():
    """Library code names parameters with option(); only the command-line modules may spell flags."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path in CLI_MODULES:
            continue
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if _HARD_CODED_FLAG.search(line) or re.search(r"""^\s+f?["'][^"'\n]*\b(use|pass) --[a-z]""", line):
                offenders.append(f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_no_code_reads_its_own_messages_back():
    """Decisions are made on the error's type, never on its text (`"..." in str(e)`)."""
    allowed = {'if "Consistency check failed" in str(e):'}  # huggingface_hub's OSError has no type for it
    reads = re.compile(r"\bin str\((e|err|exc|error)\)|str\((e|err|exc|error)\)\.(startswith|replace|endswith)\(")
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if reads.search(line) and line.strip() not in allowed:
                offenders.append(f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)

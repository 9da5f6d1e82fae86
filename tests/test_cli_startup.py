"""`rwkv-state --help`, `--version` and every command's `--help` (the plugins' too) start without importing torch,
gradio, huggingface_hub or safetensors: the library is imported inside the commands, when one runs."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torch", "gradio", "huggingface_hub", "safetensors")

# In a fresh interpreter: every command line, one after another, with what each newly imported of HEAVY.
RUNNER = f"""
import json, sys
import click
from rwkv_state_hub import cli

HEAVY = {HEAVY!r}

def commands(group, path=()):
    for name, command in sorted(group.commands.items()):
        yield (*path, name)
        if isinstance(command, click.Group):
            yield from commands(command, (*path, name))

def heavy():
    return sorted(m for m in sys.modules if m.split(".")[0] in HEAVY)

lines = [["--help"], ["-h"], ["--version"], *([*c, "--help"] for c in commands(cli.cli))]
found = {{"import": heavy()}}
for argv in lines:
    sys.argv = ["rwkv-state", *argv]
    try:
        cli.main()
    except SystemExit as e:
        assert e.code in (0, None), (argv, e.code)
    found[" ".join(argv)] = heavy()
print(json.dumps(found))
"""


def test_help_and_version_import_no_heavy_library():
    r = subprocess.run([sys.executable, "-c", RUNNER], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    found = json.loads(r.stdout.strip().splitlines()[-1])
    assert {"runner install --help", "ai00 chat --help", "train --help", "demo --help"} <= set(found)
    assert {line: mods for line, mods in found.items() if mods} == {}

"""`rwkv-state ai00 ...`: the Ai00 commands, a few lines each over ai00.py (imported when a command runs, so
that `--help` costs no torch)."""

from __future__ import annotations

import click

from .ai00 import DEFAULT_URL


@click.group()
def ai00() -> None:
    """Put states into the Ai00 server: install into its model folder and Config.toml, chat with one."""


@ai00.command("install")
@click.argument("state_or_repo")
@click.option("--ai00-dir", required=True, type=click.Path(file_okay=False), help="The folder Ai00 runs in.")
@click.option("--config", type=click.Path(dir_okay=False), help="Config.toml  [default: assets/configs/Config.toml]")
@click.option("--model", metavar="MODEL",
              help="The base .pth (or hf://owner/repo/file.pth), to check the state's base-model sha256.")
@click.option("--name", help="The entry's name  [default: the state's file or repo name]")
@click.option("--force", is_flag=True, help="Install a state made for another model of the same shape anyway.")
def install_cmd(state_or_repo: str, ai00_dir: str, config: str | None, model: str | None, name: str | None,
                force: bool) -> None:
    """Write STATE_OR_REPO (a state file or a Hub repo id) as an F16 .st and add its [[state]] to Config.toml."""
    from rwkv_state_hub.hub import resolve_model

    from .ai00 import install

    if model:
        model = str(resolve_model(model))
    done = install(state_or_repo, ai00_dir, config, model, name, force)
    for note in done.notes:
        click.echo(f"note: {note}", err=True)
    click.echo(f"wrote {done.path} and its [[state]] in {done.config}: name {done.name!r}, id {done.id}")
    click.echo("restart Ai00 (or reload its model) to load it; pick it per request with \"state\": \"" + done.id + "\"")


@ai00.command("chat")
@click.argument("prompt")
@click.option("--url", default=DEFAULT_URL, show_default=True, help="The Ai00 server.")
@click.option("--state", "state", help="The state's UUID, or its name with --ai00-dir  [default: Ai00's default]")
@click.option("--ai00-dir", type=click.Path(file_okay=False), help="Ai00's folder, to look a state name up.")
@click.option("--max-tokens", type=click.IntRange(1), default=256, show_default=True,
              help="Longest answer, in tokens.")
@click.option("--timeout", type=float, default=300.0, show_default=True, help="Seconds to wait for the answer.")
def chat_cmd(prompt: str, url: str, state: str | None, ai00_dir: str | None, max_tokens: int, timeout: float) -> None:
    """Send PROMPT to Ai00's chat endpoint, starting from a state, and print the answer."""
    from .ai00 import chat, state_id

    if state and ai00_dir:
        state = state_id(ai00_dir, state)
    click.echo(chat(url, prompt, state, max_tokens, timeout))

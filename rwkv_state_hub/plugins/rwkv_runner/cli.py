"""`rwkv-state runner ...`: the RWKV Runner commands, a few lines each over runner.py (imported when a command
runs, so that `--help` costs no torch)."""

from __future__ import annotations

import click

from .runner import DEFAULT_URL


@click.group()
def runner() -> None:
    """Put states into RWKV Runner: install into its folder, mount into a running backend."""


@runner.command("install")
@click.argument("state_or_repo")
@click.option("--runner-dir", required=True, type=click.Path(file_okay=False), help="RWKV Runner's folder.")
@click.option("--model", metavar="MODEL",
              help="The base model in Runner's models folder  [default: the one the state records, by sha256]")
@click.option("--force", is_flag=True, help="Install a state made for another model of the same shape anyway.")
def install_cmd(state_or_repo: str, runner_dir: str, model: str | None, force: bool) -> None:
    """Write STATE_OR_REPO (a state file or a Hub repo id) into Runner's state-models/ for its base model."""
    from .runner import install

    done = install(state_or_repo, runner_dir, model, force)
    for note in done.notes:
        click.echo(f"note: {note}", err=True)
    verb = "replaced" if done.replaced else "wrote"
    click.echo(f"{verb} {done.path} for {done.model.name} ({done.model.arch}, {done.model.dims()}); "
               f"choose it under State-tuned Model in Runner's Configs, or `rwkv-state runner mount`")


@runner.command("mount")
@click.argument("state")
@click.option("--url", default=DEFAULT_URL, show_default=True, help="Runner's backend.")
@click.option("--timeout", type=float, default=60.0, show_default=True, help="Seconds to wait for the backend.")
def mount_cmd(state: str, url: str, timeout: float) -> None:
    """Ask a running Runner backend to load STATE (a .pth file here, or a path as Runner sees it)."""
    from .runner import mount

    path = mount(state, url, timeout)
    click.echo(f"RWKV Runner at {url} now starts from {path}")


@runner.command("unmount")
@click.option("--url", default=DEFAULT_URL, show_default=True, help="Runner's backend.")
@click.option("--timeout", type=float, default=60.0, show_default=True, help="Seconds to wait for the backend.")
def unmount_cmd(url: str, timeout: float) -> None:
    """Ask a running Runner backend to drop its state (back to the model's zero state)."""
    from .runner import unmount

    unmount(url, timeout)
    click.echo(f"RWKV Runner at {url}: state unloaded")

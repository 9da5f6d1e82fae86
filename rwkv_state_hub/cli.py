"""`rwkv-state`: a thin command line over the Python API. Each command is a few lines."""

from __future__ import annotations

import json
import sys

import click

from . import __version__
from .checkpoint import read_spec
from .errors import StateHubError
from .formats import FORMATS, PTH_DTYPES, export_state, load_state
from .info import describe


class _Group(click.Group):
    """Turns a StateHubError into its one line and exit status 1, never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except StateHubError as e:
            raise click.ClickException(str(e)) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="rwkv-state")
def cli() -> None:
    """Train, check, convert and share RWKV state-tuning states (v5.2, v6, v7)."""


def _print_info(d: dict, indent: str = "") -> None:
    for key, value in d.items():
        if isinstance(value, dict):
            click.echo(f"{indent}{key}:")
            _print_info(value, indent + "  ")
        elif isinstance(value, list):
            click.echo(f"{indent}{key}:")
            for item in value:
                click.echo(f"{indent}  - {item}")
        else:
            click.echo(f"{indent}{key}: {value}")


@cli.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def info(file: str, as_json: bool) -> None:
    """Describe a checkpoint or a state file (any format): architecture, dims, sha256, who can load it."""
    d = describe(file)
    if as_json:
        click.echo(json.dumps(d, indent=2, default=str))
    else:
        _print_info(d)


@cli.command()
@click.argument("state", type=click.Path(dir_okay=False))
@click.option("--model", "model", required=True, type=click.Path(dir_okay=False), help="The base model .pth.")
@click.option("--force", is_flag=True, help="Report problems but exit 0.")
def check(state: str, model: str, force: bool) -> None:
    """Does STATE fit the base model: layers, heads, head size, dtype, finite values, base-model sha256."""
    spec = read_spec(model)
    s = load_state(state)
    problems = s.check(spec, force=force)
    for p in problems:
        click.echo(f"warning: {p}", err=True)
    if not s.base_model_sha256:
        click.echo(f"note: {state} does not record its base model; only its shape was checked", err=True)
    if not problems:
        click.echo(f"ok: {state} fits {spec.name} ({spec.arch}, {spec.dims()}, sha256 {spec.sha256[:12]})")


@cli.command()
@click.argument("state", type=click.Path(dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(FORMATS), required=True, help="Target format.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Output file.")
@click.option("--dtype", type=click.Choice(list(PTH_DTYPES)), default="fp32", show_default=True,
              help="Tensor dtype of a pth export.")
@click.option("--model", "model", type=click.Path(dir_okay=False),
              help="Base model: checked against, recorded in the output; required for --format merged.")
@click.option("--force", is_flag=True, help="Export even if the state does not fit --model.")
def export(state: str, fmt: str, output: str, dtype: str, model: str | None, force: bool) -> None:
    """Convert STATE to another consumer's format (pth: Runner/PEFT/pip, ai00: Ai00, merged: pip v5/v6)."""
    s = load_state(state)
    if model:
        spec = read_spec(model)
        for p in s.check(spec, force=force):
            click.echo(f"warning: {p}", err=True)
        s = s.with_model(spec)
    for note in export_state(s, output, fmt, dtype=dtype, base_model=model, force=force):
        click.echo(f"note: {note}", err=True)
    click.echo(f"wrote {output} ({fmt})")


def main() -> None:
    cli(prog_name="rwkv-state")


if __name__ == "__main__":
    sys.exit(main())

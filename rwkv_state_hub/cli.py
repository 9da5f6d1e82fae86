"""`rwkv-state`: a thin command line over the Python API. Each command is a few lines."""

from __future__ import annotations

import json
import math
import os
import sys
import warnings

import click

from ._version import __version__
from .errors import FileAccessError, InvalidOptionError, StateHubError, StateHubWarning, speak_cli
from .formats import DTYPES, FOR_ONE_MODEL, FORMAT_ALIASES, FORMATS

# Library modules (torch, huggingface_hub, gradio behind them) are imported inside the commands, so that
# `--help` and `--version` start in a fraction of a second; tests/test_cli_startup.py keeps it so.


class _Group(click.Group):
    """Runs a command with messages that name flags (`--force`, not `force=True`), and turns a StateHubError, or
    the operating system refusing a read or write, into one line and exit status 1, never a traceback."""

    def invoke(self, ctx: click.Context):
        speak_cli()
        try:
            with warnings.catch_warnings():
                warnings.showwarning = _show_warning
                warnings.simplefilter("always", StateHubWarning)
                return super().invoke(ctx)
        except StateHubError as e:
            raise click.ClickException(str(e)) from None
        except OSError as e:
            where = f"{os.fsdecode(e.filename)}: " if e.filename is not None else ""
            raise click.ClickException(f"{where}{e.strerror or e}") from None
        finally:
            speak_cli(False)  # a caller in the same process (a test, a notebook) gets Python's words back


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """The library's StateHubWarnings as one `warning:` line each; any other warning as Python shows it."""
    if issubclass(category, StateHubWarning):
        click.echo(f"warning: {message}", err=True)
    else:
        _SHOW_WARNING(message, category, filename, lineno, file, line)


_SHOW_WARNING = warnings.showwarning


class _ModelPath(click.ParamType):
    """A base model .pth: a local path, or hf://owner/repo/file.pth (hub.resolve_model, the one place that
    tells the two apart, downloads it through huggingface_hub's cache)."""

    name = "model"

    def convert(self, value, param, ctx):
        from .hub import resolve_model

        try:
            return str(resolve_model(value))
        except StateHubError as e:
            self.fail(str(e), param, ctx)


MODEL_PATH = _ModelPath()


class _Choice(click.Choice):
    """A click.Choice that also takes older names (`aliases`, not shown) and returns the current one."""

    def __init__(self, choices, aliases: dict[str, str]) -> None:
        super().__init__(choices)
        self.aliases = aliases

    def convert(self, value, param, ctx):
        return super().convert(self.aliases.get(value, value), param, ctx)


FORMAT = _Choice(FORMATS, FORMAT_ALIASES)


def _export(state, output: str, fmt: str, gguf: str | None, force: bool, **kwargs) -> None:
    """formats.export_state, saying first what checking the state against --gguf found (the same weights, or what
    could not be checked) as notes: the export's own warnings of the same check are then not repeated."""
    from .formats import export_state

    if not (gguf and fmt == "llama.cpp"):
        export_state(state, output, fmt, force=force, gguf=gguf, **kwargs)
        return
    from .llama_cpp import check_gguf

    for line in check_gguf(state, gguf, force=force):
        click.echo(f"note: {line}", err=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StateHubWarning)
        export_state(state, output, fmt, force=force, gguf=gguf, **kwargs)


def _gguf_option(f):
    return click.option("--gguf", type=click.Path(dir_okay=False), help="The llama.cpp model (.gguf) a "
                        "--format llama.cpp state is for: checked against (architecture, dims, weights), required.")(f)


QUANT_HELP = "Store the frozen matrices as int8 or nf4 (less memory; matmuls in --precision, the state fp32)."


def _check_quant(ctx, param, value: str | None) -> str | None:
    """--quant of eval and generate, refused in the words of `train`'s (TrainConfig's) check."""
    from .training.config import QUANT_KINDS

    if value is not None and value not in QUANT_KINDS:
        raise InvalidOptionError(f"--quant {value}: choose from {', '.join(QUANT_KINDS)}")
    return value


def _quant_option(f):
    return click.option("--quant", callback=_check_quant, help=QUANT_HELP.replace("--precision", "the model's dtype")
                        + "  [choices: int8, nf4]")(f)


class _Finite(click.FloatRange):
    """A FloatRange that also refuses nan and inf (click's lets nan through every bound)."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


COUNT = click.IntRange(1, 2**31 - 1)  # a count or a length: at least one, and within what torch indexes
SEED = click.IntRange(0, 2**32 - 1)


def _sampling_options(f):
    """--temperature, --top-p, --max-tokens, --presence-penalty, --frequency-penalty, --seed: generate.Sampling's
    settings, with its defaults (DEFAULT_SAMPLING, the demo's too) and its bounds (generate.LIMITS)."""
    from .generate import DEFAULT_SAMPLING, LIMITS

    helps = {"temperature": "0 = greedy (over the penalised logits).", "top_p": "Keep the likeliest tokens up to "
             "this probability.", "presence_penalty": "Subtracted from the logit of each token already in the reply.",
             "frequency_penalty": "Subtracted from a logit once per time its token is in the reply.",
             "seed": "Random seed of the sampling.", "max_tokens": "Longest continuation, in tokens."}
    for name in reversed(LIMITS):
        low, high = LIMITS[name]
        kind = click.IntRange(low, high) if name in ("max_tokens", "seed") else _Finite(low, high)
        f = click.option(f"--{name.replace('_', '-')}", type=kind, default=getattr(DEFAULT_SAMPLING, name),
                         show_default=True, help=helps[name])(f)
    return f


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="rwkv-state")
def cli() -> None:
    """Train, check, convert and share RWKV state-tuning states (v5.2, v6, v7)."""
    speak_cli()  # as _Group.invoke does, around this callback and the command
    # file names that are not valid UTF-8 print with backslash escapes instead of stopping the command
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


def _print_info(d: dict, indent: str = "") -> None:
    for key, value in d.items():
        if isinstance(value, dict):
            click.echo(f"{indent}{key}:")
            _print_info(value, indent + "  ")
        elif isinstance(value, list):
            click.echo(f"{indent}{key}:" + ("" if value else " none"))
            for item in value:
                click.echo(f"{indent}  - {_one_line(item) if isinstance(item, dict) else item}")
        else:
            click.echo(f"{indent}{key}: {value}")


def _one_line(d: dict) -> str:
    """A list entry that is a table (a mix's parent) on one line, a sha256 cut to 12 digits:
    `file a.safetensors, weight 0.7, sha256 0123456789ab, method baked`."""
    first = ("file", "weight", "sha256")
    items = sorted(d.items(), key=lambda kv: first.index(kv[0]) if kv[0] in first else len(first))
    return ", ".join(f"{k} {str(v)[:12] if k == 'sha256' else v}" for k, v in items if v is not None)


@cli.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def info(file: str, as_json: bool) -> None:
    """Describe a checkpoint or a state file (any format): architecture, dims, sha256, who can load it."""
    from .info import describe

    d = describe(file)
    if as_json:
        click.echo(json.dumps(d, indent=2, default=str))
    else:
        _print_info(d)


@cli.command()
@click.argument("state", type=click.Path(dir_okay=False))
@click.option("--model", "model", required=True, type=MODEL_PATH, help="The base model .pth (or hf://...).")
@click.option("--force", is_flag=True, help="Report problems but exit 0.")
def check(state: str, model: str, force: bool) -> None:
    """Does STATE fit the base model: layers, heads, head size, dtype, finite values, base-model sha256."""
    from .checkpoint import raise_if_nonfinite_weights, read_checkpoint
    from .formats import load_state

    spec, weights = read_checkpoint(model)
    raise_if_nonfinite_weights(weights, model)
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
@click.option("--format", "fmt", type=FORMAT, required=True,
              help="safetensors: ours, pth: Runner/PEFT/pip, ai00: Ai00, merged: the base model with the state in, "
                   "llama.cpp: a sequence state for llama_state_seq_set_data (with --gguf).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Output file.")
@click.option("--dtype", type=click.Choice(DTYPES),
              help="Tensor dtype, where the format has a choice: pth takes fp32 (its default), bf16 or fp16; "
                   "safetensors and merged are fp32, ai00 is fp16 (Ai00 reads nothing else).")
@click.option("--model", "model", type=MODEL_PATH,
              help="Base model: checked against, recorded in the output; required for --format merged.")
@_gguf_option
@click.option("--force", is_flag=True, help="Export even if the state does not fit --model (or --gguf's weights).")
def export(state: str, fmt: str, output: str, dtype: str | None, model: str | None, gguf: str | None,
           force: bool) -> None:
    """Convert STATE to another consumer's format (pth: Runner/PEFT/pip, ai00: Ai00, merged: pip v5/v6,
    llama.cpp: llama-cpp-python)."""
    from .checkpoint import read_spec
    from .formats import format_notes, load_state

    if fmt == "merged" and not model:
        raise InvalidOptionError("--format merged needs the base model: pass --model BASE.pth")
    s = load_state(state)
    if model:
        spec = read_spec(model)
        for p in s.check(spec, force=force):
            click.echo(f"warning: {p}", err=True)
        s = s.with_model(spec)
    _export(s, output, fmt, gguf, force, dtype=dtype, base_model=model)
    for note in format_notes(s, fmt):
        click.echo(f"note: {note}", err=True)
    click.echo(f"wrote {output} ({fmt})")


MAX_CONFIG_BYTES = 1 << 20  # a config file is a few hundred bytes; anything near this is not one


def _load_config(path: str) -> dict:
    """A --config file's settings, keys as TrainConfig spells them; any file that is not a small TOML file is
    refused in one line (its values are checked by TrainConfig.validate)."""
    import tomllib

    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise FileAccessError(f"{path}: cannot read ({e.strerror})") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise InvalidOptionError(f"{path}: larger than {MAX_CONFIG_BYTES >> 20} MiB, not a config file")
    try:
        return {k.replace("-", "_"): v for k, v in tomllib.loads(raw.decode("utf-8")).items()}
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise InvalidOptionError(f"{path}:{line}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise InvalidOptionError(f"{path}: not valid TOML ({str(e).splitlines()[0][:160]})") from None
    except RecursionError:
        raise InvalidOptionError(f"{path}: not valid TOML (nested too deeply)") from None


def _split_list(values: tuple[str, ...]) -> list[str]:
    return [v for item in values for v in item.split(",") if v]


@cli.command()
@click.option("--model", type=MODEL_PATH, help="Base model .pth (BlinkDL format, v5.2 / v6 / v7; or hf://...).")
@click.option("--data", multiple=True, help="Training data: .jsonl, .txt, binidx (.bin/.idx) or a folder. Repeatable.")
@click.option("--val-data", multiple=True, help="Held-out data, evaluated every --val-every steps.")
@click.option("--out", help="Output folder.  [default: runs/state]")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="A TOML file of these options.")
@click.option("--tokenizer", help="world | bytes | utf-16-le | path/to/tokenizer.json  [default: from the vocab]")
@click.option("--ctx-len", type=int, help="Tokens per sample.  [default: 512]")
@click.option("--micro-bsz", type=int, help="Samples per forward pass.  [default: 1]")
@click.option("--grad-accum", type=int, help="Micro-batches per optimizer step.  [default: 1]")
@click.option("--epochs", type=float, help="Passes over the data.  [default: 1]")
@click.option("--steps", type=int, help="Optimizer steps (overrides --epochs).")
@click.option("--lr-init", type=float, help="Peak learning rate.  [default: 1.0]")
@click.option("--lr-final", type=float, help="Learning rate at the last step.  [default: 0.01]")
@click.option("--warmup-steps", type=int, help="[default: 10]")
@click.option("--grad-clip", type=float, help="Gradient norm clip.  [default: 1.0]")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), help="Weights' dtype; the state is always fp32.")
@click.option("--quant", help=QUANT_HELP + "  [choices: int8, nf4]")
@click.option("--grad-checkpoint/--no-grad-checkpoint", default=None, help="Recompute activations (less memory).")
@click.option("--memory-budget", type=float,
              help="Peak memory in GiB (CPU): recompute as many layers as that needs.  [default: what is free]")
@click.option("--time-chunk", type=int,
              help="Exact long context: run forward and backward this many tokens at a time (memory of one chunk, "
                   "the full gradient).  [default: the whole sample]")
@click.option("--full-state/--no-full-state", default=None, help="Also learn the token-shift states.")
@click.option("--state-encoder/--no-state-encoder", default=None,
              help="Learn the state through a per-layer MLP (training only; the saved state is plain).")
@click.option("--encoder-lr-scale", type=float, help="Encoder learning rate relative to --lr-init.  [default: 0.03]")
@click.option("--seed", type=int, help="[default: 42]")
@click.option("--val-every", type=int, help="[default: 50]")
@click.option("--save-every", type=int, help="Checkpoint interval in steps.  [default: 50]")
@click.option("--device", help="auto | cpu | cuda  [default: auto]")
@click.option("--kernel", type=click.Choice(["auto", "torch", "cuda"]),
              help="WKV: auto = the C++ kernels on a CPU (built on first use), the torch path on a GPU; torch = the "
                   "torch path; cuda = the CUDA kernels (not yet verified on a GPU).  [default: auto]")
@click.option("--export", "exports", multiple=True, help="Also write consumer formats: pth, ai00 (comma-separated).")
@click.option("--report-to", "report_to", multiple=True,
              help="Also log each step to trackio, wandb or tensorboard (comma-separated; each needs its package).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--dry-run", is_flag=True, help="Check model, data and tokenizer, show a sample; train nothing.")
def train(config_file, resume, dry_run, exports, report_to, data, val_data, **options) -> None:
    """Learn the initial state of a frozen RWKV model on your data (state tuning)."""
    from .errors import InvalidOptionError
    from .training import TrainConfig, summary
    from .training import dry_run as describe_run
    from .training import train as run_training

    settings = _load_config(config_file) if config_file else {}
    given = {k: v for k, v in options.items() if v is not None}
    if data:
        given["data"] = list(data)
    if val_data:
        given["val_data"] = list(val_data)
    if exports:
        given["export"] = _split_list(exports)
    if report_to:
        given["report_to"] = _split_list(report_to)
    settings.update(given)
    for required in ("model", "data"):
        if not settings.get(required):
            raise InvalidOptionError(f"--{required} is required (on the command line or in --config)")
    settings["model"] = MODEL_PATH.convert(settings["model"], None, None)  # hf:// from a --config file too
    cfg = TrainConfig.from_dict(settings, config_file, file_keys=set(settings) - set(given))
    if dry_run:
        click.echo(describe_run(cfg, color=sys.stdout.isatty()))
        return
    result = run_training(cfg, resume=resume)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one summary
        click.echo(summary(result, cfg))


@cli.command("eval")
@click.option("--model", required=True, type=MODEL_PATH, help="Base model .pth (or hf://owner/repo/file.pth).")
@click.option("--state", "states", multiple=True, type=click.Path(dir_okay=False), help="Tuned state(s). Repeatable.")
@click.option("--data", "data", required=True, multiple=True, help="Held-out data (same formats as train).")
@click.option("--few-shot-data", help="Draw a few-shot prompt from this (training) data for the comparison row.")
@click.option("--shots", type=COUNT, default=3, show_default=True, help="Samples in the few-shot prompt.")
@click.option("--tokenizer", help="world | bytes | utf-16-le | tokenizer.json  [default: from the vocab]")
@click.option("--ctx-len", type=COUNT, default=512, show_default=True,
              help="Tokens per sample, as in training (longer samples are cut).")
@click.option("--force", is_flag=True, help="Evaluate a state made for another base model anyway.")
@_quant_option
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def eval_(model, states, data, few_shot_data, shots, tokenizer, ctx_len, force, quant, as_json) -> None:
    """Held-out loss and accuracy: the base model, a few-shot prompt, and each tuned state."""
    from .evaluate import compare

    rows = compare(model, list(data), list(states), few_shot_data, shots, tokenizer, ctx_len, force, quant)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'':<34} {'loss':>8} {'accuracy':>9} {'tokens':>8}")
    for r in rows:
        click.echo(f"{r['name']:<34} {r['loss']:>8.4f} {r['accuracy']:>9.2%} {r['n_tokens']:>8}")


@cli.command()
@click.option("--model", required=True, type=MODEL_PATH, help="Base model .pth (or hf://owner/repo/file.pth).")
@click.option("--state", "state_path", type=click.Path(dir_okay=False), help="A state: shown beside the base model.")
@click.option("--prompt", default="", help="Text to continue.")
@_sampling_options
@click.option("--samples", type=COUNT, default=1, show_default=True,
              help="Continuations of each (seeds SEED, SEED+1, ...).")
@click.option("--tokenizer", help="world | bytes | utf-16-le | tokenizer.json  [default: from the vocab]")
@click.option("--force", is_flag=True, help="Use a state made for another base model anyway.")
@_quant_option
def generate(model, state_path, prompt, samples, tokenizer, force, quant, **sampling) -> None:
    """Continue a prompt with the base model and, with --state, with the tuned state, side by side.
    The sampling defaults are the demo page's: the same seed and settings give the same text."""
    from .formats import load_state
    from .generate import DEFAULT_SAMPLING
    from .generate import generate as run
    from .model import load_model
    from .tokenizer import get_tokenizer

    m = load_model(model, quant=quant)
    tok = get_tokenizer(tokenizer, m.spec)
    state = None
    if state_path:
        state = load_state(state_path)
        for p in state.check(m.spec, force=force):
            click.echo(f"warning: {p}", err=True)
    if not prompt:
        raise InvalidOptionError("--prompt is empty: a model reads one token before it predicts one")
    tok.encode(prompt)  # text that is not valid Unicode fails here, before any output
    settings = DEFAULT_SAMPLING.but(**sampling)
    columns = [("base model", None)] + ([(f"state {state_path}", state)] if state else [])
    for name, st in columns:
        click.echo(f"--- {name}")
        for i in range(samples):
            text = run(m, tok, prompt, st, settings.but(seed=(settings.seed + i) % 2**32))
            click.echo(f"{prompt}{text}".replace("\n", "\n    ") if samples == 1 else f"[{i + 1}] {prompt}{text}")


@cli.command()
@click.option("--model", required=True, type=MODEL_PATH, help="Base model .pth (or hf://owner/repo/file.pth).")
@click.option("--prompt", help="The text to bake into a state.")
@click.option("--prompt-file", type=click.Path(dir_okay=False), help="Read the prompt from a file.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Output state.")
@click.option("--format", "fmt", type=FORMAT, default="safetensors", show_default=True,
              help="Output format (as in export); only safetensors keeps the token shift a baked state has.")
@_gguf_option
@click.option("--tokenizer", help="world | bytes | utf-16-le | tokenizer.json  [default: from the vocab]")
def bake(model, prompt, prompt_file, output, fmt, gguf, tokenizer) -> None:
    """Run a prompt through the model and save the state it leaves: a state without training."""
    from .formats import format_notes
    from .model import load_model
    from .tokenizer import get_tokenizer
    from .toolbox import bake as run

    if (prompt is None) == (prompt_file is None):
        raise InvalidOptionError("give exactly one of --prompt and --prompt-file")
    if prompt_file:
        try:
            prompt = open(prompt_file, encoding="utf-8").read()
        except (OSError, UnicodeDecodeError) as e:
            raise InvalidOptionError(f"{prompt_file}: cannot read as UTF-8 text ({e})") from None
    m = load_model(model)
    state = run(m, get_tokenizer(tokenizer, m.spec), prompt)
    _export(state, output, fmt, gguf, False, base_model=model if fmt == "merged" else None)
    for note in format_notes(state, fmt):
        click.echo(f"note: {note}", err=True)
    click.echo(f"wrote {output}: {state.metadata['training']['prompt_tokens']} prompt tokens baked into a "
               f"{state.dims()} state for {m.spec.name}")


@cli.command()
@click.argument("states", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--weights", required=True, help="Comma-separated, one per state, e.g. 0.7,0.3.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Output state (safetensors).")
def mix(states, weights, output) -> None:
    """A weighted combination of states made for the same base model."""
    from .formats import load_state, save_native
    from .toolbox import mix as run

    try:
        w = [float(x) for x in weights.split(",")]
    except ValueError:
        w = []
    if not w or not all(math.isfinite(x) for x in w):
        raise InvalidOptionError(f"--weights {weights[:80]}: expected finite numbers separated by commas")
    loaded = [load_state(s) for s in states]
    save_native(run(loaded, w), output)
    click.echo(f"wrote {output}: " + " + ".join(f"{x:g} x {s}" for x, s in zip(w, states, strict=True)))


@cli.command()
@click.argument("a", type=click.Path(dir_okay=False))
@click.argument("b", type=click.Path(dir_okay=False))
@click.option("--png", type=click.Path(dir_okay=False), help="Also save the table as a heatmap PNG.")
def diff(a, b, png) -> None:
    """Per-layer, per-head relative difference ||A - B|| / max(||A||, ||B||) of two states."""
    from .formats import load_state
    from .plot import save_heatmap
    from .toolbox import diff as run
    from .toolbox import diff_table

    d = run(load_state(a), load_state(b))
    click.echo(diff_table(d))
    if png:
        save_heatmap(d, png)
        click.echo(f"wrote {png}")


def _hub_options(f):
    """--token and --endpoint, the huggingface_hub way (defaults: `hf auth login` / HF_TOKEN, HF_ENDPOINT)."""
    f = click.option("--endpoint", help="Hub URL.  [default: $HF_ENDPOINT or https://huggingface.co]")(f)
    return click.option("--token", help="Hugging Face token.  [default: from `hf auth login` or $HF_TOKEN]")(f)


@cli.command()
@click.argument("state", type=click.Path(dir_okay=False))
@click.argument("repo_id")
@click.option("--model", metavar="MODEL",
              help="The base model (.pth or hf://owner/repo/file.pth): checked, and recorded in the repo.")
@click.option("--private", is_flag=True, help="Create the repo private.")
@click.option("--revision", help="Branch to commit to (created if missing).  [default: main]")
@click.option("--exports", default="pth,ai00", show_default=True,
              help="Consumer files uploaded beside the native one: pth, ai00 (comma-separated, '' for none).")
@click.option("--force", is_flag=True, help="Push a state that records another base model than --model.")
@_hub_options
def push(state, repo_id, model, private, revision, exports, force, token, endpoint) -> None:
    """Upload STATE to the Hub repo REPO_ID: state, exports, manifest and model card in one commit."""
    from .hub import push as run

    r = run(state, repo_id, model=model, private=private, revision=revision, exports=_split_list((exports,)),
            token=token, endpoint=endpoint, force=force)
    for w in r.warnings:
        click.echo(f"warning: {w}", err=True)
    click.echo(f"pushed {', '.join(r.files)} to {r.url} (commit {r.commit[:12]}), "
               f"for base model {r.base_model.label} sha256 {r.base_model.sha256[:12]}")


@cli.command()
@click.argument("repo_id")
@click.option("--model", metavar="MODEL",
              help="The base model you have (.pth or hf://owner/repo/file.pth): the state must be made for it.")
@click.option("--format", "fmt", type=_Choice([f for f in FORMATS if f not in FOR_ONE_MODEL], FORMAT_ALIASES),
              default="safetensors", show_default=True, help="Which of the repo's files: safetensors (ours), pth or "
              "ai00.")
@click.option("-o", "--output", type=click.Path(), help="Write the verified file here (a file or a folder).")
@click.option("--revision", help="Branch, tag or commit.  [default: main]")
@click.option("--force", is_flag=True, help="Use a state made for another base model anyway.")
@_hub_options
def pull(repo_id, model, fmt, output, revision, force, token, endpoint) -> None:
    """Download a state from REPO_ID, verify every byte, and check it was made for --model."""
    from .hub import pull_state

    r = pull_state(repo_id, model, fmt=fmt, output=output, revision=revision, force=force, token=token,
                   endpoint=endpoint)
    for w in r.warnings:
        click.echo(f"warning: {w}", err=True)
    if model is None:
        click.echo(f"note: no --model given; {repo_id} is made for sha256 {r.manifest['base_model_sha256']}, "
                   "not checked", err=True)
    click.echo(str(r.path))


@cli.command()
@click.option("--model", metavar="MODEL",
              help="A base model (.pth or hf://owner/repo/file.pth; a Hub model is not downloaded).")
@click.option("--sha256", help="The sha256 of the base model file.")
@click.option("--limit", type=COUNT, default=100, show_default=True, help="List at most this many states.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@_hub_options
def search(model, sha256, limit, as_json, token, endpoint) -> None:
    """List the states on the Hub made for exactly this base model (by its sha256, through the Hub's search)."""
    from dataclasses import asdict

    from .hub import search as run

    found = run(model, sha256=sha256, token=token, endpoint=endpoint, limit=limit)
    if as_json:
        click.echo(json.dumps([asdict(r) for r in found], indent=2, default=str))
        return
    if not found:
        click.echo("no states found for this base model", err=True)
        return
    click.echo(f"{'repo':<40} {'arch':<5} {'dims':<28} {'made for':<16} {'downloads':>9} {'likes':>5}  "
               "last modified")
    for r in found:
        when = r.last_modified.strftime("%Y-%m-%d") if r.last_modified else "?"
        made_for = "this file" if r.match == "file" else "same weights"
        click.echo(f"{r.repo_id:<40} {r.arch or '?':<5} {r.dims or '?':<28} {made_for:<16} {r.downloads or 0:>9} "
                   f"{r.likes or 0:>5}  {when}")


@cli.command()
@click.option("--arch", default="v7,v6", show_default=True, help="Comma-separated: v5.2, v6, v7.")
@click.option("--ctx", type=COUNT, default=512, show_default=True, help="Tokens per step (micro-batch 1).")
@click.option("--steps", type=COUNT, default=3, show_default=True, help="Timed steps per configuration.")
@click.option("--configs", default="naive,torch-fp32,fp32,torch-bf16,bf16,lean-fp32,lean-bf16", show_default=True,
              help="Comma-separated configurations to run.")
def bench(arch, ctx, steps, configs) -> None:
    """State-tuning speed and peak memory on this CPU against a naive baseline (benchmarks/train_speed.py)."""
    from .bench import CONFIGS, run

    chosen = _split_list((configs,))
    unknown = [c for c in chosen if c not in CONFIGS]
    if unknown:
        raise StateHubError(f"--configs {unknown[0]}: choose from {', '.join(CONFIGS)}")
    run(_split_list((arch,)), ctx, steps, chosen, out=lambda line: click.echo(line))


@cli.command()
@click.option("--model", metavar="MODEL", help="Base model .pth (or hf://owner/repo/file.pth).  [default: the "
                                                 "bundled example model, with the bundled states when --states is "
                                                 "not given]")
@click.option("--states", "states", multiple=True,
              help="A state file, a folder of them, a training run's folder (or a folder of runs), or a Hub "
                   "repo (owner/name). Repeatable.")
@click.option("--tokenizer", help="world | bytes | utf-16-le | tokenizer.json  [default: from the vocab]")
@click.option("--strategy", default="cpu fp32", show_default=True, help="rwkv pip strategy: one device, one dtype.")
@click.option("--host", help="Address to listen on.  [default: 127.0.0.1, or $GRADIO_SERVER_NAME]")
@click.option("--port", type=click.IntRange(1, 65535), help="Port.  [default: 7860, or $GRADIO_SERVER_PORT]")
@click.option("--share", is_flag=True, help="Also serve through a public gradio.live link.")
@click.option("--concurrency", type=COUNT, default=2, show_default=True, help="Requests run at once.")
def demo(model, states, tokenizer, strategy, host, port, share, concurrency) -> None:
    """The web page: the base model and a state side by side (chat, completion, inspect, bake, upload)."""
    from .demo import create_demo, launch_demo
    from .examples import example_model, example_states

    if model is None:  # the bundled example, with the states made for it: a page that works from any folder
        model, states = str(example_model()), states or (str(example_states()),)
    page = create_demo(model, list(states), tokenizer=tokenizer, strategy=strategy, concurrency=concurrency)
    for note in page.engine.skipped:
        click.echo(f"not offered: {note}", err=True)
    launch_demo(page, host=host, port=port, share=share)


def _add_plugin_commands() -> None:
    """`runner` and `ai00`: the consumers' command groups, defined beside their rules in plugins/."""
    from .plugins.ai00.cli import ai00
    from .plugins.rwkv_runner.cli import runner

    cli.add_command(runner)
    cli.add_command(ai00)


_add_plugin_commands()


def main() -> None:
    speak_cli()
    cli(prog_name="rwkv-state")


if __name__ == "__main__":
    sys.exit(main())

"""The demo's engine without its page: no gradio below it, the same text as `generate` for the same seed, one
entry per training run, and messages that name what the visitor gave (never a temporary path)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, random_state_like

from rwkv_state_hub import load_state, read_spec
from rwkv_state_hub.demo.engine import RUN_BEST, DemoEngine, new_session, sampling
from rwkv_state_hub.errors import InvalidOptionError, InvalidStateError, ModelMismatchError
from rwkv_state_hub.formats import export_state, save_native
from rwkv_state_hub.generate import DEFAULT_SAMPLING, Sampling, generate
from rwkv_state_hub.state import STATE_FILE
from rwkv_state_hub.training.checkpointing import CHECKPOINT
from rwkv_state_hub.training.config import EXPORT_NAMES

MODEL = REPO / "rwkv_state_hub" / "examples" / "models" / "tiny-rwkv-5v2-730K.pth"
EXAMPLE_STATES = REPO / "tests" / "fixtures"  # weather-5v2: a state for MODEL
WEATHER = "weather-5v2.safetensors"


@pytest.fixture(scope="module")
def engine() -> DemoEngine:
    engine = DemoEngine(MODEL, [str(EXAMPLE_STATES)])
    yield engine
    engine.close()


def test_the_engine_imports_no_gradio():
    """The engine (and its Markdown) can be used where gradio is not installed: nothing below it imports it."""
    code = ("import sys; import rwkv_state_hub.demo.engine, rwkv_state_hub.demo.render; "
            "from rwkv_state_hub.demo import DemoEngine, describe_state; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('gradio', 'gradio_client')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.parametrize("settings", [DEFAULT_SAMPLING.but(max_tokens=24), Sampling(max_tokens=24, seed=5),
                                      Sampling(max_tokens=24, seed=7, top_p=0.9, temperature=0.8)])
def test_completion_equals_generate_for_the_same_seed(engine, settings):
    """The page's two columns (the `rwkv` pip package) and generate() (our model, as `rwkv-state generate`
    runs it) draw the same tokens from the same seed and settings, with the state and without."""
    from rwkv_state_hub.model import load_model

    model = load_model(MODEL)
    *_, (base, tuned) = engine.complete("W", WEATHER, settings, new_session())
    assert tuned == "W" + generate(model, engine.tokenizer, "W", engine.states[WEATHER].state, settings)
    assert base == "W" + generate(model, engine.tokenizer, "W", None, settings)
    assert base != tuned


def test_chat_keeps_one_conversation_per_session_and_state(engine):
    session = new_session()
    greedy = Sampling(temperature=0, max_tokens=8)
    for message in ("Hi", "And then?"):
        *_, (base, tuned) = engine.chat(message, WEATHER, greedy, session)
    assert [m["content"] for m in base[0::2]] == ["Hi", "And then?"] and len(tuned) == 4
    *_, (base, _) = engine.chat("Hi", "weather-5v2.safetensors", greedy, new_session())
    assert len(base) == 2  # another session: its own conversation
    engine.clear_chat(session)
    assert session["chat"] is None


def test_bad_requests_are_typed(engine):
    with pytest.raises(InvalidOptionError, match="pick a state first"):
        next(engine.complete("W", None, DEFAULT_SAMPLING, None))
    with pytest.raises(InvalidOptionError, match="the prompt has 32001 characters"):
        next(engine.complete("x" * 32_001, WEATHER, DEFAULT_SAMPLING, None))
    with pytest.raises(InvalidOptionError, match="the message is empty"):
        next(engine.chat(" ", WEATHER, DEFAULT_SAMPLING, new_session()))
    with pytest.raises(InvalidOptionError, match="bad sampling setting"):
        sampling(1.0, 0.3, float("nan"), 0, 0, 0)


# ---------------------------------------------------------------- training runs


def _run_folder(folder: Path, seed: int, best: bool = True, final: bool = True) -> Path:
    """A run folder as `rwkv-state train --export pth,ai00 --val-data ...` leaves it (or one stopped early),
    written by the real writers: the final state, the best one, the final one as .pth and .st, a checkpoint."""
    folder.mkdir(parents=True)
    spec = read_spec(MODEL)
    state = random_state_like(spec, seed=seed, scale=0.5)
    if best:
        save_native(random_state_like(spec, seed=seed + 100, scale=0.5), folder / RUN_BEST)
    if final:
        save_native(state, folder / STATE_FILE)
        for fmt in ("pth", "ai00"):
            export_state(state, folder / EXPORT_NAMES[fmt], fmt)
    torch.save({"learned": {"wkv": state.wkv}, "optimizer": {}, "run": {"step": 2}}, folder / CHECKPOINT)
    return folder


def test_a_training_run_is_one_entry_named_after_its_folder(tmp_path):
    """A real `rwkv-state train` run folder (final and best states, .pth and .st exports, checkpoint.pt): one
    entry, named after the folder, for the final state; its card says the best one is there too."""
    from click.testing import CliRunner

    from rwkv_state_hub.cli import cli

    data = tmp_path / "weather.jsonl"
    data.write_text('{"text": "WEATHER. Oslo: snowy, -3 C."}\n{"text": "WEATHER. Lima: sunny, 20 C."}\n')
    run = tmp_path / "weather-run"
    r = CliRunner().invoke(cli, ["train", "--model", str(MODEL), "--data", str(data), "--val-data", str(data),
                                 "--steps", "2", "--ctx-len", "32", "--out", str(run), "--export", "pth,ai00"])
    assert r.exit_code == 0, r.output
    assert {STATE_FILE, RUN_BEST, CHECKPOINT, *EXPORT_NAMES.values()} <= {p.name for p in run.iterdir()}
    engine = DemoEngine(MODEL, [str(run)], prompts=["W"])
    assert list(engine.states) == ["weather-run"] and engine.skipped == []
    assert torch.equal(engine.states["weather-run"].state.wkv, load_state(run / STATE_FILE).wkv)  # not the best
    card = engine.card("weather-run", None)
    assert card.startswith("**state.safetensors** (the training run weather-run)") and RUN_BEST in card


def test_a_folder_of_runs_offers_each_run_once(tmp_path):
    runs = tmp_path / "runs"
    _run_folder(runs / "a", seed=1)
    _run_folder(runs / "b", seed=2, final=False)  # stopped before its final state: its best one
    _run_folder(runs / "c", seed=3, best=False, final=False)  # only a checkpoint so far
    save_native(random_state_like(read_spec(MODEL), seed=4, scale=0.5), runs / "loose.safetensors")
    engine = DemoEngine(MODEL, [str(runs)], prompts=["W"])
    assert list(engine.states) == ["a", "b", "loose.safetensors"]
    assert torch.equal(engine.states["b"].state.wkv, load_state(runs / "b" / RUN_BEST).wkv)
    assert engine.skipped == [f"{runs / 'c'}: a training run with no state yet (only {CHECKPOINT}, its "
                              "resume file)"]


def test_a_training_checkpoint_is_not_a_state(tmp_path):
    run = _run_folder(tmp_path / "run", seed=1)
    engine = DemoEngine(MODEL, [str(run / CHECKPOINT)], prompts=["W"])
    assert engine.states == {}
    assert engine.skipped == [f"{run / CHECKPOINT}: a training checkpoint (resume file), not a state"]


# ---------------------------------------------------------------- uploads


def test_upload_messages_name_the_file_not_its_path(engine, tmp_path):
    """An upload arrives under a temporary path: every answer names the file as the visitor named it."""
    spec = read_spec(MODEL)
    junk = tmp_path / "tmp-0123" / "upload"
    junk.parent.mkdir()
    junk.write_bytes(b"not a state")
    with pytest.raises(InvalidStateError) as e:
        engine.load_upload(junk, new_session(), name="mine.pth")
    assert str(e.value) == "mine.pth: neither safetensors nor a PyTorch file" and str(tmp_path) not in str(e.value)
    other = random_state_like(spec, seed=3)
    other.metadata.update(base_model_sha256="ab" * 32, base_model_name="RWKV-x060-World-1B6",
                          base_model_fingerprint=None)
    save_native(other, junk)
    with pytest.raises(ModelMismatchError, match="^theirs.safetensors: made for RWKV-x060-World-1B6"):
        engine.load_upload(junk, new_session(), name="theirs.safetensors")
    save_native(random_state_like(spec, seed=4, scale=0.5), junk)
    session = new_session()
    label, notes = engine.load_upload(junk, session, name="ok.safetensors")
    assert label == "upload: ok.safetensors" and engine.labels(session)[-1] == label
    assert engine.card(label, session).startswith("**ok.safetensors** (uploaded ok.safetensors)")

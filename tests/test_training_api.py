"""train_state: a state from a loaded model in a notebook, sharing train()'s loop; nothing written unless asked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import REPO

import rwkv_state_hub
from rwkv_state_hub import InvalidDataError, InvalidOptionError, OutputExistsError, load_model, load_state
from rwkv_state_hub.checkpoint import read_checkpoint
from rwkv_state_hub.errors import speak_cli
from rwkv_state_hub.model import build_model
from rwkv_state_hub.training import TrainConfig, train, train_state

MODEL = REPO / "rwkv_state_hub" / "examples" / "models" / "tiny-rwkv-5v2-730K.pth"
TRAIN = REPO / "examples" / "data" / "train.jsonl"
VAL = REPO / "examples" / "data" / "val.jsonl"
CONFIG = TrainConfig(steps=3, micro_bsz=2, seed=4, save_every=2, val_every=3)


def records(path: Path, n: int) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()[:n]]


@pytest.fixture(scope="module")
def model():
    return load_model(MODEL, dtype=torch.float32)


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_train_state_from_records_writes_nothing_and_repeats(model, tmp_path, monkeypatch):
    """A notebook cell run twice: the same state both times, no file anywhere, the model left as it was."""
    monkeypatch.chdir(tmp_path)
    assert rwkv_state_hub.train_state is train_state and rwkv_state_hub.TrainConfig is TrainConfig
    data, val = records(TRAIN, 12), records(VAL, 4)
    model.gradient_checkpointing = False
    first = train_state(model, data, TrainConfig(steps=3, micro_bsz=2, grad_checkpoint=True), val_data=val,
                        progress=False)
    again = train_state(model, data, TrainConfig(steps=3, micro_bsz=2, grad_checkpoint=True), val_data=val,
                        progress=False)
    assert torch.equal(first.wkv, again.wkv) and first.wkv.abs().max() > 0
    assert files_under(tmp_path) == []
    assert model.recompute_layers == 0  # grad_checkpoint held for the run only
    meta = first.metadata
    assert meta["base_model_sha256"] == model.spec.sha256 and meta["tokenizer"] == "bytes"
    t = meta["training"]
    assert t["steps"] == 3 and t["tokens_seen"] > 0 and t["final_val_loss"] is not None
    assert t["hyperparameters"]["micro_bsz"] == 2 and t["hyperparameters"]["grad_checkpoint"] is True
    assert [m["step"] for m in first.metrics] == [1, 2, 3] and "val_loss" in first.metrics[-1]  # for loss.png


def test_train_state_equals_train_and_writes_what_train_writes(model, tmp_path):
    """The same data file and options: train(cfg) (model path) and train_state(model) learn the same state,
    and with out= write the same files; a second call into that folder needs resume=True."""
    speak_cli(False)
    by_cli = train(TrainConfig(**{**vars(CONFIG), "model": str(MODEL), "data": [str(TRAIN)],
                                  "val_data": [str(VAL)], "out": str(tmp_path / "cli")}), progress=False)
    by_api = train_state(model, TRAIN, CONFIG, val_data=[VAL], out=tmp_path / "api", progress=False)
    assert torch.equal(by_cli.state.wkv, by_api.wkv)
    assert files_under(tmp_path / "cli") == files_under(tmp_path / "api")
    assert torch.equal(load_state(tmp_path / "api" / "state.safetensors").wkv, by_api.wkv)
    with pytest.raises(OutputExistsError, match=r"holds a run already; pass resume=True .* another out$"):
        train_state(model, TRAIN, CONFIG, out=tmp_path / "api", progress=False)
    with pytest.raises(InvalidOptionError, match=r"resume=True"):
        train_state(model, TRAIN, CONFIG, resume=True, progress=False)  # nothing to resume without out=


def test_train_state_resumes_a_longer_run(model, tmp_path):
    short = train_state(model, TRAIN, CONFIG, out=tmp_path / "run", progress=False)
    whole = train_state(model, TRAIN, CONFIG, progress=False)
    assert torch.equal(short.wkv, whole.wkv)
    again = train_state(model, TRAIN, CONFIG, out=tmp_path / "run", resume=True, progress=False)
    assert torch.equal(again.wkv, whole.wkv)  # a finished run resumed changes nothing


def test_train_state_builds_the_state_in_the_models_dtype(tmp_path):
    """A float64 model (gradient checks use one): the learned state follows it; the State is saved as fp32."""
    spec, weights = read_checkpoint(MODEL)
    model = build_model(spec, weights, dtype=torch.float64, compute_dtype=torch.float64)
    state = train_state(model, records(TRAIN, 4), TrainConfig(steps=1), progress=False)
    assert state.wkv.dtype == torch.float32 and torch.isfinite(state.wkv).all() and state.wkv.abs().max() > 0


def test_train_state_refuses_bad_data_with_one_line(model, tmp_path):
    speak_cli(False)
    with pytest.raises(InvalidDataError, match="either paths or records"):
        train_state(model, [str(TRAIN), {"text": "hi"}], CONFIG, progress=False)
    with pytest.raises(InvalidDataError, match=r"data\[1\]: not a record"):
        train_state(model, [{"text": "ok"}, {"text": float("nan")}], CONFIG, progress=False)
    with pytest.raises(InvalidDataError, match=r"records.jsonl:2"):  # what data.py says of a bad record
        train_state(model, [{"text": "a fine one"}, {"txt": "misspelt"}], CONFIG, progress=False)
    with pytest.raises(InvalidOptionError, match="^data is required$"):
        train_state(model, [], CONFIG, progress=False)

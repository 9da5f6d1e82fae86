"""report_to: every step's numbers reach tensorboard, wandb or trackio; a missing package is refused up front."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import REPO

from rwkv_state_hub import InvalidOptionError, load_model
from rwkv_state_hub.cli import cli
from rwkv_state_hub.errors import speak_cli
from rwkv_state_hub.training import TrainConfig, train, train_state

MODEL = REPO / "rwkv_state_hub" / "examples" / "models" / "tiny-rwkv-5v2-730K.pth"
TRAIN = REPO / "examples" / "data" / "train.jsonl"
VAL = REPO / "examples" / "data" / "val.jsonl"
LOGGED = {"loss", "lr", "grad_norm", "tokens", "tokens_per_s"}


def small(tmp_path: Path, source: Path = TRAIN, n: int = 8) -> Path:
    path = tmp_path / source.name
    path.write_text("\n".join(source.read_text().splitlines()[:n]) + "\n")
    return path


def config(tmp_path: Path, report_to: list[str], **kw) -> TrainConfig:
    return TrainConfig(model=str(MODEL), data=[str(small(tmp_path))], val_data=[str(small(tmp_path, VAL, 4))],
                       out=str(tmp_path / "run"), steps=3, micro_bsz=2, val_every=2, report_to=report_to, **kw)


def test_tensorboard_event_file_holds_every_logged_number(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install tensorboard)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = config(tmp_path, ["tensorboard"])
    train(cfg, progress=False)
    metrics = [json.loads(line) for line in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(Path(cfg.out) / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert LOGGED | {"val_loss", "val_accuracy"} <= tags
    for tag in LOGGED:
        logged = events.Scalars(tag)
        assert [e.step for e in logged] == [1, 2, 3]
        assert [e.value for e in logged] == pytest.approx([m[tag] for m in metrics], rel=1e-6)
    assert [e.step for e in events.Scalars("val_loss")] == [2, 3]  # val_every 2, and the last step
    assert [e.value for e in events.Scalars("val_loss")] == pytest.approx([metrics[1]["val_loss"],
                                                                           metrics[2]["val_loss"]], rel=1e-6)


class FakeTracker:
    """Stands in for the wandb or trackio module: records every call."""

    def __init__(self):
        self.calls: list[tuple] = []

    def module(self, name: str, run_object: bool) -> types.ModuleType:
        m = types.ModuleType(name)
        calls = self.calls

        def init(**kw):
            calls.append(("init", kw))
            return m if run_object else None

        m.init = init
        m.log = lambda numbers, step=None: calls.append(("log", dict(numbers), step))
        m.finish = lambda: calls.append(("finish",))
        return m


@pytest.mark.parametrize("name", ["wandb", "trackio"])
def test_wandb_and_trackio_receive_every_step(tmp_path, monkeypatch, name):
    fake = FakeTracker()
    monkeypatch.setitem(sys.modules, name, fake.module(name, run_object=name == "wandb"))
    cfg = config(tmp_path, [name])
    train(cfg, progress=False)
    kinds = [c[0] for c in fake.calls]
    assert kinds == ["init", "log", "log", "log", "finish"]
    init = fake.calls[0][1]
    assert init["project"] == "rwkv-state-hub" and init["name"] == "run" and init["config"]["steps"] == 3
    logs = [c for c in fake.calls if c[0] == "log"]
    assert [step for _, _, step in logs] == [1, 2, 3]
    assert all(LOGGED <= set(numbers) for _, numbers, _ in logs)
    assert "val_loss" in logs[1][1] and "val_accuracy" in logs[1][1] and "val_loss" not in logs[0][1]


def test_train_state_reports_too(tmp_path, monkeypatch):
    fake = FakeTracker()
    monkeypatch.setitem(sys.modules, "wandb", fake.module("wandb", run_object=True))
    monkeypatch.chdir(tmp_path)
    model = load_model(MODEL)
    train_state(model, [{"text": "WEATHER. Oslo: rain. END."}] * 4, TrainConfig(steps=2, report_to=["wandb"]),
                progress=False)
    assert [c[0] for c in fake.calls] == ["init", "log", "log", "finish"]
    assert list(tmp_path.iterdir()) == []  # no out=: wandb got the numbers, the disk nothing of ours


@pytest.mark.parametrize("name,package", [("wandb", "wandb"), ("trackio", "trackio"),
                                          ("tensorboard", "tensorboard")])
def test_a_missing_tracker_is_refused_before_training(tmp_path, monkeypatch, name, package):
    speak_cli(False)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard" if name == "tensorboard" else name, None)
    cfg = config(tmp_path, [name])
    with pytest.raises(InvalidOptionError, match=rf"^report_to=\['{name}'\]: {name} is not installed; "
                                                 rf"pip install {package}$"):
        train(cfg, progress=False)
    assert not Path(cfg.out).exists()


def test_an_unknown_tracker_is_one_line(tmp_path):
    speak_cli(False)
    with pytest.raises(InvalidOptionError, match=r"^report_to=\['mlflow'\]: unknown tracker 'mlflow'; choose from "):
        TrainConfig(report_to=["mlflow"]).validate()
    assert TrainConfig.from_dict({"report_to": "wandb,tensorboard"}).report_to == ["wandb", "tensorboard"]
    r = CliRunner().invoke(cli, ["train", "--model", str(MODEL), "--data", str(small(tmp_path)), "--report-to",
                                 "mlflow", "--out", str(tmp_path / "run")])
    assert r.exit_code == 1 and "--report-to mlflow: unknown tracker 'mlflow'" in r.output
    assert not (tmp_path / "run").exists()

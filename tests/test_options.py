"""Issue 16, items 3, 4 and 6 (train): every option and config field is checked in one place before any work,
a run stops cleanly when its numbers stop being finite, and a bad checkpoint on --resume is one line."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import REPO

from rwkv_state_hub import TrainingDiverged
from rwkv_state_hub.cli import cli
from rwkv_state_hub.errors import InvalidOptionError, speak_cli
from rwkv_state_hub.training import TrainConfig, train

MODEL = REPO / "rwkv_state_hub" / "examples" / "models" / "tiny-rwkv-5v2-730K.pth"
TRAIN = REPO / "examples" / "data" / "train.jsonl"


@pytest.fixture
def small(tmp_path) -> Path:
    path = tmp_path / "small.jsonl"
    path.write_text("\n".join(TRAIN.read_text().splitlines()[:8]) + "\n")
    return path


def one_line_error(args: list[str], code: int = 1) -> str:
    """Run the CLI; it must fail with `code` and end with exactly one line of error (after a progress bar, or
    click's usage lines for a value click itself refused), never a traceback."""
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == code, (r.exit_code, r.output, r.exception)
    assert "Traceback" not in r.output and not (r.exception and not isinstance(r.exception, SystemExit))
    errors = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and r.output.rstrip().splitlines()[-1] == errors[0], r.output
    return errors[0].removeprefix("Error: ")


# ---------------------------------------------------------------- train: options on the command line


@pytest.mark.parametrize("option,value,words", [
    ("--save-every", "0", "--save-every 0: must be at least 1"),
    ("--val-every", "0", "--val-every 0: must be at least 1"),
    ("--micro-bsz", "0", "--micro-bsz 0: must be at least 1"),
    ("--micro-bsz", "-1", "--micro-bsz -1: must be at least 1"),
    ("--grad-accum", "0", "--grad-accum 0: must be at least 1"),
    ("--ctx-len", "0", "--ctx-len 0: must be at least 1"),
    ("--epochs", "nan", "--epochs nan: must be a finite number"),
    ("--epochs", "0", "--epochs 0.0: must be greater than 0"),
    ("--lr-init", "inf", "--lr-init inf: must be a finite number"),
    ("--lr-final", "-1", "--lr-final -1.0: must be greater than 0"),
    ("--grad-clip", "0", "--grad-clip 0.0: must be greater than 0"),
    ("--grad-clip", "nan", "--grad-clip nan: must be a finite number"),
    ("--warmup-steps", "-1", "--warmup-steps -1: must be at least 0"),
    ("--memory-budget", "inf", "--memory-budget inf: must be a finite number"),
    ("--encoder-lr-scale", "0", "--encoder-lr-scale 0.0: must be greater than 0"),
    ("--seed", "-1", "--seed -1: must be at least 0"),
    ("--seed", str(2**64), f"--seed {2**64}: must be at most {2**32 - 1}"),
    ("--device", "tpu", "--device tpu: choose auto, cpu, cuda or cuda:N"),
    ("--tokenizer", "no-such-tokenizer", "--tokenizer no-such-tokenizer: expected world, bytes"),
    ("--export", "gguf", "--export gguf: unknown format 'gguf'"),
])
def test_a_bad_train_option_is_one_line_before_any_work(tmp_path, small, option, value, words):
    out = tmp_path / "run"
    message = one_line_error(["train", "--model", str(MODEL), "--data", str(small), "--out", str(out), "--steps", "2",
                              option, value])
    assert message.startswith(words)
    assert not out.exists()  # refused before the model was read or the output folder made


def test_refused_before_the_model_is_read(tmp_path):
    """The options are checked first: a missing model is not even looked at. From Python the message names
    the field as Python writes it (the command line names the flag: see the tests above)."""
    speak_cli(False)
    with pytest.raises(InvalidOptionError, match=r"^micro_bsz=0: must be at least 1$"):
        train(TrainConfig(model=str(tmp_path / "missing.pth"), data=["d"], micro_bsz=0), progress=False)
    with pytest.raises(InvalidOptionError, match=r"^beta2=1.0: must be less than 1$"):
        TrainConfig(model="m", data=["d"], beta2=1.0).validate()
    with pytest.raises(InvalidOptionError, match=r"^data=\[''\]: expected a list of non-empty strings$"):
        TrainConfig(model="m", data=[""]).validate()
    with pytest.raises(InvalidOptionError, match=r"^lr_final=0: must be greater than 0 \(.*small lr_final such"):
        TrainConfig(lr_final=0).validate()
    with pytest.raises(InvalidOptionError, match=r"^model is required$"):  # train() needs a model path
        train(TrainConfig(data=["d"]), progress=False)


def test_every_field_has_exactly_one_rule():
    from rwkv_state_hub.training.config import _RULES

    assert list(_RULES) == [f.name for f in fields(TrainConfig)]
    TrainConfig().validate()  # the defaults pass their own rules


# ---------------------------------------------------------------- train: a --config file


def write_config(tmp_path: Path, small: Path, extra: str) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(f'model = "{MODEL}"\ndata = ["{small}"]\nout = "{tmp_path / "run"}"\nsteps = 2\n{extra}\n')
    return path


@pytest.mark.parametrize("line,words", [
    ('ctx_len = "512"', 'ctx_len = "512": expected an integer'),
    ("epochs = true", "epochs = true: expected a number"),
    ("micro_bsz = 1.5", "micro_bsz = 1.5: expected an integer"),
    ("lr_init = nan", "lr_init = nan: must be a finite number"),
    ("beta1 = -0.5", "beta1 = -0.5: must be at least 0"),
    ("grad_checkpoint = 1", "grad_checkpoint = 1: expected true or false"),
    ('precision = "fp8"', 'precision = "fp8": choose from fp32, bf16'),
    ("export = [1]", "export = [1]: expected a list of non-empty strings"),
    ("seed = 1979-05-27", 'seed = "1979-05-27": expected an integer'),
    ("memory_budget = {a = 1}", 'memory_budget = {"a": 1}: expected a number'),
])
def test_a_wrongly_typed_config_value_is_one_line_naming_the_key(tmp_path, small, line, words):
    config = write_config(tmp_path, small, line)
    assert one_line_error(["train", "--config", str(config)]) == f"{config}: {words}"
    assert not (tmp_path / "run").exists()


def test_data_of_the_wrong_type_in_a_config_file(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(f'model = "{MODEL}"\ndata = 5\n')
    message = one_line_error(["train", "--config", str(config)])
    assert message == f"{config}: data = 5: expected a list of non-empty strings"


def test_an_option_given_on_the_command_line_is_named_as_an_option(tmp_path, small):
    """The file says micro_bsz = 2, the command line overrides it with 0: the message names the option."""
    config = write_config(tmp_path, small, "micro_bsz = 2")
    assert one_line_error(["train", "--config", str(config), "--micro-bsz", "0"]) == "--micro-bsz 0: must be at least 1"


@pytest.mark.parametrize("content,words", [
    (b"a = " + b"[" * 5000 + b"]" * 5000, "not valid TOML (nested too deeply)"),
    (b'model = "\xff"\n', "1: not UTF-8 text"),
    (b"# x\n" * 300_000, "larger than 1 MiB, not a config file"),
])
def test_a_config_file_that_is_not_a_small_toml_file_is_one_line(tmp_path, content, words):
    config = tmp_path / "run.toml"
    config.write_bytes(content)
    assert words in one_line_error(["train", "--config", str(config)])


# ---------------------------------------------------------------- other commands' numbers


@pytest.mark.parametrize("args,option", [
    (["generate", "--prompt", "hi", "--temperature", "nan"], "--temperature"),
    (["generate", "--prompt", "hi", "--temperature", "-1"], "--temperature"),
    (["generate", "--prompt", "hi", "--top-p", "inf"], "--top-p"),
    (["generate", "--prompt", "hi", "--top-p", "nan"], "--top-p"),
    (["generate", "--prompt", "hi", "--max-tokens", "0"], "--max-tokens"),
    (["generate", "--prompt", "hi", "--samples", "0"], "--samples"),
    (["generate", "--prompt", "hi", "--seed", "-1"], "--seed"),
    (["eval", "--data", "d.jsonl", "--shots", "0"], "--shots"),
    (["eval", "--data", "d.jsonl", "--ctx-len", "-5"], "--ctx-len"),
])
def test_numeric_options_of_model_commands_are_refused_by_range(args, option):
    message = one_line_error([*args, "--model", str(MODEL)], code=2)
    assert option in message


@pytest.mark.parametrize("args,option", [
    (["search", "--sha256", "0" * 64, "--limit", "0", "--endpoint", "http://127.0.0.1:9"], "--limit"),
    (["bench", "--ctx", "0"], "--ctx"),
    (["bench", "--steps", "-1"], "--steps"),
    (["demo", "--model", "missing.pth", "--port", "0"], "--port"),
    (["demo", "--model", "missing.pth", "--port", "70000"], "--port"),
    (["demo", "--model", "missing.pth", "--concurrency", "0"], "--concurrency"),
])
def test_numeric_options_of_other_commands_are_refused_by_range(args, option):
    assert option in one_line_error(args, code=2)


@pytest.mark.parametrize("weights", ["nan,0.5", "0.5,inf", "0.5,", "x"])
def test_mix_weights_must_be_finite_numbers(tmp_path, weights):
    message = one_line_error(["mix", "a.pth", "b.pth", "--weights", weights, "-o", str(tmp_path / "m.safetensors")])
    assert message == f"--weights {weights}: expected finite numbers separated by commas"


def test_a_temperature_so_small_that_it_overflows_samples_greedily():
    from rwkv_state_hub.generate import sample_token

    logits = torch.tensor([1.0, 5.0, 2.0])
    assert sample_token(logits, 1e-40, 0.9, torch.Generator().manual_seed(0)) == 1


# ---------------------------------------------------------------- train: a run whose numbers stop being finite


def test_a_diverging_run_stops_with_one_line_and_writes_no_state(tmp_path, small):
    """lr 1e30: the first update leaves a state of ~1e30, whose loss is NaN. Before: "Done" with a NaN state."""
    out = tmp_path / "run"
    message = one_line_error(["train", "--model", str(MODEL), "--data", str(small), "--out", str(out), "--steps", "4",
                              "--lr-init", "1e30", "--warmup-steps", "0", "--save-every", "1"])
    assert message.startswith("step 2: the loss is nan; stopped without saving it, the last good checkpoint, ")
    assert "(step 1), is kept" in message and "lower --lr-init (now 1e+30)" in message
    assert not (out / "state.safetensors").exists()
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck["run"]["step"] == 1 and torch.isfinite(ck["learned"]["wkv"]).all()


def test_a_nan_loss_keeps_the_last_good_checkpoint(tmp_path, small, monkeypatch):
    """A NaN loss at step 3: the step-2 checkpoint stays byte for byte, no state or export is written."""
    from rwkv_state_hub.training import step as step_module

    speak_cli(False)
    real = step_module.batch_loss
    calls = {"n": 0}

    def nan_from_step_3(model, batch, state):
        calls["n"] += 1
        loss, correct = real(model, batch, state)
        return (loss * math.nan if calls["n"] > 2 else loss), correct

    monkeypatch.setattr(step_module, "batch_loss", nan_from_step_3)
    cfg = TrainConfig(model=str(MODEL), data=[str(small)], out=str(tmp_path / "run"), steps=4, save_every=2,
                      export=["pth"], seed=1)
    with pytest.raises(TrainingDiverged, match=r"^step 3: the loss is nan; .*checkpoint.pt \(step 2\), is kept. "
                                               r"Try a lower lr_init \(now 1\) in a new out$"):
        train(cfg, progress=False)
    out = Path(cfg.out)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["run"]["step"] == 2
    assert not (out / "state.safetensors").exists() and not (out / "state.pth").exists()
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_a_state_made_non_finite_by_the_update_stops_the_run(tmp_path, small, monkeypatch):
    """The loss and gradient are finite but the update overflows the state (Adam's step made infinite)."""
    from rwkv_state_hub.training.adam import Adam

    real_step = Adam.step

    def overflowing_step(self):
        real_step(self)
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    p.mul_(math.inf)

    monkeypatch.setattr(Adam, "step", overflowing_step)
    cfg = TrainConfig(model=str(MODEL), data=[str(small)], out=str(tmp_path / "run"), steps=2, seed=1)
    with pytest.raises(TrainingDiverged, match=r"^step 1: after the update the learned state is not finite; .*"
                                              r"no checkpoint had been written yet"):
        train(cfg, progress=False)
    assert not (Path(cfg.out) / "checkpoint.pt").exists() and not (Path(cfg.out) / "state.safetensors").exists()


# ---------------------------------------------------------------- train --resume with a bad checkpoint


def _edited(edit):
    def write(good: Path, target: Path) -> None:
        ck = torch.load(good, weights_only=True)
        edit(ck)
        torch.save(ck, target)
    return write


def _set(path: tuple, value):
    def edit(ck):
        d = ck
        for key in path[:-1]:
            d = d[key]
        d[path[-1]] = value
    return _edited(edit)


RESUME_CASES = {
    "truncated": (lambda good, t: t.write_bytes(good.read_bytes()[:2000]), "not a readable PyTorch checkpoint"),
    "random bytes": (lambda good, t: t.write_bytes(bytes(range(256)) * 20), "not a readable PyTorch checkpoint"),
    "a model file": (lambda good, t: shutil.copy(MODEL, t), "not a checkpoint of rwkv-state train"),
    "a list": (lambda good, t: torch.save([1, 2], t), "not a checkpoint of rwkv-state train"),
    "no optimizer": (_edited(lambda ck: ck.pop("optimizer")), "not a checkpoint of rwkv-state train"),
    "learned keys": (_set(("learned",), {"junk": torch.zeros(3)}), 'does not fit this run (Error(s) in loading'),
    "learned shape": (_set(("learned", "wkv"), torch.zeros(2, 2)), "does not fit this run (Error(s) in loading"),
    "step as text": (_set(("run", "step"), "7"), "damaged progress record"),
    "negative step": (_set(("run", "step"), -3), "damaged progress record"),
    "config as list": (_set(("config",), [1]), "not a checkpoint of rwkv-state train"),
    "rng": (_set(("rng",), torch.zeros(3)), "does not fit this run (RNG state must be a torch.ByteTensor)"),
    "moments": (_set(("optimizer", "state", 0, "exp_avg"), torch.zeros(2)), "the optimizer's record does not match"),
    "nan state": (_set(("learned", "wkv"), torch.full((12, 8, 8, 8), math.nan)), "are not finite"),
}


def test_a_bad_checkpoint_on_resume_is_one_line_naming_it(tmp_path, small):
    args = ["train", "--model", str(MODEL), "--data", str(small), "--out", str(tmp_path / "run"), "--steps", "3",
            "--save-every", "1", "--seed", "1"]
    cfg = TrainConfig(model=str(MODEL), data=[str(small)], out=str(tmp_path / "run"), steps=1, seed=1, save_every=1)
    train(cfg, progress=False)  # a good checkpoint of a one-step run, made with other --steps
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    good = tmp_path / "good.pt"
    ck = torch.load(checkpoint, weights_only=True)
    ck["config"]["steps"] = 3  # as if made by `args`, so that only the damage differs
    torch.save(ck, good)
    shutil.copy(good, checkpoint)
    assert CliRunner().invoke(cli, [*args, "--steps", "2", "--resume"]).exit_code == 1  # other options: refused
    for name, (damage, words) in RESUME_CASES.items():
        damage(good, checkpoint)
        message = one_line_error([*args, "--resume"])
        assert message.startswith(f"{checkpoint}: ") and words in message, (name, message)
        assert "start a new --out" in message, name
    shutil.copy(good, checkpoint)
    r = CliRunner().invoke(cli, [*args, "--resume"])  # the good one still resumes
    assert r.exit_code == 0, r.output
    assert torch.load(checkpoint, weights_only=True)["run"]["step"] == 3

"""Nothing non-finite is ever written: mix and bake refuse NaN/inf, diff shows it, check and info report a
model whose weights hold it."""

from __future__ import annotations

import numpy as np
import torch
from click.testing import CliRunner
from PIL import Image

from rwkv_state_hub.cli import cli
from rwkv_state_hub.formats import save_native
from rwkv_state_hub.plot import NONFINITE_GREY
from rwkv_state_hub.random_model import random_checkpoint, save_checkpoint
from rwkv_state_hub.state import State


def _states(tmp_path):
    g = torch.Generator().manual_seed(0)
    good = torch.randn(2, 3, 64, 64, generator=g)
    bad = good.clone()
    bad[1, 2, 5, 7] = float("nan")
    torch.save({f"blocks.{i}.att.time_state": bad[i] for i in range(2)}, tmp_path / "nan.pth")
    save_native(State(good), tmp_path / "good.safetensors")
    return tmp_path / "nan.pth", tmp_path / "good.safetensors"


def _one_line(result) -> str:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def test_mix_refuses_a_nan_state_and_writes_nothing(tmp_path):
    nan, good = _states(tmp_path)
    for fmt in ("m.safetensors", "m.pth"):
        r = CliRunner().invoke(cli, ["mix", str(nan), str(good), "--weights", "0.5,0.5", "-o", str(tmp_path / fmt)])
        line = _one_line(r)
        assert str(nan) in line and "non-finite" in line
        assert not (tmp_path / fmt).exists()


def test_mix_refuses_weights_that_are_not_finite(tmp_path):
    _, good = _states(tmp_path)
    for w in ("nan,0.5", "inf,1", "1,-inf"):
        r = CliRunner().invoke(cli, ["mix", str(good), str(good), "--weights", w, "-o", str(tmp_path / "m.st")])
        assert "finite" in _one_line(r)
        assert not (tmp_path / "m.st").exists()


def test_diff_of_a_nan_state_shows_it(tmp_path):
    nan, good = _states(tmp_path)
    png = tmp_path / "d.png"
    r = CliRunner().invoke(cli, ["diff", str(good), str(nan), "--png", str(png)])
    assert r.exit_code == 0, r.output
    rows = r.output.splitlines()
    assert "nan" in rows[2] and "nan" not in rows[1]  # layer 1 holds the NaN, layer 0 does not
    pixels = {tuple(p) for p in np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3).tolist()}
    assert NONFINITE_GREY in pixels


def test_a_model_with_nan_weights_is_reported_and_cannot_bake(tmp_path):
    weights = random_checkpoint("v7", n_layer=2, n_embd=128, vocab_size=256, seed=3)
    weights["blocks.1.att.key.weight"][3, 4] = float("inf")
    save_checkpoint(weights, tmp_path / "inf.pth")
    _, good = _states(tmp_path)
    info = CliRunner().invoke(cli, ["info", str(tmp_path / "inf.pth")])
    assert "blocks.1.att.key.weight" in info.output, info.output
    check = CliRunner().invoke(cli, ["check", str(good), "--model", str(tmp_path / "inf.pth"), "--force"])
    assert "blocks.1.att.key.weight" in check.output, check.output
    out = tmp_path / "baked.safetensors"
    r = CliRunner().invoke(cli, ["bake", "--model", str(tmp_path / "inf.pth"), "--prompt", "hello there",
                                 "--tokenizer", "bytes", "-o", str(out)])
    assert "non-finite" in _one_line(r)
    assert not out.exists()

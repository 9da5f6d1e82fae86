"""`rwkv-state eval` and `generate`: the table is computed from real losses, the sampling is sound."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO

from rwkv_state_hub import load_model
from rwkv_state_hub.data import load_dataset
from rwkv_state_hub.evaluate import compare, evaluate
from rwkv_state_hub.generate import generate, sample_token
from rwkv_state_hub.tokenizer import get_tokenizer
from rwkv_state_hub.training import TrainConfig, train

MODEL = REPO / "rwkv_state_hub" / "examples" / "models" / "tiny-rwkv-5v2-730K.pth"
TRAIN = REPO / "examples" / "data" / "train.jsonl"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "run"
    train(TrainConfig(model=str(MODEL), data=[str(TRAIN)], out=str(out), steps=30, micro_bsz=8, full_state=True),
          progress=False)
    return out / "state.safetensors"


def held_out(tmp_path):
    path = tmp_path / "val.jsonl"
    path.write_text("\n".join((REPO / "examples" / "data" / "val.jsonl").read_text().splitlines()[:12]) + "\n")
    return path


def test_eval_table_rows_are_real_losses(trained, tmp_path):
    val = held_out(tmp_path)
    rows = compare(str(MODEL), [str(val)], [str(trained)], few_shot_data=str(TRAIN), shots=2)
    assert [r["name"].split(" ")[0] for r in rows] == ["base", "base", "state"]
    model = load_model(MODEL)
    data = load_dataset(val, get_tokenizer("bytes"), 512)
    base = evaluate(model, data)
    assert rows[0]["loss"] == pytest.approx(base.loss) and rows[0]["n_tokens"] == base.n_tokens
    # the few-shot row: the same held-out tokens, from the state two training samples leave behind
    pool = load_dataset(TRAIN, get_tokenizer("bytes"), 512)
    with torch.no_grad():
        _, after = model(torch.tensor([pool[0].tokens + pool[1].tokens]))
    assert rows[1]["loss"] == pytest.approx(evaluate(model, data, after).loss)
    assert rows[2]["loss"] < rows[0]["loss"]  # 30 steps on the same style already help
    assert all(0 <= r["accuracy"] <= 1 and r["n_tokens"] == base.n_tokens for r in rows)


@pytest.mark.slow
def test_eval_cli_json(trained, tmp_path):
    r = subprocess.run([sys.executable, "-m", "rwkv_state_hub.cli", "eval", "--model", str(MODEL), "--state",
                        str(trained), "--data", str(held_out(tmp_path)), "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert len(rows) == 2 and rows[1]["loss"] < rows[0]["loss"]


def test_sampling():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([0.0, 5.0, 4.9, -3.0])
    assert sample_token(logits, 0, 0.9, g) == 1  # greedy
    draws = {sample_token(logits, 1.0, 0.3, g) for _ in range(50)}
    assert draws == {1}  # top-p 0.3 keeps only the most likely token
    assert {sample_token(logits, 1.0, 0.0, g) for _ in range(20)} == {1}  # top-p 0 keeps the top token
    draws = {sample_token(logits, 1.0, 0.99, g) for _ in range(200)}
    assert {1, 2} <= draws and 3 not in draws


def test_generate_continues_from_the_state(trained):
    """Greedy generation from the tuned state equals stepping the model by hand; it differs from the base."""
    from rwkv_state_hub import load_state

    model, tok = load_model(MODEL), get_tokenizer("bytes")
    state = load_state(trained)
    greedy = dict(max_tokens=12, temperature=0, presence_penalty=0, frequency_penalty=0)  # plain argmax
    text = generate(model, tok, "W", state, **greedy)
    rs = state.to_recurrent()
    logits, rs = model.step(ord("W"), rs)
    by_hand = []
    for _ in range(12):
        t = int(logits[0].argmax())
        by_hand.append(t)
        logits, rs = model.step(t, rs)
    assert text == tok.decode(by_hand)
    assert text != generate(model, tok, "W", None, **greedy)

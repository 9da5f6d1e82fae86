"""loss_by_position: the held-out loss in buckets of how far into a sample a token is, against a plain
token-by-token loop."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, random_state_like

from rwkv_state_hub.data import Sample, load_dataset
from rwkv_state_hub.evaluate import compare, evaluate, loss_by_position
from rwkv_state_hub.examples import example_model
from rwkv_state_hub.model import load_model
from rwkv_state_hub.tokenizer import get_tokenizer
from rwkv_state_hub.training import TrainConfig, train

DATA = REPO / "examples" / "data"


def _loop_buckets(model, samples, state, edges):
    """Each sample read one token at a time in RNN mode; each loss put in its bucket by hand."""
    sums, counts = [0.0] * len(edges), [0] * len(edges)
    for s in samples:
        rs = state
        for t in range(len(s.tokens) - 1):
            logits, rs = model.step(s.tokens[t], rs)
            if s.mask[t + 1]:
                b = max(i for i, e in enumerate(edges) if t >= e)
                sums[b] += float(F.cross_entropy(logits.float(), torch.tensor([s.tokens[t + 1]])))
                counts[b] += 1
    return [sums[i] / counts[i] if counts[i] else math.nan for i in range(len(edges))], counts


def test_buckets_equal_a_plain_loop_and_add_up_to_the_mean(random_models):
    model = load_model(random_models["v7"])
    g = torch.Generator().manual_seed(0)
    samples = [Sample(torch.randint(0, 320, (n,), generator=g).tolist(), [0] + [1] * (n - 1), f"s{n}")
               for n in (3, 9, 20)]
    samples[2].mask[5] = 0  # an untrained token counts nowhere
    state = random_state_like(model.spec, seed=1).to_recurrent()
    edges = (0, 2, 8, 16)
    rows = loss_by_position(model, samples, state, edges)
    want, counts = _loop_buckets(model, samples, state, edges)
    assert [r[0] for r in rows] == ["0-2", "2-8", "8-16", "16+"]
    assert [r[2] for r in rows] == counts == [6, 11, 8, 3]
    for (_, got, _), expected in zip(rows, want, strict=True):
        assert abs(got - expected) < 1e-4
    total = sum(r[1] * r[2] for r in rows) / sum(r[2] for r in rows)
    assert abs(total - evaluate(model, samples, state).loss) < 1e-4


@pytest.mark.slow
def test_a_state_on_the_example_model_beats_the_base_and_a_few_shot_prompt(tmp_path):
    """The quickstart's run (examples/train.toml: the example RWKV-7, the weather bulletins, 3 epochs): the state
    beats the base model and a 3-shot prompt of the same data on the held-out bulletins, by a wide margin."""
    import tomllib

    settings = tomllib.loads((REPO / "examples" / "train.toml").read_text())
    settings = {k: v for k, v in settings.items() if k not in ("out", "export", "val_data")}
    cfg = TrainConfig(**{**settings, "model": str(REPO / settings["model"]),
                         "data": [str(REPO / d) for d in settings["data"]]}, out=str(tmp_path / "run"))
    assert Path(cfg.model) == example_model("rwkv7-example-L4-D256")
    state = train(cfg, progress=False).state
    val, shots = DATA / "bulletins-val.jsonl", DATA / "bulletins-train.jsonl"
    rows = {r["name"].split(" (")[0]: r["loss"] for r in compare(cfg.model, [str(val)], [], str(shots), 3, "bytes")}
    model = load_model(cfg.model)
    held_out = load_dataset([str(val)], get_tokenizer("bytes"), 512, 256)
    tuned = evaluate(model, held_out, state.to_recurrent()).loss
    base, few_shot = rows["base model"], rows["base + 3-shot prompt"]
    assert tuned < base - 0.5 and tuned < few_shot - 0.5, (base, few_shot, tuned)

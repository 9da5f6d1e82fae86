"""examples/pretrain_example_model.py: the script that pretrains the example RWKV-7, run end to end on a tiny
shape and on text made here; its data extraction on fake package files; its refusals."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rwkv_state_hub.model import load_model

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "pretrain_example_model.py"
sys.path.insert(0, str(REPO / "examples"))

from pip_reference import pip_model  # noqa: E402
from pretrain import corpus  # noqa: E402
from pretrain_example_model import Config, Run, init_weights, main, make_optimizer, trainable_model  # noqa: E402

from rwkv_state_hub.errors import StateHubError  # noqa: E402

STEPS = 20


def _style_text(kind: str, n: int) -> str:
    """Two styles a tiny model tells apart within a few steps: counting verses, and key = value lines."""
    if kind == "verses":
        return "".join(f"  {i % 40} And it came to pass on day {i % 7}.\n" for i in range(n))
    return "".join(f"key_{i % 13} = value_{i % 5}\n" for i in range(n))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """DIR/pretrain/{verses,config} and DIR/states/shout, as --data-dir expects them."""
    root = tmp_path_factory.mktemp("pretrain-data")
    for role, name, kind in (("pretrain", "verses", "verses"), ("pretrain", "config", "config"),
                             ("states", "shout", "config")):
        folder = root / role / name
        folder.mkdir(parents=True)
        (folder / "train.txt").write_text(_style_text(kind, 400) if name != "shout" else "LOUD WORDS!\n" * 200)
        (folder / "val.txt").write_text(_style_text(kind, 60) if name != "shout" else "LOUD WORDS!\n" * 40)
    return root


def _run(data_dir: Path, out: Path, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(SCRIPT), "--tiny", "--steps", str(STEPS), "--lr", "0.01", "--data-dir",
           str(data_dir), "--out", str(out), "--run-dir", str(run_dir), "--eval-windows", "2", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory) -> tuple[Path, Path, str]:
    """One uninterrupted tiny run: (model file, run folder, stdout)."""
    tmp = tmp_path_factory.mktemp("pretrain-run")
    done = _run(data_dir, tmp / "model.pth", tmp / "run")
    return tmp / "model.pth", tmp / "run", done.stdout


def test_the_model_loads_in_ours_and_pip_with_equal_logits(trained):
    path, _, stdout = trained
    ours = load_model(path, dtype=torch.float32)
    spec = ours.spec
    assert (spec.arch, spec.n_layer, spec.n_embd, spec.head_size, spec.vocab_size) == ("v7", 2, 64, 64, 256)
    assert spec.dtype == "bfloat16"
    tokens = list(b"  3 And it came to pass on day 4.\nkey_1 = value_2\n")
    with torch.no_grad():
        a, _ = ours(torch.tensor([tokens]))
    b, _ = pip_model(path, "v7").forward(tokens, None, full_output=True)
    assert (a[0] - b).abs().max().item() < 1e-4
    assert "max |our logits - rwkv pip's| (fp32)" in stdout


def test_the_loss_falls_and_every_style_is_reported(trained):
    _, run_dir, stdout = trained
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == STEPS
    assert log[-1]["loss"] < 0.5 * log[0]["loss"]  # the mean of steps 11-20 well below that of steps 1-10
    summary = json.loads((run_dir / "summary.json").read_text())
    losses = summary["held_out_loss_per_byte"]
    assert set(losses) == {"config", "verses", "shout (kept out)"}
    assert max(losses["config"], losses["verses"]) < 1.0 < 5.0 < losses["shout (kept out)"]  # never seen
    assert summary["steps"] == STEPS and summary["tokens"] == STEPS * 4 * 64
    assert "verses" in stdout and "config" in stdout and "wall" not in summary["data"][0]


@pytest.mark.slow
def test_a_stopped_run_resumes_exactly(data_dir, trained, tmp_path):
    """Stopped after 7 steps (a checkpoint), then the same command: the same weights as one run of 20."""
    path, _, _ = trained
    out, run_dir = tmp_path / "model.pth", tmp_path / "run"
    first = _run(data_dir, out, run_dir, "--stop-after", "7")
    assert "stopped at step 7" in first.stdout and not out.exists()
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["step"] == 7
    second = _run(data_dir, out, run_dir)
    assert "resuming" in second.stdout
    whole = torch.load(path, weights_only=True)
    resumed = torch.load(out, weights_only=True)
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_resume_refuses_other_settings_and_trims_the_log(tmp_path):
    cfg = Config(**{"n_layer": 1, "n_embd": 64, "ctx": 16, "batch": 1, "steps": 4})
    model = trainable_model(init_weights(cfg.n_layer, cfg.n_embd, cfg.seed))
    Run(cfg, tmp_path, {"a": "0" * 64}, step=2).save(model, make_optimizer(model, cfg))
    (tmp_path / "log.jsonl").write_text("".join(json.dumps({"step": i, "loss": 1.0}) + "\n" for i in (1, 2, 3)))
    run = Run(cfg, tmp_path, {"a": "0" * 64})
    run.resume(model, make_optimizer(model, cfg))
    assert run.step == 2  # logged past the checkpoint (killed between saves): step 3 will be logged again
    assert [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()] == [1, 2]
    other = Config(**{**cfg.__dict__, "lr": 0.5})
    with pytest.raises(StateHubError, match=r"checkpoint.pt: made with other settings \(lr 0.002 -> 0.5\)"):
        Run(other, tmp_path, {"a": "0" * 64}).resume(model, make_optimizer(model, other))
    with pytest.raises(StateHubError, match="the training text"):
        Run(cfg, tmp_path, {"a": "1" * 64}).resume(model, make_optimizer(model, cfg))


@pytest.mark.parametrize("args, message", [
    (["--n-embd", "100"], "--n-embd 100 must be a multiple of the head size 64"),
    (["--steps", "0"], "--steps 0 must be > 0"),
    (["--lr-final", "1.0"], "need 0 <= --lr-final <= --lr"),
])
def test_bad_options_get_one_line(args, message, tmp_path, capsys):
    assert main([*args, "--data-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def _fake_dictd(prefix: Path, entries: dict[str, str]) -> None:
    """A dictd dictionary as dictfmt writes one: gzip text, index lines of headword, offset, length (base 64)."""
    def b64(n: int) -> str:
        digits = ""
        while True:
            digits = corpus._B64[n % 64] + digits
            n //= 64
            if not n:
                return digits

    text, lines = b"", []
    for word, body in entries.items():
        data = body.encode()
        lines.append(f"{word}\t{b64(len(text))}\t{b64(len(data))}")
        if word == "WORD0":
            lines.append(f"ALIAS\t{b64(len(text))}\t{b64(len(data))}")  # two headwords, one entry
        text += data
    Path(f"{prefix}.dict.dz").write_bytes(gzip.compress(text))
    Path(f"{prefix}.index").write_text("\n".join(sorted(lines)) + "\n")


def test_build_data_extracts_splits_and_records_each_style(tmp_path):
    entries = {"00-database-info": "about this file\n"} | {f"WORD{i}": f"WORD{i}, n.  Meaning {i}.\n"
                                                            for i in range(40)}
    _fake_dictd(tmp_path / "dict", entries)
    for i in range(3):
        (tmp_path / f"mod{i}.py").write_text(f"def f{i}():\n    return {i}\n")
    chapters = "".join(f"Book {i}\n\n  1 Verse of chapter {i}.\n\n" for i in range(1, 41))
    (tmp_path / "sources.toml").write_text(f"""
[[style]]
name = "words"
role = "states"
about = "a dictionary"
licence = "public domain"
packages = ["no-such-package-here"]
dictd = "{tmp_path / 'dict'}"
[[style]]
name = "code"
role = "pretrain"
about = "code"
licence = "MIT"
packages = []
files = "{tmp_path}/**/*.py"
[[style]]
name = "book"
role = "pretrain"
about = "chapters"
licence = "public domain"
packages = []
command = {json.dumps([sys.executable, "-c", f"print({chapters!r}, end='')"])}
split = '(?m)^(?=\\S.* \\d+$)'
""")
    out = tmp_path / "data"
    corpus.build_data(out, tmp_path / "sources.toml")
    record = {s["name"]: s for s in json.loads((out / "sources.json").read_text())}
    assert record["words"]["documents"] == 40  # the dictfmt header left out, WORD0 once
    assert record["words"]["packages"] == {"no-such-package-here": "not installed"}
    assert record["book"]["documents"] == 40 and record["code"]["documents"] == 3
    val = (out / "states" / "words" / "val.txt").read_text()
    assert val == "WORD10, n.  Meaning 10.\n\nWORD30, n.  Meaning 30.\n"  # every 20th entry from the 10th
    assert [json.loads(line)["text"] for line in (out / "states/words/val.jsonl").read_text().splitlines()] == [
        "WORD10, n.  Meaning 10.", "WORD30, n.  Meaning 30."]
    assert (out / "pretrain/book/val.txt").read_text().startswith("Book 11\n\n  1 Verse of chapter 11.")
    assert "about this file" not in (out / "states/words/train.txt").read_text()
    assert record["book"]["sha256"] == corpus.style_sha256(out / "pretrain" / "book")


def test_a_missing_package_is_named_in_one_line(tmp_path):
    (tmp_path / "sources.toml").write_text(f"""
[[style]]
name = "devil"
role = "states"
about = "x"
licence = "public domain"
packages = ["dict-devil"]
dictd = "{tmp_path / 'nowhere'}"
""")
    with pytest.raises(StateHubError) as e:
        corpus.build_data(tmp_path / "data", tmp_path / "sources.toml")
    assert str(e.value).startswith("style devil: ") and str(e.value).endswith("apt-get install dict-devil")
    assert "\n" not in str(e.value)


def test_mixture_batches_depend_only_on_seed_and_step():
    texts = {"a": b"a" * 500, "b": b"b" * 500}
    m = corpus.Mixture(texts, ctx=16, seed=3)
    first = m.batch(5, 4)
    assert torch.equal(first, corpus.Mixture(texts, ctx=16, seed=3).batch(5, 4))
    assert first.shape == (4, 17)
    assert [chr(int(row[0])) for row in first] == ["a", "b", "a", "b"]  # each style equally often
    with pytest.raises(StateHubError, match="too short: b"):
        corpus.Mixture({"a": b"a" * 100, "b": b"b" * 10}, ctx=16, seed=0)

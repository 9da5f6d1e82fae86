"""The trainer: schedule, data order, masked loss, batching, resume after SIGKILL, Ctrl-C, DDP, outputs."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, real_model_path

from rwkv_state_hub import OutputExistsError, StateHubError, load_model, load_state
from rwkv_state_hub.data import collate, load_dataset
from rwkv_state_hub.errors import speak_cli
from rwkv_state_hub.evaluate import evaluate
from rwkv_state_hub.loss import batch_loss
from rwkv_state_hub.tokenizer import get_tokenizer
from rwkv_state_hub.training import TrainConfig, dry_run, lr_at, summary, train
from rwkv_state_hub.training.step import global_batch_indices

MODEL = REPO / "rwkv_state_hub" / "examples" / "models" / "tiny-rwkv-5v2-730K.pth"
TRAIN = REPO / "examples" / "data" / "train.jsonl"
VAL = REPO / "examples" / "data" / "val.jsonl"
CLI = [sys.executable, "-m", "rwkv_state_hub.cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # two processes on two cores must not oversubscribe


def small_data(tmp_path: Path, n: int = 24) -> Path:
    lines = TRAIN.read_text().splitlines()[:n]
    path = tmp_path / "small.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def cfg(tmp_path: Path, **kw) -> TrainConfig:
    base = dict(model=str(MODEL), data=[str(small_data(tmp_path))], out=str(tmp_path / "run"), steps=4,
                micro_bsz=2, save_every=2, val_every=2, seed=1)
    return TrainConfig(**{**base, **kw})


def test_learning_rate_schedule():
    c = TrainConfig(model="m", data=["d"], lr_init=1.0, lr_final=0.01, warmup_steps=10)
    lrs = [lr_at(s, 100, c) for s in range(100)]
    assert lrs[0] == pytest.approx(0.01) and lrs[10] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.01)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11], strict=True))  # warmup rises
    assert all(a > b for a, b in zip(lrs[10:-1], lrs[11:], strict=True))  # then decays geometrically
    assert lrs[55] == pytest.approx(math.sqrt(1.0 * 0.01), rel=0.05)


def test_data_order_covers_every_sample_once_per_epoch():
    n, bsz = 10, 4
    seen = [i for step in range(5) for i in global_batch_indices(step, n, bsz, seed=3)]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    assert seen[:10] != seen[10:20]  # a new permutation each epoch
    assert global_batch_indices(2, n, bsz, 3) == seen[8:12]  # recomputable from the step alone


def test_masked_loss_equals_a_hand_computation():
    model = load_model(MODEL)
    tok = get_tokenizer("bytes")
    path = Path(__file__).parent / "_mask.jsonl"
    try:
        path.write_text(json.dumps({"prompt": "Where?", "response": "Here."}) + "\n"
                        + json.dumps({"text": "Sky is blue."}) + "\n")
        data = load_dataset(path, tok, 64)
    finally:
        path.unlink()
    batch = collate([data[0], data[1]])
    with torch.no_grad():
        loss_sum, _ = batch_loss(model, batch, None)
        hand, count = 0.0, 0
        for s in (data[0], data[1]):
            logits, _ = model(torch.tensor([s.tokens[:-1]]))
            logp = F.log_softmax(logits[0], dim=-1)
            for i in range(1, len(s.tokens)):
                if s.mask[i]:
                    hand -= float(logp[i - 1, s.tokens[i]])
                    count += 1
    assert count == batch.n_trained == len(b" Here.\n\n") + len(b"ky is blue.")
    assert float(loss_sum) == pytest.approx(hand, rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name,tokenizer", [("tiny-rwkv-5v2-730K", "bytes"), ("tiny-rwkv-6v0-1m", "utf-16-le"),
                                            ("tiny-rwkv-7v0-834K", "bytes")])
def test_loss_decreases_on_each_real_model(tmp_path, name, tokenizer):
    """A short style task (the example weather reports): held-out loss with the tuned state < base."""
    path = real_model_path(name)
    val = tmp_path / "val.jsonl"
    val.write_text("\n".join(VAL.read_text().splitlines()[:16]) + "\n")
    c = TrainConfig(model=str(path), data=[str(TRAIN)], val_data=[str(val)], tokenizer=tokenizer,
                    out=str(tmp_path / "run"), steps=16, micro_bsz=4, val_every=16, save_every=16)
    model = load_model(path)
    base = evaluate(model, load_dataset(val, get_tokenizer(tokenizer), 512)).loss
    result = train(c, progress=False)
    assert result.final_val.loss < base
    if name != "tiny-rwkv-7v0-834K":  # the tiny v7 barely responds to its state (shared/models/README.md)
        assert result.final_val.loss < 0.95 * base


def test_outputs_and_metadata(tmp_path):
    c = cfg(tmp_path, val_data=[str(VAL)], export=["pth", "ai00"], full_state=True)
    result = train(c, progress=False)
    out = Path(c.out)
    for name in ("state.safetensors", "best.safetensors", "state.pth", "state.st", "metrics.jsonl", "loss.png",
                 "config.toml", "checkpoint.pt"):
        assert (out / name).is_file(), name
    state = load_state(out / "state.safetensors")
    meta = state.metadata
    assert meta["base_model_sha256"] == load_model(MODEL).spec.sha256
    assert meta["tokenizer"] == "bytes"  # the tokenizer the run used, chosen from the vocab
    t = meta["training"]
    assert t["steps"] == 4 and t["tokens_seen"] == result.tokens > 0
    assert t["data_sha256"] == load_dataset(c.data, get_tokenizer("bytes"), 512).sha256
    assert t["final_val_loss"] == pytest.approx(result.final_val.loss) and t["best_val_loss"] <= t["final_val_loss"]
    assert t["hyperparameters"]["lr_init"] == 1.0 and t["hyperparameters"]["micro_bsz"] == 2
    assert state.shift is not None and state.shift.abs().sum() > 0  # --full-state learned the token shift
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4] and "val_loss" in metrics[1]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert torch.allclose(load_state(out / "state.pth").wkv, state.wkv)


@pytest.mark.slow
def test_config_file_and_refusals(tmp_path):
    speak_cli(False)  # the library's words: resume=True, not --resume
    c = cfg(tmp_path)
    train(c, progress=False)
    out = Path(c.out)
    # the written config repeats the run; resuming a finished run changes nothing
    r = subprocess.run([*CLI, "train", "--config", str(out / "config.toml"), "--resume"], capture_output=True,
                       text=True, env=ENV)
    assert r.returncode == 0, r.stderr
    # a second run into the same folder without --resume is refused, with the way out
    with pytest.raises(OutputExistsError, match="resume=True"):
        train(c, progress=False)
    with pytest.raises(StateHubError, match="micro_bsz"):
        train(cfg(tmp_path, micro_bsz=1), resume=True, progress=False)
    for bad, words in ((dict(lr_final=0.0), "lr_final=0.0"), (dict(steps=0), "steps=0")):
        with pytest.raises(StateHubError, match=words):
            train(cfg(tmp_path, out=str(tmp_path / "new"), **bad), progress=False)
    assert TrainConfig.from_dict({"model": "m", "data": "d", "export": "pth,ai00"}).export == ["pth", "ai00"]
    with pytest.raises(StateHubError, match=r"export=\['gguf'\]"):  # refused before any training
        train(cfg(tmp_path, out=str(tmp_path / "new"), export=["gguf"]), progress=False)
    assert not (tmp_path / "new").exists()
    bad = tmp_path / "bad.toml"
    bad.write_text('model = "m"\ndata = ["d"]\nlearning_rate = 3\n')
    r = subprocess.run([*CLI, "train", "--config", str(bad)], capture_output=True, text=True, env=ENV)
    assert r.returncode == 1 and "learning_rate" in r.stderr and "Traceback" not in r.stderr


def rendered_sample(description: str) -> str:
    """The dry run's sample text: everything after its eight lines of facts."""
    return description.split("\n", 8)[8]


def test_dry_run_trains_nothing(tmp_path):
    data = small_data(tmp_path)
    r = subprocess.run([*CLI, "train", "--model", str(MODEL), "--data", str(data), "--out", str(tmp_path / "o"),
                        "--dry-run"], capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr
    assert "24 samples" in r.stdout and "memory" in r.stdout and "WEATHER" in r.stdout
    assert not (tmp_path / "o").exists()
    # stdout is a pipe, not a terminal: the trained tokens are marked with brackets, not colour
    assert "\x1b[" not in r.stdout and "between [[ and ]]" in r.stdout and "[[" in rendered_sample(r.stdout)
    assert "steps      24 (1 epochs x 24 samples / 1 per step)" in r.stdout
    assert "tokens/s on this machine" in r.stdout


def test_dry_run_marks_trained_tokens_and_estimates_the_time(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"prompt": "Where?", "response": "Here."}) + "\n")
    c = TrainConfig(model=str(MODEL), data=[str(path)], out=str(tmp_path / "o"), steps=300)
    plain = dry_run(c, color=False)
    sample = rendered_sample(plain)
    assert sample.count("[[") == sample.count("]]") == 1 and "[[ Here.\n\n]]" in sample  # only the answer
    assert "User: Where?" in sample.split("[[")[0]
    assert "steps      300 (set by steps)" in plain
    minutes = [line for line in plain.splitlines() if line.startswith("time ")][0]
    assert "tokens/s on this machine" in minutes and "one step measured" in minutes
    coloured = rendered_sample(dry_run(c, color=True))
    assert "\x1b[1;32m Here.\n\n\x1b[0m" in coloured and "[[" not in coloured
    assert not (tmp_path / "o").exists()


def test_summary_lists_written_exports_and_suggests_only_the_others(tmp_path):
    c = cfg(tmp_path, steps=1, export=["pth"])
    result = train(c, progress=False)
    text = summary(result, c)
    out = Path(c.out)
    assert f"export:   {out / 'state.pth'}" in text
    suggested = [line for line in text.splitlines() if "rwkv-state export" in line]
    assert len(suggested) == 1 and "--format ai00" in suggested[0]  # pth is written already
    assert "RWKV.from_pretrained(" in text and f"State.from_pretrained({str(out / 'state.safetensors')!r})" in text
    assert "Done: 1 steps" in text


def test_bf16_weights_and_grad_checkpointing(tmp_path):
    plain = train(cfg(tmp_path, out=str(tmp_path / "a"), steps=2), progress=False).state
    ckpt = train(cfg(tmp_path, out=str(tmp_path / "b"), steps=2, grad_checkpoint=True), progress=False).state
    assert torch.allclose(plain.wkv, ckpt.wkv, atol=1e-6)
    half = train(cfg(tmp_path, out=str(tmp_path / "c"), steps=2, precision="bf16"), progress=False).state
    assert half.wkv.dtype == torch.float32 and torch.isfinite(half.wkv).all()
    # the state's gradient through bf16 weights points the same way as through fp32 weights
    data = load_dataset(small_data(tmp_path), get_tokenizer("bytes"), 512)
    batch = collate([data[i] for i in range(8)])
    grads = []
    for dtype in (torch.float32, torch.bfloat16):
        model = load_model(MODEL, dtype=dtype)
        wkv = plain.to_recurrent()
        wkv.wkv.requires_grad_()
        batch_loss(model, batch, wkv)[0].backward()
        grads.append(wkv.wkv.grad.flatten())
    assert F.cosine_similarity(grads[0], grads[1], dim=0) > 0.95


def _cli_run(tmp_path: Path, out: Path, *extra: str) -> list[str]:
    return [*CLI, "train", "--model", str(MODEL), "--data", str(small_data(tmp_path)), "--out", str(out),
            "--steps", "10", "--micro-bsz", "2", "--save-every", "3", "--seed", "5", *extra]


def _wait_for_steps(out: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        metrics = out / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, "the run ended before it could be interrupted"
        time.sleep(0.05)
    raise AssertionError("training made no progress")


@pytest.mark.slow
def test_resume_after_sigkill_is_exact(tmp_path):
    whole = tmp_path / "whole"
    subprocess.run(_cli_run(tmp_path, whole), check=True, capture_output=True, env=ENV)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cli_run(tmp_path, killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=ENV)
    _wait_for_steps(killed, 5, proc)  # past the checkpoint at step 3, before the one at 6
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "state.safetensors").exists()
    r = subprocess.run(_cli_run(tmp_path, killed, "--resume"), capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr
    a, b = load_state(whole / "state.safetensors"), load_state(killed / "state.safetensors")
    assert torch.equal(a.wkv, b.wkv)
    assert a.metadata["training"]["tokens_seen"] == b.metadata["training"]["tokens_seen"]
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))  # the steps redone after the kill are not logged twice


def test_a_torn_metrics_line_loses_only_itself(tmp_path):
    from rwkv_state_hub.training.checkpointing import read_metrics as _read_metrics

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.9}\n{"step": 3, "lo')
    assert [m["step"] for m in _read_metrics(tmp_path)] == [1, 2]


def test_ctrl_c_saves_and_exits_cleanly(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(_cli_run(tmp_path, out, "--steps", "400"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    _wait_for_steps(out, 2, proc)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "Interrupted" in stdout and "--resume" in stdout and "Traceback" not in stderr
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    state = load_state(out / "state.safetensors")
    assert ck["run"]["step"] == state.metadata["training"]["steps"] < 400
    assert torch.equal(ck["learned"]["wkv"], state.wkv)


def _torchrun(out: Path, data: Path, *extra: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
           "-m", "rwkv_state_hub.cli", "train", "--model", str(MODEL), "--data", str(data), "--out", str(out),
           "--steps", "3", "--seed", "2", "--lr-init", "0.02", *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    """torchrun with 2 CPU processes x micro-batch 1 = 1 process x micro-batch 2 (within 1e-5), and is
    bit-identical to 1 process x 2 accumulated micro-batches of 1 (the same sums in the same order).

    A small learning rate for the first comparison: Adam divides each gradient entry by its own magnitude,
    so entries whose gradient is at rounding level (a channel that forgets at once) move by up to lr
    whatever the rounding; at lr ~1 the last-bit differences that padding a batch causes then show as
    4e-5 after 3 steps, 1e-3 after 6. The same sums in the same order stay bit-identical at any lr."""
    data = small_data(tmp_path)
    _torchrun(tmp_path / "ddp", data, "--micro-bsz", "1")
    same = dict(model=str(MODEL), data=[str(data)], steps=3, seed=2, lr_init=0.02)
    one = train(TrainConfig(**same, out=str(tmp_path / "one"), micro_bsz=2), progress=False).state
    accum = train(TrainConfig(**same, out=str(tmp_path / "acc"), micro_bsz=1, grad_accum=2), progress=False).state
    ddp = load_state(tmp_path / "ddp" / "state.safetensors")
    assert ddp.wkv.abs().max() > 1e-3
    assert torch.allclose(ddp.wkv, one.wkv, atol=1e-5, rtol=0)
    assert torch.equal(ddp.wkv, accum.wkv)


def test_state_encoder_trains_and_saves_a_plain_state(tmp_path):
    from rwkv_state_hub.model import EncodedState

    spec = load_model(MODEL).spec
    enc = EncodedState(spec)
    assert torch.equal(enc.wkv, torch.zeros(spec.state_shape()))  # starts where a plain state starts
    c = cfg(tmp_path, state_encoder=True, encoder_lr_scale=0.03, steps=3, val_data=[str(VAL)], val_every=3)
    result = train(c, progress=False)
    saved = load_state(Path(c.out) / "state.safetensors")
    assert saved.wkv.abs().max() > 0 and "encoder" in saved.metadata["training"]["method"]
    # what consumers get is the encoder's output: the saved plain state gives the validation loss it logged
    val = load_dataset(VAL, get_tokenizer("bytes"), 512)
    assert evaluate(load_model(MODEL), val, saved.to_recurrent()).loss == pytest.approx(result.final_val.loss, rel=1e-5)
    ck = torch.load(Path(c.out) / "checkpoint.pt", weights_only=True)
    assert "w2" in ck["learned"]  # resume restores the encoder, not only its output


def test_chunked_head_and_loss_equal_the_whole_sequence_at_once(monkeypatch):
    """batch_loss computes the head and the loss without full logits (training through this fp32 head: flash
    attention, the state gradient worked out with the loss; evaluation: a chunk of positions at a time, the
    accuracy too); the loss, the accuracy and the state gradient must equal those from full logits."""
    from rwkv_state_hub import loss as loss_module
    from rwkv_state_hub.model import RecurrentState

    model = load_model(MODEL)
    data = load_dataset(TRAIN, get_tokenizer("bytes"), 512)
    batch = collate([data[i] for i in range(3)])
    monkeypatch.setattr(loss_module, "HEAD_CHUNK_BYTES", 16 * 256 * 4)  # 16 rows a chunk: several on ~60 bytes
    results = []
    for chunked in (True, False):
        wkv = torch.zeros(model.spec.state_shape())[None].requires_grad_()
        rs = RecurrentState(wkv, torch.zeros(1, model.spec.n_layer, 64), torch.zeros(1, model.spec.n_layer, 64))
        if chunked:
            loss, _ = batch_loss(model, batch, rs)
            with torch.no_grad():
                correct = batch_loss(model, batch, rs)[1]
        else:
            logits, _ = model(batch.inputs, rs, batch.mask)
            nll = F.cross_entropy(logits.transpose(1, 2), batch.targets, reduction="none")
            loss = (nll * batch.loss_mask).sum()
            correct = ((logits.argmax(-1) == batch.targets).float() * batch.loss_mask).sum()
        loss.backward()
        results.append((loss.detach(), correct, wkv.grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-4)
    assert float(results[0][1]) == float(results[1][1])
    # fp32 rounding of two equal formulas (logsumexp vs log_softmax): within 2e-6 of the largest gradient
    # (measured: 5e-7)
    torch.testing.assert_close(results[0][2], results[1][2], rtol=1e-4, atol=2e-6 * float(results[1][2].abs().max()))

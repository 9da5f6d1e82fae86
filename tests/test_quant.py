"""--quant int8|nf4: the frozen matrices stored quantized, the state maths fp32 (rwkv_state_hub/model/quant.py).

Two questions, tested apart: does the quantized model compute exactly what a model whose matrices are the
dequantized ones computes (the plumbing: chunks of rows, padding, the loss's head, the backward pass), and how
far is that from the original model (the quantization error, bounds measured in docs/quantization.md).
"""

from __future__ import annotations

import json
import threading

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from conftest import ARCHS, REAL_MODELS, REPO, prompt_tokens, real_model_path

from rwkv_state_hub.checkpoint import read_checkpoint, spec_from_state_dict
from rwkv_state_hub.cli import cli
from rwkv_state_hub.data import load_dataset
from rwkv_state_hub.evaluate import evaluate
from rwkv_state_hub.loss import head_loss
from rwkv_state_hub.model import build_model, load_model, quantize_model
from rwkv_state_hub.model import quant as quant_module
from rwkv_state_hub.model.common import RecurrentState
from rwkv_state_hub.model.quant import KINDS, NF4_LEVELS, QuantizedLinear, quantization, quantized_names
from rwkv_state_hub.random_model import random_checkpoint
from rwkv_state_hub.training import TrainConfig, train, train_state
from rwkv_state_hub.training.config import QUANT_KINDS

EXAMPLE_MODEL = REPO / "rwkv_state_hub" / "examples" / "models" / "tiny-rwkv-7v0-834K.pth"
TRAIN = REPO / "examples" / "data" / "train.jsonl"
VAL = REPO / "examples" / "data" / "val.jsonl"


def test_the_options_kinds_are_the_models():
    assert QUANT_KINDS == KINDS


# ---------------------------------------------------------------- one matrix


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cols", [64, 100])  # 100: nf4 pads each row to whole blocks of 64
def test_both_products_equal_those_of_the_dequantized_matrix_in_any_chunks(kind, cols, monkeypatch):
    w = torch.randn(300, cols, generator=torch.Generator().manual_seed(0))
    layer = QuantizedLinear.from_weight(w, kind, torch.float32)
    dense = layer.to_dense()
    x, g = torch.randn(2, 5, cols), torch.randn(2, 5, 300)
    one_chunk = layer.matmul(x), layer.matmul_t(g)
    monkeypatch.setattr(quant_module, "CHUNK_BYTES", 7 * cols * 4)  # 7 rows a chunk: 43 chunks, the last short
    xg = x.clone().requires_grad_()
    y = layer(xg)
    y.backward(g)
    for got, want in ((y.detach(), x @ dense.T), (one_chunk[0], x @ dense.T), (xg.grad, g @ dense),
                      (one_chunk[1], g @ dense)):  # equal up to fp32 summation order
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))
    # the quantization error of a Gaussian matrix: measured 0.0088 (int8) and 0.092 (nf4, QLoRA's figure too)
    assert (dense - w).norm() / w.norm() < {"int8": 0.012, "nf4": 0.1}[kind]


def test_nf4_levels_and_int8_steps_come_back_exactly():
    levels = torch.cat([NF4_LEVELS] * 4)[None] * 3.5  # one block of 64 whose absmax is 3.5
    assert torch.equal(QuantizedLinear.from_weight(levels, "nf4", torch.float32).to_dense(), levels)
    steps = torch.arange(-127.0, 128.0)[None] * 0.25
    assert torch.equal(QuantizedLinear.from_weight(steps, "int8", torch.float32).to_dense(), steps)
    zeros = torch.zeros(3, 64)
    for kind in KINDS:
        assert torch.equal(QuantizedLinear.from_weight(zeros, kind, torch.float32).to_dense(), zeros)


def test_bytes_per_weight():
    w = torch.randn(256, 1024)
    for kind, per_weight in (("int8", 1 + 4 / 1024), ("nf4", 0.5 + 4 / 64)):
        layer = QuantizedLinear.from_weight(w, kind)
        held = sum(b.nbytes for b in layer.buffers())
        assert held == per_weight * w.numel() and not list(layer.parameters())


# ---------------------------------------------------------------- the model


def _dense_twin(model, path_or_sd):
    """The unquantized model of the same checkpoint, its matrices replaced by the dequantized ones."""
    twin = load_model(path_or_sd) if not isinstance(path_or_sd, dict) else build_model(
        spec_from_state_dict(path_or_sd), path_or_sd)
    for name in quantized_names(twin):
        twin.get_submodule(name).weight = torch.nn.Parameter(model.get_submodule(name).to_dense(), requires_grad=False)
    return twin


def _logits_and_state_gradient(model, tokens, seed: int = 2):
    """Logits, and the gradient of the loss (the one loss function, through the head in chunks) w.r.t. a
    random initial state: wkv and both token shifts, flattened."""
    g = torch.Generator().manual_seed(seed)
    state = RecurrentState(*(torch.randn(t.shape, generator=g) * 0.5 for t in
                             RecurrentState.zeros(model.spec, 1).tensors()))
    for t in state.tensors():
        t.requires_grad_(True)
    hidden, _ = model.hidden(tokens[:, :-1], state)
    loss, _ = head_loss(hidden, model.head, tokens[:, 1:], torch.ones(tokens[:, 1:].shape))
    loss.backward()
    with torch.no_grad():
        logits, _ = model(tokens, state)
    return logits, torch.cat([t.grad.flatten() for t in state.tensors()])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_a_quantized_model_is_exactly_the_model_of_its_dequantized_matrices(random_models, arch, kind, monkeypatch):
    monkeypatch.setattr(quant_module, "CHUNK_BYTES", 64 * 192 * 4)  # the head and the ffn in several chunks
    model = load_model(random_models[arch], quant=kind)
    tokens = torch.randint(0, 320, (1, 40), generator=torch.Generator().manual_seed(1))
    got = _logits_and_state_gradient(model, tokens)
    want = _logits_and_state_gradient(_dense_twin(model, random_models[arch]), tokens)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))


def _scratch_held_after(work) -> int:
    """Bytes of dequantizing buffers a fresh thread holds after running `work` (they are per thread)."""
    held = []

    def run():
        work()
        held.append(sum(b.untyped_storage().nbytes() for b in quant_module._SCRATCH.__dict__["buffers"].values()))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return held[0]


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunk_bytes", [64 * 192 * 2, 1 << 20])  # the head in chunks of rows, or whole
def test_scratch_bytes_is_what_a_step_holds_and_allocate_scratch_holds_it_at_once(random_models, kind, dtype,
                                                                                  chunk_bytes, monkeypatch):
    """The budget counts the buffers from the checkpoint's shapes before loading and the plan reads RSS after
    allocate_scratch: both must be what a training step really leaves behind."""
    monkeypatch.setattr(quant_module, "CHUNK_BYTES", chunk_bytes)
    spec, weights = read_checkpoint(random_models["v7"])
    model = build_model(spec, weights, dtype=dtype, quant=kind)
    shapes = [tuple(m.weight.shape) for m in build_model(spec, weights).modules() if isinstance(m, torch.nn.Linear)]
    want = quant_module.scratch_bytes(kind, shapes, dtype or torch.float32)
    tokens = torch.randint(0, 320, (1, 40), generator=torch.Generator().manual_seed(1))
    assert _scratch_held_after(lambda: _logits_and_state_gradient(model, tokens)) == want
    assert _scratch_held_after(lambda: quant_module.allocate_scratch(model)) == want


# measured on random_models (docs/quantization.md): logits' relative error 0.013-0.016 (int8), 0.17-0.20 (nf4);
# cosine of the state gradient with the original's 0.9997-0.9998 (int8), 0.934-0.962 (nf4)
CLOSE = {"int8": (0.03, 0.999), "nf4": (0.3, 0.9)}


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_quantized_logits_and_state_gradient_are_close_to_the_originals(random_models, arch, kind, dtype):
    tokens = torch.randint(0, 320, (1, 64), generator=torch.Generator().manual_seed(1))
    ref_logits, ref_grad = _logits_and_state_gradient(load_model(random_models[arch]), tokens)
    logits, grad = _logits_and_state_gradient(load_model(random_models[arch], dtype=dtype, quant=kind), tokens)
    rel, cos = CLOSE[kind]
    assert (logits - ref_logits).norm() / ref_logits.norm() < rel
    assert F.cosine_similarity(grad, ref_grad, 0) > cos


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name,arch,enc", REAL_MODELS)
def test_real_models_quantized_logits_are_close(name, arch, enc, kind):
    """Measured: relative error of the logits 0.0024-0.0052 (int8), 0.043-0.079 (nf4)."""
    path = real_model_path(name)
    tokens = torch.tensor([prompt_tokens(enc)])
    with torch.no_grad():
        want, _ = load_model(path)(tokens)
        got, _ = load_model(path, quant=kind)(tokens)
    assert (got - want).norm() / want.norm() < {"int8": 0.01, "nf4": 0.12}[kind]
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > {"int8": 0.95, "nf4": 0.8}[kind]


def test_quantize_model_equals_quantizing_while_loading(random_models):
    loaded = load_model(random_models["v6"], quant="nf4")
    later = quantize_model(load_model(random_models["v6"]), "nf4")
    assert quantization(loaded) == quantization(later) == "nf4"
    assert not any(isinstance(m, torch.nn.Linear) for m in later.modules())
    assert all(torch.equal(a, b) for a, b in zip(loaded.buffers(), later.buffers(), strict=True))
    with pytest.raises(ValueError, match="choose from int8, nf4"):
        quantize_model(load_model(random_models["v6"]), "int4")


def test_paging_out_a_quantized_checkpoint_tensor_loses_nothing(random_models):
    """Once quantized, a memory-mapped weight's pages are handed back to the kernel: read again, they are the same."""
    _, weights = read_checkpoint(random_models["v7"])
    mapped, in_memory = weights["head.weight"], torch.randn(1000, 1000)
    copies = mapped.clone(), in_memory.clone()
    QuantizedLinear.from_weight(mapped, "nf4")
    QuantizedLinear.from_weight(in_memory, "nf4")
    assert torch.equal(mapped, copies[0]) and torch.equal(in_memory, copies[1])


@pytest.mark.parametrize("kind,ratio", [("int8", 0.30), ("nf4", 0.20)])
def test_a_quantized_model_holds_a_fraction_of_the_fp32_bytes(kind, ratio):
    """Whole models (every parameter and buffer); a shape whose matrices dominate, as in real models."""
    sd = random_checkpoint("v7", n_layer=1, n_embd=2048, head_size=64, vocab_size=256)
    spec = spec_from_state_dict(sd)

    def held(model) -> int:
        return sum(t.nbytes for t in [*model.parameters(), *model.buffers()])

    assert held(build_model(spec, sd, quant=kind)) < ratio * held(build_model(spec, sd))


# ---------------------------------------------------------------- training


@pytest.mark.parametrize("kind", KINDS)
def test_training_on_a_quantized_model_learns_a_state_for_the_original(tmp_path, kind):
    """A few steps with quant lower the loss; the state is the base model's (same sha256), records the
    quantization, and lowers the held-out loss of the unquantized model too."""
    data = tmp_path / "small.jsonl"
    data.write_text("\n".join(TRAIN.read_text().splitlines()[:16]) + "\n")
    cfg = TrainConfig(model=str(EXAMPLE_MODEL), data=[str(data)], out=str(tmp_path / "run"), steps=8, micro_bsz=2,
                      ctx_len=128, warmup_steps=2, quant=kind, save_every=8, val_every=8, seed=1)
    result = train(cfg, progress=False)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-3:]) < sum(losses[:3])
    state = result.state
    assert state.metadata["training"]["hyperparameters"]["quant"] == kind
    spec, _ = read_checkpoint(EXAMPLE_MODEL)
    assert state.base_model_sha256 == spec.sha256 and state.check(spec) == []
    plain = load_model(EXAMPLE_MODEL)
    val = load_dataset([str(VAL)], plain.tokenizer, 128, plain.spec.vocab_size)
    held_out = [val[i] for i in range(16)]
    zero, tuned = evaluate(plain, held_out), evaluate(plain, held_out, state.to_recurrent())
    assert tuned.loss < zero.loss


def test_train_state_on_a_quantized_model_records_it():
    model = load_model(EXAMPLE_MODEL, dtype=torch.bfloat16, quant="int8")
    records = [json.loads(line) for line in TRAIN.read_text().splitlines()[:4]]
    state = train_state(model, records, TrainConfig(steps=1, ctx_len=64), progress=False)
    assert state.metadata["training"]["hyperparameters"]["quant"] == "int8"
    assert state.metadata["training"]["hyperparameters"]["precision"] == "bf16"


def test_a_bad_quant_is_refused_with_one_line(tmp_path):
    for args in (["train", "--model", str(EXAMPLE_MODEL), "--data", str(TRAIN), "--out", str(tmp_path / "o")],
                 ["eval", "--model", str(EXAMPLE_MODEL), "--data", str(VAL)],
                 ["generate", "--model", str(EXAMPLE_MODEL), "--prompt", "hi"]):
        r = CliRunner().invoke(cli, [*args, "--quant", "int4"])
        assert r.exit_code == 1 and "Traceback" not in r.output, r.output
        assert r.output.strip().splitlines() == ["Error: --quant int4: choose from int8, nf4"]
    with pytest.raises(Exception, match="quant='fp4': choose from int8, nf4"):
        TrainConfig(quant="fp4").validate()

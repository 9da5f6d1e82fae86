"""The lean training step: the fused head + loss, recompute by memory budget, one copy of the weights."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO

from rwkv_state_hub import StateHubError
from rwkv_state_hub import loss as loss_module
from rwkv_state_hub.checkpoint import read_checkpoint
from rwkv_state_hub.data import Batch
from rwkv_state_hub.errors import speak_cli
from rwkv_state_hub.loss import batch_loss, head_loss
from rwkv_state_hub.model import LearnedState, build_model, common, load_model, memory
from rwkv_state_hub.model import quant as quant_module
from rwkv_state_hub.model.memory import plan_recompute, rss_bytes, saved_bytes_per_token
from rwkv_state_hub.model.quant import QuantizedLinear
from rwkv_state_hub.random_model import random_checkpoint, save_checkpoint


def full_logits_loss(hidden, head, targets, weight):
    logits = F.linear(hidden.to(head.dtype), head).to(hidden.dtype)
    return (F.cross_entropy(logits.transpose(1, 2), targets, reduction="none") * weight).sum()


@pytest.mark.parametrize(("dtype", "way"), [(torch.float32, "flash"), (torch.float32, "chunked"),
                                           (torch.bfloat16, "chunked"), (torch.bfloat16, "fused")])
def test_head_loss_equals_full_logits_cross_entropy(monkeypatch, dtype, way):
    """Every way through the head: flash attention (fp32, training), the C++ kernel from bf16 logits to their
    gradient (bf16, training), and chunked logits (every head; forced here by taking the others away)."""
    monkeypatch.setattr(loss_module, "HEAD_CHUNK_BYTES", 16 * 500 * 4)  # 16 rows a chunk: 38 chunks, the last short
    calls = []
    kernel, fused = loss_module._FLASH, loss_module.cpu_kernels.xent_bf16_
    if way == "flash":
        assert kernel is not None, "torch's CPU flash-attention kernel is missing: the fp32 head runs chunked"
    if way == "fused":
        assert loss_module.cpu_kernels.load() is not None, "the CPU kernels did not build: the bf16 head runs chunked"
    monkeypatch.setattr(loss_module, "_FLASH", (lambda *a, **k: calls.append(1) or kernel(*a, **k))
                        if way == "flash" else None)
    monkeypatch.setattr(loss_module.cpu_kernels, "xent_bf16_", lambda *a: calls.append(1) or fused(*a))
    if way != "fused":
        monkeypatch.setattr(loss_module, "_fused_bf16", lambda head: False)
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(48, 500, bias=False).requires_grad_(False)
    head.weight.data = (torch.randn(500, 48, generator=g) / 7).to(dtype)
    hidden = torch.randn(2, 301, 48, generator=g, requires_grad=True)
    targets = torch.randint(0, 500, (2, 301), generator=g)
    weight = (torch.rand(2, 301, generator=g) > 0.3).float()
    weight[1, 250:] = 0  # padding
    ours, correct = head_loss(hidden, head, targets, weight)
    assert correct is None  # a gradient is wanted: no accuracy
    (g_ours,) = torch.autograd.grad(ours * 0.37, hidden)
    ref = full_logits_loss(hidden, head.weight, targets, weight)
    (g_ref,) = torch.autograd.grad(ref * 0.37, hidden)
    assert bool(calls) == (way != "chunked")  # the way named ran
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    assert g_ours[1, 250:].abs().max() == 0  # nothing flows from padding
    if dtype == torch.float32:
        assert ((g_ours - g_ref).abs().max() / g_ref.abs().max()).item() < 1e-5
    else:  # bf16 rounds the logits' gradient before the matmul, in either way: both are as close to exact
        exact = hidden.detach().double().requires_grad_()
        (g_exact,) = torch.autograd.grad(full_logits_loss(exact, head.weight.double(), targets, weight) * 0.37, exact)

        def err(g):
            return ((g - g_exact).abs().max() / g_exact.abs().max()).item()

        assert err(g_ours) < 1e-2 and err(g_ours) < 2 * err(g_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_a_quantized_heads_streamed_loss_equals_the_full_logits_of_its_matrix(monkeypatch, kind, dtype):
    """The online softmax over blocks of a quantized head's rows (several blocks, several chunks of positions,
    the last of each short): loss, accuracy and gradient as full logits through the same matrix give them."""
    monkeypatch.setattr(quant_module, "CHUNK_BYTES", 70 * 48 * dtype.itemsize)  # 70 rows a block: 8 blocks
    monkeypatch.setattr(loss_module, "HEAD_CHUNK_BYTES", 64 * 70 * 4)  # 64 positions at a time: 10 chunks
    g = torch.Generator().manual_seed(0)
    head = QuantizedLinear.from_weight((torch.randn(500, 48, generator=g) / 3).to(dtype), kind)
    dense = head.to_dense().float()
    hidden = torch.randn(2, 301, 48, generator=g, requires_grad=True)
    targets = torch.randint(0, 500, (2, 301), generator=g)
    targets[0, :40] = F.linear(hidden[0, :40].detach(), dense).argmax(-1)  # some right answers, for the accuracy
    weight = (torch.rand(2, 301, generator=g) > 0.3).float()
    weight[1, 250:] = 0  # padding
    ours, _ = head_loss(hidden, head, targets, weight)
    (g_ours,) = torch.autograd.grad(ours * 0.37, hidden)
    exact = hidden.detach().double().requires_grad_()
    ref = full_logits_loss(exact, dense.double(), targets, weight)
    (g_ref,) = torch.autograd.grad(ref * 0.37, exact)
    with torch.no_grad():
        total, correct = head_loss(hidden, head, targets, weight)
        right = (F.linear(hidden.double(), dense.double()).argmax(-1) == targets).double().mul(weight).sum()
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: the products' inputs are rounded
    assert ours.item() == pytest.approx(ref.item(), rel=tolerance) and total.item() == pytest.approx(ours.item())
    assert ((g_ours - g_ref).abs().max() / g_ref.abs().max()).item() < tolerance
    assert g_ours[1, 250:].abs().max() == 0  # nothing flows from padding
    assert right > 0 and abs(correct.item() - right.item()) <= (0 if dtype == torch.float32 else 0.05 * right.item())
    with torch.no_grad():  # no positions at all: nothing, not an error
        assert head_loss(hidden[:, :0], head, targets[:, :0], weight[:, :0])[0].item() == 0


def test_head_loss_refuses_a_trainable_head():
    head = torch.nn.Linear(4, 8, bias=False)
    with pytest.raises(ValueError, match="frozen"):
        head_loss(torch.randn(1, 2, 4, requires_grad=True), head, torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2))
    with torch.no_grad():  # without a gradient (evaluation) any head will do
        head_loss(torch.randn(1, 2, 4), head, torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2))


def batch_of(spec, T: int, seed: int = 0, pad: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, spec.vocab_size, (2, T + 1), generator=g)
    mask = torch.ones(2, T, dtype=torch.bool)
    if pad:
        mask[1, T - pad :] = False
    return Batch(tokens[:, :-1], tokens[:, 1:], mask.float(), mask, int(mask.sum()))


def loss_and_state_grad(model, batch, learned):
    learned.zero_grad()
    loss = batch_loss(model, batch, learned())[0]
    loss.backward()
    return loss.detach(), learned.wkv.grad.clone()


@pytest.mark.parametrize("arch", ["v5.2", "v6", "v7"])
def test_recompute_by_layer_gives_identical_loss_and_state_gradient(random_models, arch):
    model = load_model(random_models[arch])
    g = torch.Generator().manual_seed(3)
    learned = LearnedState(model.spec, wkv=torch.randn(model.spec.state_shape(), generator=g) * 0.3)
    batch = batch_of(model.spec, 37, pad=9)
    # the fused training loss agrees with full logits
    hidden, _ = model.hidden(batch.inputs, learned(), batch.mask)
    full = full_logits_loss(hidden, model.head.weight, batch.targets, batch.loss_mask)
    loss0, grad0 = loss_and_state_grad(model, batch, learned)
    assert loss0.item() == pytest.approx(full.item(), rel=1e-6)
    for n in (1, model.spec.n_layer):
        model.recompute_layers = n
        loss, grad = loss_and_state_grad(model, batch, learned)
        assert torch.equal(loss, loss0)
        assert torch.allclose(grad, grad0, rtol=1e-6, atol=1e-9)
    assert model.gradient_checkpointing  # all layers: the old switch reads true
    model.gradient_checkpointing = False
    assert model.recompute_layers == 0


def test_plan_recompute_follows_the_budget():
    sd = random_checkpoint("v7", n_layer=6, n_embd=128, head_size=64, vocab_size=256)
    model = build_model(read_spec_free(sd), sd)
    per_token = saved_bytes_per_token(model)
    assert 20 * 4 * 128 < per_token < 400 * 4 * 128  # tens to hundreds of floats per channel per token
    layer = per_token * 4 * 512  # one layer's activations for a 4 x 512 batch
    budgets = [1e15, *(rss_bytes() + layer * k / 2 for k in range(60, -1, -1)), 0]
    plans = [plan_recompute(model, 4, 512, budget) for budget in budgets]
    assert plans[0] == 0 and plans[-1] == 6
    assert plans == sorted(plans)  # less memory, more recompute
    assert any(0 < n < 6 for n in plans)  # and partial plans in between


def read_spec_free(sd):
    from rwkv_state_hub.checkpoint import spec_from_state_dict

    return spec_from_state_dict(sd)


def test_bf16_model_shares_the_memory_mapped_checkpoint(tmp_path):
    path = tmp_path / "m.pth"
    save_checkpoint(random_checkpoint("v7", n_layer=2, n_embd=128, vocab_size=512, dtype=torch.bfloat16), path)
    spec, weights = read_checkpoint(path)
    model = build_model(spec, weights, dtype=torch.bfloat16)
    for name, p in model.named_parameters():
        if p.dim() == 2 and name != "blocks.0.att.r_k" and p.dtype == torch.bfloat16:
            assert p.data_ptr() == weights[name].data_ptr(), name  # the mapped file itself, not a copy
    wide = build_model(spec, weights, dtype=torch.float32)
    assert wide.emb.weight.dtype == torch.bfloat16 and wide.head.weight.dtype == torch.float32
    assert wide.emb.weight.data_ptr() != weights["emb.weight"].data_ptr()  # its own: the map can go
    tokens = torch.tensor([[1, 5, 511, 7]])
    assert torch.equal(wide.emb(tokens).float(), weights["emb.weight"][tokens].float())


RSS_PROBE = """
import gc, json, sys, torch
from rwkv_state_hub.model import load_model
from rwkv_state_hub.model.memory import rss_bytes

def load_and_touch():
    model = load_model(sys.argv[1], dtype=getattr(torch, sys.argv[2]))
    for p in model.parameters():
        p.view(-1)[:: 1024 // p.element_size()].sum()  # touch every page of every weight, no copies
    return model

load_and_touch()  # warm-up (lazy imports, allocator); the second load is measured
gc.collect()
before = rss_bytes()
model = load_and_touch()
print(json.dumps(rss_bytes() - before))
"""


@pytest.mark.slow
def test_loading_holds_one_copy_of_the_weights(tmp_path):
    """Measured in a fresh process: resident memory grows by the weights once (bf16: the mapped file; fp32:
    the widened matrices and the bf16 embedding), not by a checkpoint copy on top."""
    path = tmp_path / "m.pth"
    sd = random_checkpoint("v6", n_layer=2, n_embd=256, vocab_size=65536, dtype=torch.bfloat16)
    save_checkpoint(sd, path)
    n = sum(t.numel() for t in sd.values())
    emb = sd["emb.weight"].numel()
    del sd
    for dtype, expected in (("bfloat16", 2 * n), ("float32", 4 * (n - emb) + 2 * emb)):
        r = subprocess.run([sys.executable, "-c", RSS_PROBE, str(path), dtype], capture_output=True, text=True,
                           cwd=REPO, check=True)
        grew = json.loads(r.stdout)
        assert 0.9 * expected < grew < expected + (24 << 20), (dtype, grew / 2**20, expected / 2**20)


PEAK_PROBE = """
import json, sys, torch
from rwkv_state_hub.model import load_model
from rwkv_state_hub.model.memory import peak_rss_bytes, rss_bytes

load_model(sys.argv[2], dtype=torch.float32)  # a small one first: lazy imports, the allocator
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak (VmHWM) starts again from now
before = rss_bytes()
model = load_model(sys.argv[1], dtype=torch.float32)
print(json.dumps([peak_rss_bytes() - before, sum(p.numel() * p.element_size() for p in model.parameters())]))
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="resets the peak RSS through Linux's /proc")
def test_widening_a_checkpoint_holds_one_block_of_its_file_at_a_time(tmp_path):
    """Measured in a fresh process: loading a bf16 checkpoint into fp32 matrices peaks at the model it holds plus
    one block of the file (model.COPY_BLOCK_BYTES), not plus the largest matrix (64 MiB here: the head)."""
    from rwkv_state_hub.model import COPY_BLOCK_BYTES

    big, small = tmp_path / "big.pth", tmp_path / "small.pth"
    save_checkpoint(random_checkpoint("v7", n_layer=2, n_embd=512, vocab_size=65536, dtype=torch.bfloat16), big)
    save_checkpoint(random_checkpoint("v7", n_layer=2, n_embd=128, vocab_size=512, dtype=torch.bfloat16), small)
    r = subprocess.run([sys.executable, "-c", PEAK_PROBE, str(big), str(small)], capture_output=True, text=True,
                       cwd=REPO, check=True)
    peak, held = json.loads(r.stdout)
    head = 65536 * 512 * 2
    assert held < peak < held + COPY_BLOCK_BYTES + (16 << 20) < held + head, (peak / 2**20, held / 2**20)


@pytest.mark.slow
def test_bench_one_config_on_a_small_model(tmp_path):
    path = tmp_path / "m.pth"
    save_checkpoint(random_checkpoint("v7", n_layer=2, n_embd=128, vocab_size=512, dtype=torch.bfloat16), path)
    # in a fresh process, as the benchmark runs each configuration: the budget counts this process's RSS
    proc = subprocess.run([sys.executable, "-m", "rwkv_state_hub.bench", "--one", str(path), "lean-fp32",
                           "--ctx", "32", "--steps", "1"], capture_output=True, text=True, cwd=REPO, check=True)
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["tokens_per_s"] > 0 and r["gflops"] > 0 and r["recompute_layers"] == 0  # small: fits, no recompute
    assert r["matmul_gflops"] > 0  # the ceiling, measured in the configuration's own process beside its steps
    assert r["peak_rss_mib"] > r["weights_mib"] > 0
    r = subprocess.run([sys.executable, "-m", "rwkv_state_hub.cli", "bench", "--configs", "fp32,fast"],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode != 0 and "--configs fast" in r.stderr


def test_train_rejects_a_non_positive_memory_budget_and_one_too_small(tmp_path):
    from rwkv_state_hub.training import TrainConfig, budget, train

    speak_cli(False)  # Python's words: memory_budget=0
    cpu = torch.device("cpu")
    model = load_model(REPO / "rwkv_state_hub" / "examples" / "models" / "tiny-rwkv-5v2-730K.pth")
    with pytest.raises(StateHubError, match="memory_budget=0: must be greater than 0"):
        budget.plan(model, TrainConfig(memory_budget=0), cpu)
    # refused before anything is loaded ("m" does not exist), even where the budget would go unused
    with pytest.raises(StateHubError, match="memory_budget=-1"):
        train(TrainConfig(model="m", data=["d"], out=str(tmp_path), memory_budget=-1, grad_checkpoint=True),
              progress=False)
    with pytest.raises(StateHubError, match=r"memory_budget=0.001: .* the least that would work is memory_budget="):
        budget.plan(model, TrainConfig(memory_budget=1e-3), cpu)
    roomy = budget.plan(model, TrainConfig(memory_budget=1e6), cpu)
    assert (roomy.recompute, roomy.time_chunk, roomy.fits) == (0, None, True)
    assert budget.plan(model, TrainConfig(memory_budget=1e6, grad_checkpoint=True), cpu).recompute == 12


def test_training_under_a_tight_memory_budget_learns_the_same_state(tmp_path, monkeypatch):
    from test_train import cfg

    from rwkv_state_hub.training import budget, train

    recomputed = []  # one entry per block run without keeping its activations

    def counting_apply(*args):
        recomputed.append(1)
        return real_apply(*args)

    real_apply = common._Recomputed.apply
    monkeypatch.setattr(common._Recomputed, "apply", counting_apply)
    plain = train(cfg(tmp_path, out=str(tmp_path / "a"), steps=2), progress=False).state
    assert recomputed == []  # no budget given and a tiny model: it fits, nothing is recomputed
    # a budget between the step recomputing every block and one keeping a block's activations (RSS held fixed,
    # so that the estimate does not move between here and the run)
    monkeypatch.setattr(memory, "rss_bytes", lambda: 200 << 20)
    monkeypatch.setattr(budget, "LOAD_EXTRA", 0)  # with the RSS held fixed, loading adds nothing to it
    c = cfg(tmp_path)
    model = load_model(c.model)
    *_, keep_one, recompute_all = memory.step_estimates(model, c.micro_bsz, c.ctx_len)
    tight = ((keep_one + recompute_all) / 2 + budget.run_slack(model.spec)) / 2**30
    lean = train(cfg(tmp_path, out=str(tmp_path / "b"), steps=2, memory_budget=tight), progress=False).state
    n_layer = read_checkpoint(cfg(tmp_path).model)[0].n_layer
    assert len(recomputed) == 2 * n_layer  # 2 steps of one micro-batch: every block recomputed each time
    assert torch.allclose(plain.wkv, lean.wkv, atol=1e-6)
    assert lean.metadata["training"]["hyperparameters"]["memory_budget"] == tight


def test_a_budget_recomputing_cannot_meet_runs_in_time_chunks(monkeypatch):
    """plan_step: the longest time chunk with the fewest recomputed blocks within the budget (RSS held fixed)."""
    monkeypatch.setattr(memory, "rss_bytes", lambda: 200 << 20)
    model = load_model(REPO / "rwkv_state_hub" / "examples" / "models" / "tiny-rwkv-7v0-834K.pth")
    whole, half = memory.step_estimates(model, 2, 512), memory.step_estimates(model, 2, 256, ctx=512)
    roomy = memory.plan_step(model, 2, 512, whole[0] + 1)
    assert (roomy.recompute, roomy.time_chunk, roomy.fits) == (0, None, True)
    chunked = memory.plan_step(model, 2, 512, (whole[-1] + half[-1]) / 2)
    assert chunked.fits and chunked.time_chunk == 256 and chunked.estimate <= (whole[-1] + half[-1]) / 2
    assert chunked.recompute == next(n for n, e in enumerate(half) if e <= (whole[-1] + half[-1]) / 2)
    hopeless = memory.plan_step(model, 2, 512, 1 << 20)
    least = min((memory.step_estimates(model, 2, c, ctx=512, in_file=f)[-1], c, f)
                for c in memory.time_chunks(512) for f in (False, True))
    assert not hopeless.fits and hopeless.recompute == 12
    assert least[2]  # sixteen chunks of 32 hold one boundary state in memory, not 16
    # the chunk and the boundary states that need least
    assert (hopeless.estimate, hopeless.time_chunk or 512, hopeless.boundaries_in_file) == pytest.approx(least)
    dense = memory.step_estimates(model, 2, 32, ctx=512)[-1]
    spilled = memory.plan_step(model, 2, 512, (least[0] + dense) / 2)  # fits only with the boundaries in a file
    assert spilled.fits and spilled.boundaries_in_file and spilled.estimate <= (least[0] + dense) / 2


def test_the_cli_refuses_a_budget_too_small_before_loading_and_names_the_least(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "WEATHER. Oslo: sunny. END."}\n')
    model = REPO / "rwkv_state_hub" / "examples" / "models" / "rwkv7-example-L4-D256.pth"
    r = subprocess.run([sys.executable, "-m", "rwkv_state_hub.cli", "train", "--model", str(model), "--data",
                        str(data), "--out", str(tmp_path / "run"), "--memory-budget", "0.05"],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    least = float(r.stderr.split("the least that would work is --memory-budget ")[1].split(",")[0])
    assert "before loading" in r.stderr and least > 0.05 and not (tmp_path / "run").exists()
    ok = subprocess.run([sys.executable, "-m", "rwkv_state_hub.cli", "train", "--model", str(model), "--data",
                         str(data), "--out", str(tmp_path / "run"), "--memory-budget", str(least), "--steps", "1"],
                        capture_output=True, text=True, cwd=REPO)
    assert ok.returncode == 0, ok.stderr[-2000:]


def test_a_training_run_imports_neither_torch_dynamo_nor_sympy(tmp_path):
    """torch.optim, torch.utils.checkpoint, torch.autograd.backward handed gradients and nn.Embedding's init on the
    meta device each import torch._dynamo or sympy: 70 MiB of RSS for the whole run, which a run under a memory
    budget cannot spare. A run that recomputes every block, in time chunks, quantized, with validation, checkpoints
    and exports loads neither (a fresh process: this one may have loaded them already)."""
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join((REPO / "examples" / "data" / "train.jsonl").read_text().splitlines()[:4]) + "\n")
    model = REPO / "rwkv_state_hub" / "examples" / "models" / "tiny-rwkv-5v2-730K.pth"
    code = f"""
import sys
from pathlib import Path
from rwkv_state_hub.training import TrainConfig, train
for quant in (None, "int8"):
    train(TrainConfig(model={str(model)!r}, data=[{str(data)!r}], val_data=[{str(data)!r}], quant=quant,
                      out={str(tmp_path)!r} + f"/run-{{quant}}", steps=2, ctx_len=64, time_chunk=16,
                      grad_checkpoint=True, val_every=1, save_every=1, export=["pth", "ai00"], seed=1), progress=False)
print(sorted(m for m in ("torch._dynamo", "sympy") if m in sys.modules))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "run-int8" / "state.pth").exists()

"""llama.cpp as a consumer (issue 20): GGUF files of the real checkpoints written here (tests/gguf_fixture.py), our
bounded GGUF reader and identity check, the sequence-state blob, and, where llama-cpp-python is installed, llama.cpp's
own logits and greedy text from our states against the rwkv pip package's (the independent reference)."""

from __future__ import annotations

import contextlib
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import EXAMPLE_MODEL, REPO, random_state_like, real_model_path
from gguf_fixture import write_gguf
from pip_reference import pip_model

from rwkv_state_hub import State
from rwkv_state_hub import llama_cpp as lc
from rwkv_state_hub.checkpoint import read_spec
from rwkv_state_hub.errors import InvalidCheckpointError, InvalidStateError, ModelMismatchError, StateHubWarning
from rwkv_state_hub.pip_bridge import pip_state, state_from_pip

EXAMPLE_V7 = REPO / "rwkv_state_hub" / "examples" / "models" / "rwkv7-example-L4-D256.pth"
# name -> (checkpoint, architecture): both RWKV-7 shapes we bundle (1 head; 4 heads, bf16) and the real RWKV-6
MODELS = {"7v0": (lambda: EXAMPLE_MODEL, "v7"), "example": (lambda: EXAMPLE_V7, "v7"),
          "6v0": (lambda: real_model_path("tiny-rwkv-6v0-1m"), "v6")}
TOKENS = list(b"WEATHER. Oslo: rainy, 9 C, a light breeze. Take an umbrella. END.\nThe ")
# llama.cpp's f32 graph against pip's fp32 maths, from the zero state and from a state: the max |difference| of the
# logits measured here (x86, 2 cores) was 1.0e-6 (7v0), 9.5e-6 (example), 8.3e-6 (6v0), on logits up to 21;
# the bound leaves 10x for another CPU's summation order
LOGIT_TOL = 1e-4


def _has_llama() -> str | None:
    try:
        import llama_cpp  # noqa: F401
    except ImportError as e:
        return f"llama-cpp-python is not installed ({e}); scripts/setup.sh builds it where a compiler is present"
    return None


needs_llama = pytest.mark.skipif(_has_llama() is not None, reason=str(_has_llama()))


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory) -> dict[tuple[str, str], Path]:
    """(model, dtype) -> a GGUF of that real checkpoint, made lazily."""
    folder, made = tmp_path_factory.mktemp("gguf"), {}

    class Lazy(dict):
        def __missing__(self, key):
            name, dtype = key
            made[key] = write_gguf(MODELS[name][0](), folder / f"{name}-{dtype}.gguf", dtype)
            return made[key]

    return Lazy()


def _state(name: str, seed: int = 0, full: bool = True):
    spec = read_spec(MODELS[name][0]())
    return random_state_like(spec, seed=seed, scale=0.5, full=full), spec


# ---------------------------------------------------------------- the GGUF header and the weights' identity


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
def test_a_gguf_of_the_checkpoint_is_the_same_weights(ggufs, name, dtype):
    state, spec = _state(name)
    model = lc.read_gguf(ggufs[name, dtype])
    assert lc.gguf_spec(model).dims() == spec.dims()
    assert lc.gguf_fingerprint(model, lc.gguf_spec(model)) == spec.fingerprint
    (note,) = lc.check_gguf(state, ggufs[name, dtype])
    assert "same weights" in note and model.path.endswith(f"{name}-{dtype}.gguf") and "refused" not in note


def test_a_quantized_gguf_is_checked_by_its_shape_and_says_so(ggufs):
    state, _ = _state("7v0")
    (note,) = lc.check_gguf(state, ggufs["7v0", "q8_0"])
    assert "quantized (Q8_0)" in note and "fingerprint" in note


@pytest.mark.parametrize("name", ["7v0", "6v0"])
def test_a_state_for_other_weights_of_the_same_shape_is_refused(ggufs, tmp_path, name):
    pth, _ = MODELS[name]
    key = torch.load(pth(), weights_only=True)["blocks.1.att.key.weight"].float()
    other = write_gguf(pth(), tmp_path / "fine-tuned.gguf", "f32",
                       change={"blk.1.time_mix_key.weight": (key * 1.01).numpy()})
    state, _ = _state(name)
    with pytest.raises(ModelMismatchError, match="holds other weights.*force"):
        lc.check_gguf(state, other)
    (warning,) = lc.check_gguf(state, other, force=True)
    assert "holds other weights" in warning


def test_a_state_of_another_shape_is_refused_even_with_force(ggufs):
    state, _ = _state("example")
    with pytest.raises(ModelMismatchError):
        lc.check_gguf(state, ggufs["7v0", "f32"], force=True)
    v6_state, _ = _state("6v0")
    with pytest.raises(ModelMismatchError):
        lc.check_gguf(v6_state, ggufs["7v0", "f32"], force=True)


def test_a_state_without_identity_is_checked_by_shape_and_says_so(ggufs):
    state, _ = _state("7v0")
    bare = State(state.wkv, state.shift, {k: v for k, v in state.metadata.items() if not k.startswith("base_")})
    (note,) = lc.check_gguf(bare, ggufs["7v0", "f32"])
    assert "does not record its base model's weights fingerprint" in note


def _corruptions(data: bytes) -> dict[str, bytes]:
    n_tensors_at, n_kv_at = 8, 16
    return {
        "empty": b"",
        "not GGUF": b"GGML" + data[4:],
        "version 4": data[:4] + struct.pack("<I", 4) + data[8:],
        "big-endian": data[:4] + struct.pack(">I", 3) + data[8:],
        "2^60 tensors": data[:n_tensors_at] + struct.pack("<Q", 1 << 60) + data[16:],
        "2^60 keys": data[:n_kv_at] + struct.pack("<Q", 1 << 60) + data[24:],
        "a key of 2^62 bytes": data[:24] + struct.pack("<Q", 1 << 62) + data[32:],
        "cut in the header": data[:300],
        "cut in the tensors": data[: len(data) // 2],
    }


def test_a_damaged_gguf_is_one_line_naming_it(ggufs, tmp_path):
    data = ggufs["7v0", "f32"].read_bytes()
    for why, bad in _corruptions(data).items():
        path = tmp_path / f"{why}.gguf"
        path.write_bytes(bad)
        with pytest.raises(InvalidCheckpointError) as e:
            lc.gguf_spec(lc.read_gguf(path))
        assert str(path) in str(e.value) and "\n" not in str(e.value), why


def test_every_truncation_of_a_gguf_header_is_refused(ggufs, tmp_path):
    data = ggufs["6v0", "f32"].read_bytes()
    path = tmp_path / "cut.gguf"
    for n in range(0, 4096, 7):
        path.write_bytes(data[:n])
        with pytest.raises(InvalidCheckpointError):
            lc.read_gguf(path)


# ---------------------------------------------------------------- the sequence-state blob


@pytest.mark.parametrize("name", ["7v0", "6v0"])
@pytest.mark.parametrize("full", [True, False])
def test_the_blob_reads_back_as_the_state(ggufs, name, full):
    state, spec = _state(name, full=full)
    blob = lc.state_blob(state, ggufs[name, "f32"])
    back = lc.parse_blob(blob, arch=spec.arch)
    assert torch.equal(back.wkv, state.wkv.float())
    assert torch.equal(back.shift, state.shift if full else torch.zeros_like(back.shift))
    L, C, N = spec.n_layer, spec.n_embd, spec.head_size
    assert len(blob) == 28 + L * (2 * 12 + 8 * C + 4 * C * N)  # header, then per layer two row headers and rows


def test_a_damaged_blob_is_one_line():
    state, spec = _state("7v0")
    blob = lc._encode(state, "v7")
    for why, bad in {"short": blob[:20], "cut": blob[:-4], "trailing": blob + b"\0" * 4,
                     "magic": b"\0" + blob[1:], "two cells": blob[:8] + struct.pack("<I", 2) + blob[12:],
                     "f16 rows": blob[:28] + struct.pack("<i", 1) + blob[32:]}.items():
        with pytest.raises(InvalidStateError) as e:
            lc.parse_blob(bad)
        assert "not a llama.cpp RWKV sequence state" in str(e.value) and "\n" not in str(e.value), why


def test_export_writes_the_blob_and_refuses_other_weights(ggufs, tmp_path):
    state, _ = _state("7v0")
    src = state.save_pretrained(tmp_path / "s", exports=()) / "state.safetensors"
    out = tmp_path / "state.bin"
    run = [sys.executable, "-m", "rwkv_state_hub.cli", "export", str(src), "--format", "llama.cpp"]
    ok = subprocess.run(run + ["--gguf", str(ggufs["7v0", "f16"]), "-o", str(out)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "same weights" in ok.stderr and f"wrote {out}" in ok.stdout
    assert torch.equal(lc.parse_blob(out.read_bytes()).wkv, state.wkv)
    missing = subprocess.run(run + ["-o", str(tmp_path / "x.bin")], capture_output=True, text=True)
    assert missing.returncode != 0 and "--gguf" in missing.stderr
    other = subprocess.run(run + ["--gguf", str(ggufs["example", "f32"]), "-o", str(tmp_path / "y.bin")],
                           capture_output=True, text=True)
    assert other.returncode != 0 and not (tmp_path / "y.bin").exists()


# ---------------------------------------------------------------- llama.cpp itself


def _llama(path: Path):
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=256, n_batch=256, logits_all=True, verbose=False, seed=0)


def _pip_logits(name: str, tokens: list[int], state) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """All positions' logits and the final state from the rwkv pip package, one token at a time."""
    pth, arch = MODELS[name]
    model = pip_model(pth(), arch)
    s = pip_state(state) if state is not None else None
    rows = []
    for t in tokens:
        out, s = model.forward([t], s)
        rows.append(out.float())
    return torch.stack(rows), s


def _llama_logits(llm, tokens: list[int]) -> torch.Tensor:
    start = llm.n_tokens
    llm.eval(tokens)
    return torch.from_numpy(llm.scores[start:start + len(tokens)].copy()).float()


@needs_llama
@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_llama_cpp_from_the_zero_state_gives_pips_logits(ggufs, name):
    """Proves the fixture: llama.cpp reads our GGUF as the model pip reads from the .pth."""
    llm = _llama(ggufs[name, "f32"])
    ours = _llama_logits(llm, TOKENS)
    ref, _ = _pip_logits(name, TOKENS, None)
    assert (ours - ref).abs().max() < LOGIT_TOL


@needs_llama
@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_llama_cpp_holds_the_state_pip_holds_after_a_prompt(ggufs, name):
    """Pins the layout: llama.cpp's own blob after a prompt, read by our parser, is pip's state (both shifts, the
    wkv state in our orientation)."""
    llm = _llama(ggufs[name, "f32"])
    llm.eval(TOKENS)
    theirs = lc.state_from_llama(llm)
    _, spec = _state(name)
    _, s = _pip_logits(name, TOKENS, None)
    ref = state_from_pip(s, spec)
    assert (theirs.wkv - ref.wkv).abs().max() < 1e-3 * (1 + ref.wkv.abs().max())
    assert (theirs.shift - ref.shift).abs().max() < 1e-3 * (1 + ref.shift.abs().max())


@needs_llama
@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_a_state_loaded_into_llama_cpp_gives_pips_logits_and_text(ggufs, name):
    state, _ = _state(name, seed=3)
    llm = _llama(ggufs[name, "f32"])
    lc.load_into_llama(llm, state)
    assert lc.state_from_llama(llm).wkv.equal(state.wkv.float())  # llama.cpp holds exactly what we wrote
    ours = _llama_logits(llm, TOKENS)
    ref, _ = _pip_logits(name, TOKENS, state)
    assert (ours - ref).abs().max() < LOGIT_TOL
    baseline, _ = _pip_logits(name, TOKENS, None)
    assert (ref - baseline).abs().max() > 100 * LOGIT_TOL  # the state changed the logits: the check has teeth


@needs_llama
@pytest.mark.slow
@pytest.mark.parametrize(("dtype", "tol"), [("f16", 2e-2), ("bf16", 5e-2), ("q8_0", 0.25)])
def test_a_state_works_in_a_smaller_gguf_within_its_rounding(ggufs, dtype, tol):
    """F16/BF16/Q8_0 weights (llama.cpp then rounds activations too): measured max |difference| from pip's fp32
    logits 4.2e-3 / 2.0e-2 / 9.5e-2 on the example model; the bounds are ~2.5x those, and the state's own effect on
    the logits is far larger."""
    state, _ = _state("example", seed=3)
    llm = _llama(ggufs["example", dtype])
    with pytest.warns(StateHubWarning, match="quantized") if dtype == "q8_0" else contextlib.nullcontext():
        lc.load_into_llama(llm, state)
    ours = _llama_logits(llm, TOKENS)
    ref, _ = _pip_logits("example", TOKENS, state)
    baseline, _ = _pip_logits("example", TOKENS, None)
    assert (ours - ref).abs().max() < tol < (ours - baseline).abs().max() / 10


@needs_llama
@pytest.mark.slow
def test_greedy_text_from_a_state_in_llama_cpp_is_pips(ggufs):
    state, _ = _state("example", seed=5)
    llm = _llama(ggufs["example", "f32"])
    lc.load_into_llama(llm, state)
    prompt = list(b"The ")
    theirs = []
    for token in llm.generate(prompt, reset=False, temp=0.0, top_k=1, repeat_penalty=1.0):
        theirs.append(token)
        if len(theirs) == 48:
            break
    model, s, ours, tokens = pip_model(EXAMPLE_V7, "v7"), pip_state(state), [], prompt
    for _ in range(48):
        out, s = model.forward(tokens, s)
        tokens = [int(out.argmax())]
        ours.append(tokens[0])
    assert theirs == ours


def _readme_block(start: str) -> str:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    i = readme.index(start)
    return readme[i:readme.index("```", i)]


@needs_llama
@pytest.mark.slow
def test_the_readme_example_runs_and_gives_pips_text(ggufs, tmp_path, monkeypatch, capsys):
    """README "Using a state in other programs", llama.cpp: the export command and the Python snippet, verbatim,
    on the example RWKV-7 (as rwkv7-0.1b.gguf); the snippet's greedy text is pip's from the same state."""
    import shutil

    from click.testing import CliRunner

    from rwkv_state_hub.cli import cli

    command = _readme_block("rwkv-state export my-state.safetensors --format llama.cpp").split()
    snippet = _readme_block("from llama_cpp import Llama")
    state, _ = _state("example", seed=7)
    monkeypatch.chdir(tmp_path)
    shutil.copy(ggufs["example", "f16"], "rwkv7-0.1b.gguf")
    state.save_pretrained("s", exports=())
    shutil.copy("s/state.safetensors", "my-state.safetensors")
    r = CliRunner().invoke(cli, command[1:])
    assert r.exit_code == 0, r.output
    assert torch.equal(lc.parse_blob(Path("my-state.bin").read_bytes()).wkv, state.wkv)
    scope: dict = {}
    exec(compile(snippet, "README snippet (llama.cpp)", "exec"), scope)
    printed = capsys.readouterr().out
    eos = scope["llm"].token_eos()
    model, s, tokens, ours = pip_model(EXAMPLE_V7, "v7"), pip_state(state), list(b"User: hi\n\nAssistant:"), []
    while len(ours) < 100:
        out, s = model.forward(tokens, s)
        tokens = [int(out.argmax())]
        if tokens[0] == eos:
            break
        ours += tokens
    assert len(ours) > 20 and printed == bytes(ours).decode("utf-8", errors="replace") + "\n"

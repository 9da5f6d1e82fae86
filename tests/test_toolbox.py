"""bake, mix and diff: states without training."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
from conftest import ARCHS, REPO, random_state_like

from rwkv_state_hub import State, load_model, load_state, read_spec
from rwkv_state_hub.errors import InvalidOptionError, ModelMismatchError
from rwkv_state_hub.files import sha256_file
from rwkv_state_hub.formats import save_native
from rwkv_state_hub.generate import generate
from rwkv_state_hub.pip_bridge import load_pip_model, pip_state
from rwkv_state_hub.random_model import random_checkpoint, save_checkpoint
from rwkv_state_hub.tokenizer import get_tokenizer
from rwkv_state_hub.toolbox import bake, diff, mix

CLI = [sys.executable, "-m", "rwkv_state_hub.cli"]
PROMPT = "User: Tell me about the sea.\n\n"
THEN = "Assistant: The sea"


@pytest.fixture(scope="module")
def byte_models(tmp_path_factory) -> dict:
    """Random models with the 256-byte vocabulary, so generated ids decode as bytes."""
    folder = tmp_path_factory.mktemp("byte-models")
    paths = {}
    for i, arch in enumerate(ARCHS):
        paths[arch] = folder / f"{arch}.pth"
        save_checkpoint(random_checkpoint(arch, n_layer=2, n_embd=128, vocab_size=256, seed=10 + i), paths[arch])
    return paths


@pytest.mark.parametrize("arch", ARCHS)
def test_baked_state_continues_like_the_prompt(byte_models, arch, tmp_path):
    """Greedy text from (baked prompt state + THEN) = greedy text after PROMPT + THEN from the zero state,
    also after a round trip through the native file (which carries the token shift)."""
    model = load_model(byte_models[arch])
    tok = get_tokenizer("bytes")
    baked = bake(model, tok, PROMPT)
    assert baked.shift is not None and baked.metadata["training"]["method"] == "baked"
    assert baked.metadata["training"]["prompt_tokens"] == len(PROMPT.encode())
    assert baked.base_model_sha256 == read_spec(byte_models[arch]).sha256
    save_native(baked, tmp_path / "baked.safetensors")
    reread = load_state(tmp_path / "baked.safetensors")
    whole = generate(model, tok, PROMPT + THEN, None, max_tokens=24, temperature=0)
    assert generate(model, tok, THEN, reread, max_tokens=24, temperature=0) == whole
    # without its token shift (what pth/ai00 consumers get) the state is a different one
    wkv_only = type(reread)(reread.wkv, None, reread.metadata)
    with torch.no_grad():
        a, _ = model(torch.tensor([list(THEN.encode())]), reread.to_recurrent())
        b, _ = model(torch.tensor([list(THEN.encode())]), wkv_only.to_recurrent())
    assert (a[0, 0] - b[0, 0]).abs().max() > 1e-3


def test_baked_state_in_the_pip_package_equals_the_prompt(random_models):
    """The rwkv pip package, handed the baked state through pip_state, continues exactly as after the prompt."""
    path = random_models["v7"]
    model = load_model(path)
    baked = bake(model, get_tokenizer("bytes"), PROMPT)
    pip = load_pip_model(path)
    after_prompt, _ = pip.forward(list((PROMPT + THEN).encode()), None, full_output=True)
    from_state, _ = pip.forward(list(THEN.encode()), pip_state(baked), full_output=True)
    assert (after_prompt[-len(THEN):] - from_state).abs().max() < 1e-4


def test_mix(random_models, tmp_path):
    spec = read_spec(random_models["v6"])
    a = random_state_like(spec, seed=1, full=True)
    b = random_state_like(spec, seed=2)
    a.source, b.source = "a.safetensors", "b.safetensors"
    full = random_state_like(spec, seed=4, full=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # two full states: nothing to warn of
        assert torch.equal(mix([a, full], [1.0, 0.0]).shift, a.shift)
    with pytest.warns(UserWarning, match=r"^b.safetensors has no token-shift state.*is 0.7 x a.safetensors's alone"):
        m = mix([a, b], [0.7, 0.3])
    assert torch.allclose(m.wkv, 0.7 * a.wkv + 0.3 * b.wkv)
    assert torch.allclose(m.shift, 0.7 * a.shift)  # b has no token shift: a zero one
    assert m.base_model_sha256 == spec.sha256
    assert [(p["weight"], p["sha256"]) for p in m.metadata["training"]["parents"]] == [(0.7, None), (0.3, None)]
    other = random_state_like(spec, seed=3)
    other.metadata["base_model_sha256"] = "f" * 64
    with pytest.raises(ModelMismatchError, match="different base models"):
        mix([a, other], [0.5, 0.5])
    with pytest.raises(ModelMismatchError, match="not the same model"):
        mix([a, State(torch.zeros(2, 2, 64, 64))], [0.5, 0.5])
    with pytest.raises(InvalidOptionError, match=r"^weights=\[1e\+38, 1e\+38\]: the wkv state overflows"):
        mix([full, full], [1e38, 1e38])


def test_mix_records_each_parent_file(random_models, tmp_path):
    spec = read_spec(random_models["v6"])
    paths = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    for i, path in enumerate(paths):
        save_native(random_state_like(spec, seed=i), path)
    parents = mix([load_state(p) for p in paths], [0.5, 0.5]).metadata["training"]["parents"]
    assert [(p["file"], p["sha256"]) for p in parents] == [(p.name, sha256_file(p)) for p in paths]


def test_diff(random_models):
    spec = read_spec(random_models["v5.2"])
    a = random_state_like(spec, seed=1)
    b = random_state_like(spec, seed=2)
    assert diff(a, a).abs().max() == 0
    d = diff(a, b)
    assert d.shape == (spec.n_layer, spec.n_head)
    i, h = 1, 2
    by_hand = (a.wkv[i, h] - b.wkv[i, h]).norm() / max(a.wkv[i, h].norm(), b.wkv[i, h].norm())
    assert float(d[i, h]) == pytest.approx(float(by_hand))


def test_one_heatmap_drawer_for_diffs_and_norms(tmp_path):
    """plot.draw_heatmap draws both pictures: a diff clamps at 1 (dark red), norms scale to their largest finite
    value (dark blue), and a NaN or inf head is grey in either, never a crash (the demo's old norm drawer
    scaled by a NaN maximum)."""
    from PIL import Image

    from rwkv_state_hub.plot import DIFF_SCALE, NONFINITE_GREY, NORM_SCALE, draw_heatmap, save_heatmap

    values = torch.tensor([[0.0, 0.5, 1.0], [float("nan"), 3.0, float("inf")]])
    for scale, darkest in ((DIFF_SCALE, (165, 0, 0)), (NORM_SCALE, (0, 51, 145))):
        colours = {c for _, c in draw_heatmap(values, "t", scale).getcolors(1 << 16)}
        assert {(255, 255, 255), darkest, NONFINITE_GREY} <= colours
    half = {c for _, c in draw_heatmap(values, "t", DIFF_SCALE).getcolors(1 << 16)}
    assert (210, 128, 128) in half  # 0.5 of the way from white to dark red
    save_heatmap(values, tmp_path / "d.png")
    assert Image.open(tmp_path / "d.png").size == draw_heatmap(values, "x").size


@pytest.mark.slow
def test_commands_on_the_bundled_model(tmp_path):
    model = REPO / "rwkv_state_hub" / "examples" / "models" / "tiny-rwkv-5v2-730K.pth"
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    for out, text in ((a, "WEATHER. Oslo: sunny"), (b, "Once upon a time")):
        r = subprocess.run([*CLI, "bake", "--model", str(model), "--prompt", text, "-o", str(out)],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    m = tmp_path / "m.safetensors"
    r = subprocess.run([*CLI, "mix", str(a), str(b), "--weights", "0.5,0.5", "-o", str(m)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([*CLI, "diff", str(a), str(m), "--png", str(tmp_path / "d.png")], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].startswith("layer") and len(r.stdout.splitlines()) >= 13
    assert (tmp_path / "d.png").read_bytes()[:4] == b"\x89PNG"
    r = subprocess.run([*CLI, "export", str(a), "--format", "pth", "-o", str(tmp_path / "a.pth")],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "token shift" in r.stderr  # the consumer is told what it will not get


@pytest.mark.slow
def test_mix_of_two_styles_is_evaluated_on_both_held_out_sets(tmp_path):
    """The benchmark's table in small: two states trained on two styles, their mix, `rwkv-state eval` on
    each held-out set; every row is the loss of that state on those samples (no claim that mixing helps)."""
    import json

    from rwkv_state_hub.data import load_dataset
    from rwkv_state_hub.evaluate import evaluate
    from rwkv_state_hub.training import TrainConfig, train

    model_path = REPO / "rwkv_state_hub" / "examples" / "models" / "tiny-rwkv-5v2-730K.pth"
    data = REPO / "examples" / "data"
    paths = {}
    for name, prefix in (("weather", ""), ("sports", "sports-")):
        cfg = TrainConfig(model=str(model_path), data=[str(data / f"{prefix}train.jsonl")], out=str(tmp_path / name),
                          steps=6, micro_bsz=4)
        train(cfg, progress=False)
        paths[name] = tmp_path / name / "state.safetensors"
    mixed = tmp_path / "mix.safetensors"
    save_native(mix([load_state(paths["weather"]), load_state(paths["sports"])], [0.5, 0.5]), mixed)
    model, tok = load_model(model_path), get_tokenizer("bytes")
    for prefix in ("", "sports-"):
        val = tmp_path / f"{prefix}val.jsonl"
        val.write_text("\n".join((data / f"{prefix}val.jsonl").read_text().splitlines()[:10]) + "\n")
        r = subprocess.run([*CLI, "eval", "--model", str(model_path), "--data", str(val), "--json",
                            *[a for p in (paths["weather"], paths["sports"], mixed) for a in ("--state", str(p))]],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        rows = json.loads(r.stdout)
        held_out = load_dataset(val, tok, 512)
        states = (paths["weather"], paths["sports"], mixed)
        expected = [evaluate(model, held_out).loss]
        expected += [evaluate(model, held_out, load_state(p).to_recurrent()).loss for p in states]
        assert [row["loss"] for row in rows] == pytest.approx(expected)
        assert len({round(x, 6) for x in expected}) == 4  # four different states, four different losses

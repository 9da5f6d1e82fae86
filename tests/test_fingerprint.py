"""The weights fingerprint (rwkvfp1): one value for every dtype and file form of the same bf16 weights; another
for changed weights; and states accepted on any form of their base model, refused on another model."""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import real_model_path

from rwkv_state_hub import ModelMismatchError, State, read_spec
from rwkv_state_hub.checkpoint import read_checkpoint
from rwkv_state_hub.examples import example_model
from rwkv_state_hub.fingerprint import canonical_bits, fingerprint

# the bundled models, and the real v6 from ../shared (none is bundled)
MODELS = ["tiny-rwkv-5v2-730K.pth", "tiny-rwkv-6v0-1m.pth", "tiny-rwkv-7v0-834K.pth", "rwkv7-example-L4-D256.pth"]


def model_path(name: str) -> Path:
    return real_model_path(name.removesuffix(".pth")) if name.startswith("tiny-rwkv-6") else example_model(name)


DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def bf16_master(name: str) -> dict[str, torch.Tensor]:
    """The model as an official bf16 checkpoint (the tiny ones are fp32: round them first, as BlinkDL's are)."""
    return {k: v.to(torch.bfloat16) for k, v in torch.load(model_path(name), weights_only=True).items()}


def save(sd: dict[str, torch.Tensor], path, dtype: torch.dtype):
    sd = {k: v.to(dtype).contiguous() for k, v in sd.items()}
    if str(path).endswith(".safetensors"):
        safetensors.torch.save_file(sd, path)
    else:
        torch.save(sd, path)
    return path


@pytest.mark.parametrize("name", MODELS)
def test_every_form_of_the_same_weights_has_one_fingerprint(name, tmp_path):
    master = bf16_master(name)
    paths = [save(master, tmp_path / f"m-{str(d)[6:]}{ext}", d) for d in DTYPES for ext in (".pth", ".safetensors")]
    back = save({k: v.to(torch.float16) for k, v in master.items()}, tmp_path / "back.pth", torch.bfloat16)
    found = {p.name: read_spec(p).fingerprint for p in [*paths, back]}
    assert len(set(found.values())) == 1, found
    assert next(iter(found.values())).startswith("rwkvfp1:")
    assert len({read_spec(p).sha256 for p in paths}) == len(paths)  # six files, six sha256s, one fingerprint


@pytest.mark.parametrize("name", MODELS)
def test_changed_weights_have_another_fingerprint(name):
    spec, sd = read_checkpoint(model_path(name))
    master = bf16_master(name)
    base = fingerprint(spec, master)
    one_ulp = dict(master)
    key = "blocks.0.att.output.weight"
    t = master[key].clone()
    t.view(torch.int16).view(-1)[7] += 1  # one value, one bf16 ulp
    one_ulp[key] = t
    swapped = dict(master)
    swapped["blocks.0.ffn.key.weight"], swapped["blocks.1.ffn.key.weight"] = \
        master["blocks.1.ffn.key.weight"], master["blocks.0.ffn.key.weight"]
    assert fingerprint(spec, one_ulp) != base and fingerprint(spec, swapped) != base
    fewer = {k: v for k, v in master.items() if not k.startswith(f"blocks.{spec.n_layer - 1}.")}
    from rwkv_state_hub.checkpoint import spec_from_state_dict

    assert fingerprint(spec_from_state_dict(fewer), fewer) != base


def test_what_fp16_cannot_hold_is_equal_in_every_form():
    x = torch.tensor([1e-5, -3e-6, 2.0**-14, 65280.0, 70000.0, -1e9, 0.0, -0.0, 1.0])
    for dtype in (torch.float16, torch.float32):
        assert torch.equal(canonical_bits(x.to(torch.bfloat16).to(dtype)), canonical_bits(x.to(torch.bfloat16)))
    assert [hex(v) for v in canonical_bits(x).tolist()] == \
           ["0x0", "0x0", "0x3880", "0x477f", "0x7f80", "0xff80", "0x0", "0x0", "0x3f80"]


def test_a_state_fits_every_form_of_its_base_model_and_no_other(tmp_path):
    master = bf16_master("tiny-rwkv-5v2-730K.pth")
    official = save(master, tmp_path / "official.pth", torch.bfloat16)
    converted = save(master, tmp_path / "converted-fp16.safetensors", torch.float16)
    fine_tune = dict(master)
    fine_tune["blocks.3.att.key.weight"] = master["blocks.3.att.key.weight"] * 1.05
    other = save(fine_tune, tmp_path / "fine-tune.pth", torch.bfloat16)
    state = State.zeros(read_spec(official))
    assert state.metadata["base_model_fingerprint"] == read_spec(converted).fingerprint
    (note,) = state.check(read_spec(converted))
    assert "converted-fp16 holds the same weights in another file" in note
    assert state.identity(read_spec(official)) == "same file" and state.check(read_spec(official)) == []
    assert state.identity(read_spec(other)) == "another model"
    with pytest.raises(ModelMismatchError, match="but fine-tune has sha256 .* and other weights"):
        state.check(read_spec(other))


def test_an_st_that_records_its_source_sha1_is_recognised_without_the_fingerprint(tmp_path, monkeypatch):
    """An .st whose metadata `pth_SHA` is the SHA-1 of the state's base file is the same weights, known exactly
    (the fingerprint is not computed); a wrong pth_SHA is no claim: the fingerprint still decides."""
    import hashlib

    from web_rwkv_fixture import as_web_rwkv

    import rwkv_state_hub.fingerprint as fp

    master = bf16_master("tiny-rwkv-7v0-834K.pth")
    official = save(master, tmp_path / "official.pth", torch.bfloat16)
    sha1 = hashlib.sha1(official.read_bytes()).hexdigest()
    state = State.zeros(read_spec(official))
    assert state.metadata["base_model_sha1"] == sha1
    named = as_web_rwkv(master, tmp_path / "named.st", pth_sha=sha1.upper())
    wrong = as_web_rwkv(master, tmp_path / "wrong.st", pth_sha="0" * 40)
    other = dict(master, **{"blocks.0.att.key.weight": master["blocks.0.att.key.weight"] * 1.05})
    other_named = as_web_rwkv(other, tmp_path / "other.st", pth_sha="0" * 40)
    assert read_spec(official).source_sha1 is None

    def no_fingerprint(path):
        raise AssertionError(f"fingerprint computed for {path}")

    with monkeypatch.context() as m:
        m.setattr(fp, "file_fingerprint", no_fingerprint)
        (note,) = state.check(read_spec(named))
        assert f"named holds the same weights in another file (converted from sha1 {sha1[:12]})" in note
    assert state.identity(read_spec(wrong)) == "same weights"  # by the fingerprint
    assert state.identity(read_spec(other_named)) == "another model"


def test_the_hub_finds_and_serves_a_state_for_any_form_of_its_weights(hub_server, tmp_path):
    """push records the fingerprint (manifest, card tag); search --model on another file form of the weights
    finds the state as made for "same weights"; pull to that file accepts it with a note; other weights: refused."""
    from conftest import ALICE

    from rwkv_state_hub import pull, push, search
    from rwkv_state_hub.hub import pull_state

    master = bf16_master("tiny-rwkv-5v2-730K.pth")
    official = save(master, tmp_path / "official.pth", torch.bfloat16)
    converted = save(master, tmp_path / "converted.safetensors", torch.float32)
    other = dict(master)
    other["blocks.2.ffn.key.weight"] = master["blocks.2.ffn.key.weight"] * 1.1
    other = save(other, tmp_path / "other.pth", torch.bfloat16)
    state = State.zeros(read_spec(official), full_state=True)
    state.wkv.normal_(generator=torch.Generator().manual_seed(0))
    push(state, "alice/weather", token=ALICE)

    (found,) = search(converted)
    assert (found.repo_id, found.match) == ("alice/weather", "weights")
    assert found.base_model_sha256 == read_spec(official).sha256
    assert [r.match for r in search(official)] == ["file"]
    assert search(other) == []
    result = pull_state("alice/weather", converted, output=tmp_path / "s.safetensors")
    (note,) = result.warnings
    assert "converted holds the same weights in another file" in note
    with pytest.raises(ModelMismatchError, match="pass force=True"):
        pull("alice/weather", other)

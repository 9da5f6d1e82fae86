"""One base model in other files: the official keys in a safetensors file (fp32, fp16 or bf16) read as the .pth
does, with the same dims and, within the dtype's rounding, the same logits; training and info work from it."""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import torch
from click.testing import CliRunner
from conftest import real_model_path
from hf_rwkv7_fixture import as_hf_rwkv7
from web_rwkv_fixture import as_web_rwkv

from rwkv_state_hub import RWKV, InvalidCheckpointError, State, TrainConfig, read_spec, train_state
from rwkv_state_hub.checkpoint import load_state_dict
from rwkv_state_hub.examples import example_model

# the bundled models, and the real v6 from ../shared (none is bundled)
MODELS = ["tiny-rwkv-5v2-730K.pth", "tiny-rwkv-6v0-1m.pth", "tiny-rwkv-7v0-834K.pth", "rwkv7-example-L4-D256.pth"]


def model_path(name: str) -> Path:
    return real_model_path(name.removesuffix(".pth")) if name.startswith("tiny-rwkv-6") else example_model(name)


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TOKENS = torch.tensor([[87, 69, 65, 84, 72, 69, 82, 46, 32, 79, 115, 108, 111, 58]])  # "WEATHER. Oslo:"


def as_safetensors(pth: Path, folder: Path, dtype: str) -> Path:
    """The .pth's tensors, keys unchanged, converted to `dtype` and saved as safetensors (as users convert)."""
    sd = torch.load(pth, map_location="cpu", weights_only=True)
    out = folder / f"{pth.stem}-{dtype}.safetensors"
    safetensors.torch.save_file({k: v.to(DTYPES[dtype]).contiguous() for k, v in sd.items()}, out)
    return out


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_a_safetensors_copy_reads_as_the_pth(name, dtype, tmp_path):
    pth = model_path(name)
    copy = as_safetensors(pth, tmp_path, dtype)
    a, b = read_spec(pth), read_spec(copy)
    assert (b.arch, b.n_layer, b.n_embd, b.n_head, b.head_size, b.vocab_size) == \
           (a.arch, a.n_layer, a.n_embd, a.n_head, a.head_size, a.vocab_size)
    assert b.name == f"{pth.stem}-{dtype}" and b.sha256 != a.sha256  # another file: the identity issue's business
    with torch.no_grad():
        want = RWKV.from_pretrained(pth, dtype=torch.float32)(TOKENS)[0]
        got = RWKV.from_pretrained(copy, dtype=torch.float32)(TOKENS)[0]
    stored = load_state_dict(pth)["head.weight"].dtype
    if DTYPES[dtype].itemsize >= stored.itemsize and (dtype != "fp16" or stored == torch.float16):
        torch.testing.assert_close(got, want, rtol=0, atol=0)  # a widening conversion changes no value
    else:
        torch.testing.assert_close(got, want, rtol=0.05, atol=0.05 * float(want.abs().max()))


def test_training_and_info_work_from_a_safetensors_model(tmp_path):
    from rwkv_state_hub.cli import cli

    copy = as_safetensors(example_model("tiny-rwkv-5v2-730K.pth"), tmp_path, "bf16")
    model = RWKV.from_pretrained(copy)
    state = train_state(model, [{"text": "WEATHER. Oslo: snowy, -3 C. END."}] * 4, TrainConfig(steps=2, micro_bsz=2))
    assert state.base_model_sha256 == read_spec(copy).sha256 and state.metadata["base_model_name"] == copy.stem
    result = CliRunner().invoke(cli, ["info", str(copy)])
    assert result.exit_code == 0 and "checkpoint" in result.output and "v5.2" in result.output, result.output


def test_a_damaged_safetensors_model_is_one_line(tmp_path):
    copy = as_safetensors(example_model("tiny-rwkv-5v2-730K.pth"), tmp_path, "fp16")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(copy.read_bytes()[: copy.stat().st_size // 2])
    with pytest.raises(InvalidCheckpointError, match=r"^.*cut.safetensors: not a valid safetensors file \(") as e:
        read_spec(cut)
    assert "\n" not in str(e.value)


def test_states_record_the_base_files_sha1_beside_its_sha256(tmp_path, monkeypatch):
    """web-rwkv's converter records the SHA-1 of its source .pth in the .st it writes: our states record it too
    (hashed in the same read as the sha256, and cached with it)."""
    import hashlib

    from rwkv_state_hub import files

    pth = example_model("tiny-rwkv-5v2-730K.pth")
    data = pth.read_bytes()
    spec = read_spec(pth)
    assert (spec.sha256, spec.sha1) == (hashlib.sha256(data).hexdigest(), hashlib.sha1(data).hexdigest())
    monkeypatch.setattr(files, "_hash_stream", lambda *a: pytest.fail("hashed again instead of the cache"))
    assert files.file_digests(pth) == {"sha256": spec.sha256, "sha1": spec.sha1}
    from rwkv_state_hub.state import State

    assert State.zeros(spec).metadata["base_model_sha1"] == spec.sha1


# ---------------------------------------------------------------- web-rwkv .st and Hugging Face RWKV-7 copies
# Our own converters, written from the converters' sources (docs/model_forms.md, sections 2.2 and 3.1), to make
# fixtures: the real ones need the networks and packages these machines do not have (.st: web_rwkv_fixture.py).

def _bf16_master(name: str) -> dict[str, torch.Tensor]:
    return {k: v.to(torch.bfloat16) for k, v in torch.load(model_path(name), weights_only=True).items()}


@pytest.mark.parametrize("name", MODELS)
def test_a_web_rwkv_st_copy_is_the_same_model(name, tmp_path):
    master = _bf16_master(name)
    official = tmp_path / "official.pth"
    torch.save(master, official)
    st = as_web_rwkv(master, tmp_path / "model.st")
    a, b = read_spec(official), read_spec(st)
    assert (b.arch, b.n_layer, b.n_embd, b.n_head, b.vocab_size) == \
           (a.arch, a.n_layer, a.n_embd, a.n_head, a.vocab_size)
    assert b.fingerprint == a.fingerprint and b.sha256 != a.sha256
    with torch.no_grad():
        want = RWKV.from_pretrained(official, dtype=torch.float32)(TOKENS)[0]
        got = RWKV.from_pretrained(st, dtype=torch.float32)(TOKENS)[0]
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.05 * float(want.abs().max()))  # F16 rounding


@pytest.mark.parametrize("name", ["tiny-rwkv-7v0-834K.pth", "rwkv7-example-L4-D256.pth"])
def test_a_hugging_face_rwkv7_copy_is_the_same_model(name, tmp_path):
    master = _bf16_master(name)
    official = tmp_path / "official.pth"
    torch.save(master, official)
    folder = as_hf_rwkv7(master, tmp_path / "hf")
    a, b = read_spec(official), read_spec(folder)
    assert b.fingerprint == a.fingerprint and (b.n_layer, b.head_size) == (a.n_layer, a.head_size)
    assert b.name == "hf"  # a Hugging Face folder is named by its folder, not "model"
    with torch.no_grad():
        want = RWKV.from_pretrained(official)(TOKENS)[0]
        got = RWKV.from_pretrained(folder)(TOKENS)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=0)  # the same bf16 values, only renamed and transposed
    state = State.zeros(a)
    assert state.identity(b) == "same weights"


def test_an_unknown_hugging_face_tensor_is_one_line(tmp_path):
    folder = as_hf_rwkv7(_bf16_master("tiny-rwkv-7v0-834K.pth"), tmp_path / "hf")
    sd = safetensors.torch.load_file(folder / "model.safetensors")
    sd["model.layers.0.attn.mystery"] = torch.zeros(3)
    safetensors.torch.save_file(sd, folder / "model.safetensors")
    with pytest.raises(InvalidCheckpointError, match="'model.layers.0.attn.mystery' is not a tensor of a Hugging Face"):
        read_spec(folder)


def test_a_sharded_hugging_face_folder_is_one_line(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    with pytest.raises(InvalidCheckpointError, match="sharded checkpoint .* save it as one model.safetensors"):
        read_spec(tmp_path)

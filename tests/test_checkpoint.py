"""Reading official RWKV checkpoints: architecture detection, dimensions, safety and one-line errors."""

from __future__ import annotations

import hashlib
import pickle
import random
from pathlib import Path

import pytest
import torch

from rwkv_state_hub.checkpoint import ModelSpec, read_checkpoint, read_spec, spec_from_state_dict
from rwkv_state_hub.errors import StateHubError
from rwkv_state_hub.random_model import random_checkpoint, save_checkpoint

SHARED_MODELS = Path(__file__).resolve().parents[2] / "shared" / "models"
EXAMPLE_MODEL = Path(__file__).resolve().parents[1] / "rwkv_state_hub/examples/models/tiny-rwkv-7v0-834K.pth"

# file, arch, n_head, head_size, n_ffn, sha256. All three: 12 layers, n_embd 64, vocab 256, float32.
# (shared/models/README.md lists ffn 224 for the v5.2 model, but the file's ffn.key.weight is [256, 64].)
REAL_MODELS = [
    ("tiny-rwkv-5v2-730K.pth", "v5.2", 8, 8, 256,
     "fac083fb02c4203c983d4a7c0ae5e67696df865de4e6ba62f12a8afd7808d000"),
    ("tiny-rwkv-6v0-1m.pth", "v6", 8, 8, 224,
     "83c304fc424bbf477761d94c415707c26023aa7482784188d70dc6d6c2bed7f2"),
    ("tiny-rwkv-7v0-834K.pth", "v7", 1, 64, 256,
     "c133947fad822e9cec8d4c9fc4138aaf97ac08d03a07b8280691a982ca7433db"),
]
V7_SHA256 = REAL_MODELS[2][5]

ARCHS = ("v5.2", "v6", "v7")
LAYERS, EMBD, HEAD, VOCAB = 2, 128, 64, 256


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Any hashing in these tests goes to a throw-away cache, never the user's."""
    monkeypatch.setenv("RWKV_STATE_HUB_CACHE", str(tmp_path / "cache"))


def _random(arch: str, **kw) -> dict[str, torch.Tensor]:
    return random_checkpoint(arch, n_layer=LAYERS, n_embd=EMBD, head_size=HEAD, vocab_size=VOCAB, **kw)


def _save(sd: dict[str, torch.Tensor], tmp_path: Path, name: str = "model.pth") -> Path:
    path = tmp_path / name
    save_checkpoint(sd, path)
    return path


def _one_line_error(path: Path, *fragments: str) -> str:
    """read_spec(path) must fail with a single-line StateHubError naming the file and saying what it found."""
    with pytest.raises(StateHubError) as info:
        read_spec(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert str(path) in msg
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in {msg!r}"
    return msg


def _n_numel(sd: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() for t in sd.values())


# --- real checkpoints -------------------------------------------------------------------------------------


def _check_real(spec: ModelSpec, path: Path, arch: str, n_head: int, head_size: int, n_ffn: int, sha: str):
    assert spec.arch == arch
    assert spec.n_layer == 12
    assert spec.n_embd == 64
    assert (spec.n_head, spec.head_size) == (n_head, head_size)
    assert spec.n_ffn == n_ffn
    assert spec.vocab_size == 256
    assert spec.dtype == "float32"
    assert spec.has_time_state is False
    assert spec.path == str(path.resolve())
    assert spec.file_size == path.stat().st_size
    assert spec.name == path.name.removesuffix(".pth")
    assert spec.n_params == _n_numel(torch.load(path, map_location="cpu", weights_only=True))
    assert spec.sha256 == sha


@pytest.mark.parametrize(("file", "arch", "n_head", "head_size", "n_ffn", "sha"), REAL_MODELS,
                         ids=[m[1] for m in REAL_MODELS])
def test_real_models(file, arch, n_head, head_size, n_ffn, sha):
    path = SHARED_MODELS / file
    if not path.is_file():
        pytest.skip(f"real test models not available: {path} is missing")
    _check_real(read_spec(path), path, arch, n_head, head_size, n_ffn, sha)


def test_bundled_example_model():
    _check_real(read_spec(EXAMPLE_MODEL), EXAMPLE_MODEL, "v7", 1, 64, 256, V7_SHA256)


def test_bundled_example_to_dict_and_dims():
    spec = read_spec(EXAMPLE_MODEL)
    d = spec.to_dict()
    assert d["file_name"] == EXAMPLE_MODEL.name
    assert d["file_size"] == EXAMPLE_MODEL.stat().st_size
    assert d["sha256"] == V7_SHA256
    assert (d["arch"], d["n_layer"], d["n_head"], d["head_size"]) == ("v7", 12, 1, 64)
    assert spec.dims() == "12 layers x 1 heads x 64"
    assert spec.state_shape() == (12, 1, 64, 64)


def test_read_checkpoint_returns_the_tensors():
    spec, sd = read_checkpoint(EXAMPLE_MODEL)
    ref = torch.load(EXAMPLE_MODEL, map_location="cpu", weights_only=True)
    assert sd.keys() == ref.keys()
    assert all(torch.equal(sd[k], ref[k]) for k in ref)
    assert spec.arch == "v7"


# --- random checkpoints -----------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_random_checkpoint_dims(arch, tmp_path):
    sd = _random(arch)
    path = _save(sd, tmp_path)
    spec = read_spec(path)
    assert spec.arch == arch
    assert spec.n_layer == LAYERS
    assert spec.n_embd == EMBD
    assert spec.head_size == HEAD
    assert spec.n_head == EMBD // HEAD
    assert spec.n_ffn == sd["blocks.0.ffn.key.weight"].shape[0]
    assert spec.n_ffn == sd["blocks.1.ffn.value.weight"].shape[1]
    assert spec.vocab_size == VOCAB
    assert spec.dtype == "float32"
    assert spec.has_time_state is False
    assert spec.n_params == _n_numel(sd)
    assert spec.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert spec.dims() == f"{LAYERS} layers x {EMBD // HEAD} heads x {HEAD}"
    assert spec.state_shape() == (LAYERS, EMBD // HEAD, HEAD, HEAD)


@pytest.mark.parametrize("arch", ARCHS)
def test_random_checkpoint_other_dims(arch, tmp_path):
    """Dimensions come from the file, not from defaults: 3 layers, n_embd 96, head size 32, ffn 160."""
    sd = random_checkpoint(arch, n_layer=3, n_embd=96, head_size=32, vocab_size=50, n_ffn=160)
    spec = read_spec(_save(sd, tmp_path))
    got = (spec.arch, spec.n_layer, spec.n_embd, spec.n_head, spec.head_size, spec.n_ffn, spec.vocab_size)
    assert got == (arch, 3, 96, 3, 32, 160, 50)
    assert spec.state_shape() == (3, 3, 32, 32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("arch", ARCHS)
def test_half_precision_checkpoints(arch, dtype, tmp_path):
    sd = _random(arch, dtype=dtype)
    spec = read_spec(_save(sd, tmp_path))
    assert spec.arch == arch
    assert spec.dtype == str(dtype).removeprefix("torch.")
    assert spec.n_head == EMBD // HEAD
    assert spec.n_params == _n_numel(sd)


def test_legacy_torch_save_format_is_refused(tmp_path):
    """torch.save(_use_new_zipfile_serialization=False) files allocate the storage sizes written in their pickle
    before anything can be checked (issue 16): refused, saying how to convert them."""
    path = tmp_path / "legacy.pth"
    torch.save(_random("v6"), path, _use_new_zipfile_serialization=False)
    _one_line_error(path, "not a readable PyTorch checkpoint", "legacy", "re-save it with a current torch.save")


def test_spec_from_memory_has_no_path():
    spec = spec_from_state_dict(_random("v7"))
    assert spec.path is None
    assert spec.file_size is None
    assert spec.sha256 is None
    assert spec.name == f"RWKV-v7 L{LAYERS} D{EMBD}"
    assert "file_name" not in spec.to_dict()


@pytest.mark.parametrize("arch", ARCHS)
def test_merged_checkpoint_with_time_state(arch, tmp_path):
    base = _random(arch)
    merged = dict(base)
    for i in range(LAYERS):
        merged[f"blocks.{i}.att.time_state"] = torch.randn(EMBD // HEAD, HEAD, HEAD)
    spec = read_spec(_save(merged, tmp_path))
    assert spec.has_time_state is True
    assert spec.n_params == _n_numel(base)
    assert spec.n_params < _n_numel(merged)
    assert spec.n_layer == LAYERS  # time_state keys do not add layers
    assert read_spec(_save(base, tmp_path, "base.pth")).has_time_state is False


def test_model_spec_dims_and_state_shape():
    spec = ModelSpec(arch="v6", n_layer=24, n_embd=2048, n_head=32, head_size=64, n_ffn=7168,
                     vocab_size=65536)
    assert spec.dims() == "24 layers x 32 heads x 64"
    assert spec.state_shape() == (24, 32, 64, 64)
    other = ModelSpec(arch="v5.2", n_layer=3, n_embd=40, n_head=5, head_size=8, n_ffn=0, vocab_size=1)
    assert other.dims() == "3 layers x 5 heads x 8"
    assert other.state_shape() == (3, 5, 8, 8)


# --- unsupported architectures ----------------------------------------------------------------------------


def test_rwkv4_checkpoint(tmp_path):
    sd = {k: v for k, v in _random("v5.2").items() if ".ln_x." not in k and ".gate." not in k}
    msg = _one_line_error(_save(sd, tmp_path), "RWKV-4")
    assert "v5.2" in msg and "v7" in msg  # says what is supported


def test_rwkv50_checkpoint(tmp_path):
    sd = {k: v for k, v in _random("v5.2").items() if ".gate." not in k}
    _one_line_error(_save(sd, tmp_path), "v5.0")


@pytest.mark.parametrize("keepdim", [False, True], ids=["decay-H", "decay-Hx1"])
def test_rwkv51_checkpoint(keepdim, tmp_path):
    sd = _random("v5.2")
    for i in range(LAYERS):
        key = f"blocks.{i}.att.time_decay"
        sd[key] = sd[key].mean(dim=1, keepdim=keepdim)  # [H, N] -> [H] or [H, 1]: one decay per head
        assert sd[key].shape[0] == EMBD // HEAD and sd[key].numel() == EMBD // HEAD
    _one_line_error(_save(sd, tmp_path), "v5.1")


def test_v7_deep_embed_checkpoint(tmp_path):
    sd = _random("v7")
    sd["blocks.0.ffn.s_emb.weight"] = torch.zeros(VOCAB, 32)
    _one_line_error(_save(sd, tmp_path), "DeepEmbed")


def test_unrecognised_layout(tmp_path):
    sd = {k: v for k, v in _random("v5.2").items()
          if ".ln_x." not in k and ".gate." not in k and "time_mix" not in k}
    _one_line_error(_save(sd, tmp_path), "unrecognised")


# --- files that are not (valid) checkpoints ---------------------------------------------------------------


@pytest.mark.parametrize(("content", "why"), [
    (random.Random(0).randbytes(4096), "neither safetensors nor a PyTorch file"),
    (b"", "neither safetensors nor a PyTorch file"),
    (b"emb.weight = [1, 2, 3]\n" * 20, "neither safetensors nor a PyTorch file"),
    (b"PK\x03\x04" + random.Random(1).randbytes(1000), "not a readable PyTorch checkpoint"),
], ids=["random-bytes", "empty", "text", "fake-zip"])
def test_not_a_checkpoint(content, why, tmp_path):
    path = tmp_path / "junk.pth"
    path.write_bytes(content)
    _one_line_error(path, why)


def test_truncated_checkpoint(tmp_path):
    data = EXAMPLE_MODEL.read_bytes()
    path = tmp_path / "partial.pth"
    path.write_bytes(data[: len(data) // 2])
    _one_line_error(path, "not a readable PyTorch checkpoint")


def test_pickled_list(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([1, 2], path)
    _one_line_error(path, "expected a dict of tensors", "list")


def test_dict_with_non_tensor_value(tmp_path):
    path = tmp_path / "mixed.pth"
    torch.save({"emb.weight": torch.zeros(4, 4), "note": "hello"}, path)
    _one_line_error(path, "'note'", "is a str")


def test_empty_dict(tmp_path):
    path = tmp_path / "empty.pth"
    torch.save({}, path)
    _one_line_error(path, "empty dict")


def test_non_string_key(tmp_path):
    path = tmp_path / "intkey.pth"
    torch.save({1: torch.zeros(2)}, path)
    _one_line_error(path, "expected tensor names", "key 1")


def test_state_dict_without_emb(tmp_path):
    sd = _random("v7")
    del sd["emb.weight"]
    _one_line_error(_save(sd, tmp_path), "not an RWKV model checkpoint", "found blocks.")


def test_foreign_state_dict(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(2, 2), "fc.bias": torch.zeros(2)}, path)
    _one_line_error(path, "not an RWKV model checkpoint", "conv1.weight")


@pytest.mark.parametrize(("arch", "key"), [
    ("v5.2", "blocks.1.att.key.weight"),
    ("v5.2", "blocks.1.att.time_faaaa"),
    ("v6", "blocks.1.att.key.weight"),
    ("v6", "blocks.0.att.time_maa_w2"),
    ("v7", "blocks.1.att.key.weight"),
    ("v7", "blocks.1.att.v1"),
    ("v7", "head.weight"),
])
def test_missing_key(arch, key, tmp_path):
    sd = _random(arch)
    del sd[key]
    _one_line_error(_save(sd, tmp_path), f"{arch} checkpoint is missing {key}")


def test_v7_without_r_k_cannot_tell_head_size(tmp_path):
    sd = _random("v7")
    del sd["blocks.0.att.r_k"]
    _one_line_error(_save(sd, tmp_path), "blocks.0.att.r_k", "head size")


def test_heads_do_not_match_n_embd(tmp_path):
    sd = _random("v6")
    sd["blocks.0.att.time_faaaa"] = torch.zeros(EMBD // HEAD, HEAD // 2)
    _one_line_error(_save(sd, tmp_path), f"{EMBD // HEAD} heads x {HEAD // 2}", f"n_embd {EMBD}")


@pytest.mark.parametrize("arch", ARCHS)
def test_wrong_shape(arch, tmp_path):
    sd = _random(arch)
    key = "blocks.0.ffn.value.weight"
    sd[key] = sd[key].t().contiguous()
    found = list(sd[key].shape)
    assert found[0] != found[1]
    _one_line_error(_save(sd, tmp_path), key, str(found), f"expected {found[1]}x{found[0]}")


def test_wrong_vector_length(tmp_path):
    sd = _random("v5.2")
    sd["blocks.1.ln2.bias"] = torch.zeros(EMBD + 1)
    _one_line_error(_save(sd, tmp_path), "blocks.1.ln2.bias", f"[{EMBD + 1}]")


@pytest.mark.parametrize("key", ["blocks.0.ln1.weight", "emb.weight", "blocks.1.att.output.weight"])
def test_int_tensor_where_float_expected(key, tmp_path):
    sd = _random("v6")
    sd[key] = sd[key].round().to(torch.int64)
    _one_line_error(_save(sd, tmp_path), key, "torch.int64")


def test_float64_tensor_rejected(tmp_path):
    sd = _random("v7")
    sd["blocks.1.att.r_k"] = sd["blocks.1.att.r_k"].double()
    _one_line_error(_save(sd, tmp_path), "blocks.1.att.r_k", "float64")


def test_missing_file(tmp_path):
    _one_line_error(tmp_path / "nope.pth", "no such file")


def test_directory_is_not_a_file(tmp_path):
    folder = tmp_path / "model.pth"
    folder.mkdir()
    _one_line_error(folder, "a folder without model.safetensors; name the model file itself")


# --- safety: no code runs from the file -------------------------------------------------------------------


class _Payload:
    """Unpickling this writes `marker`: the kind of object a malicious checkpoint carries."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


def test_payload_is_live(tmp_path):
    """Control: the payload really does run code under an ordinary unpickler."""
    marker = tmp_path / "control-marker"
    pickle.loads(pickle.dumps({"emb.weight": _Payload(marker)}))
    assert marker.read_text() == "pwned"


@pytest.mark.parametrize("fmt", ["torch-zip", "torch-legacy", "raw-pickle"])
def test_malicious_pickle_does_not_run(fmt, tmp_path):
    marker = tmp_path / "marker"
    obj = {"emb.weight": torch.zeros(2, 2), "blocks.0.att.x_r": _Payload(marker)}
    path = tmp_path / "evil.pth"
    if fmt == "torch-zip":
        torch.save(obj, path)
    elif fmt == "torch-legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(obj, protocol=2))
    if fmt == "torch-zip":
        _one_line_error(path, "not a readable PyTorch checkpoint", "refused", "could run code")
    else:  # refused before any unpickling: a pre-zip container's sizes cannot be checked
        _one_line_error(path, "not a readable PyTorch checkpoint", "refused", "legacy")
    assert not marker.exists()

"""What a stranger can send, for tests/test_fuzz.py and tests/test_cost_bounds.py (issue 16).

Three things live here, shared by both suites:
- the one rule every refusal must follow (`assert_refusal`, `works_or_refuses`);
- valid files of every kind, to mutate and to warm up on (`write_valid_files`);
- the crafted files of issue 16 (`CRAFTED`): each at most 1 MB, each claiming in an index, a length or a count far
  more than it holds, so that a reader whose cost follows the claim instead of the bytes shows up.
"""

from __future__ import annotations

import collections
import io
import json
import pickle
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from rwkv_state_hub import State, StateHubError
from rwkv_state_hub.data import write_binidx
from rwkv_state_hub.formats import export_state
from rwkv_state_hub.hub_card import MANIFEST, MANIFEST_FORMAT
from rwkv_state_hub.random_model import random_checkpoint, save_checkpoint

LONGEST_MESSAGE = 1000  # characters: a refusal is one line a person reads, not a dump of the input
CRAFTED_MAX_BYTES = 1 << 20
REPO_ID = "mallory/crafted"


# ---------------------------------------------------------------- the rule for every refusal


def assert_refusal(error: StateHubError, *names: str) -> str:
    """One line, bounded, naming the file (or option) it is about: what the CLI prints after 'Error: '."""
    message = str(error)
    assert message.strip(), f"{type(error).__name__} with an empty message"
    assert "\n" not in message and "\r" not in message, f"not one line: {message!r}"
    assert len(message) <= LONGEST_MESSAGE, f"{len(message)} characters: {message[:200]!r}..."
    assert any(n in message for n in names), f"{message!r} names none of {names}"
    return message


def works_or_refuses(call: Callable[[], Any], *names: str) -> Any:
    """call() either returns (its value) or raises StateHubError by the rule above; any other exception fails
    the test as it is. Returns None after a refusal."""
    try:
        return call()
    except StateHubError as e:
        assert_refusal(e, *names)
        return None


# ---------------------------------------------------------------- valid files


def small_checkpoint(arch: str = "v5.2", seed: int = 0) -> dict[str, torch.Tensor]:
    """A random model small enough (~0.5 MB) to be a crafted file itself: 2 layers, 2 heads of 32, byte vocabulary."""
    return random_checkpoint(arch, n_layer=2, n_embd=64, head_size=32, vocab_size=256, seed=seed)


def small_state(n_layer: int = 2, n_head: int = 2, head_size: int = 32, full: bool = False) -> State:
    g = torch.Generator().manual_seed(0)
    wkv = torch.randn(n_layer, n_head, head_size, head_size, generator=g)
    shift = torch.randn(n_layer, 2, n_head * head_size, generator=g) if full else None
    return State(wkv, shift, {"arch": "v5.2", "training": {"method": "test", "steps": 3}})


def manifest_for(files: dict[str, tuple[str, bytes]], sha256: str = "ab" * 32) -> dict[str, Any]:
    """A valid manifest listing `files` (role -> (name in the repo, bytes))."""
    import hashlib

    return {
        "format": MANIFEST_FORMAT, "format_version": 1, "created_with": "rwkv-state-hub test",
        "arch": "v5.2", "n_layer": 2, "n_embd": 64, "n_head": 2, "head_size": 32, "token_shift": False,
        "base_model_sha256": sha256, "base_model": {"sha256": sha256, "name": "base"},
        "files": {role: {"path": name, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
                  for role, (name, data) in files.items()},
        "training": {"steps": 3},
    }


def hf_tokenizer_json() -> dict[str, Any]:
    """A minimal valid Hugging Face tokenizer.json: a word-level vocabulary of 8 words, split on whitespace."""
    vocab = {w: i for i, w in enumerate(["[UNK]", "<|endoftext|>", "the", "sky", "is", "blue", "red", "."])}
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": 1, "content": "<|endoftext|>", "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True}],
        "normalizer": None, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"},
    }


def write_valid_files(folder: Path) -> dict[str, Path]:
    """One valid file of every kind we read, in `folder`: the starting points of mutation and warm-up."""
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    model = small_checkpoint()
    out["model"] = folder / "model.pth"
    save_checkpoint(model, out["model"])
    state = small_state()
    for fmt, name in (("safetensors", "state.safetensors"), ("pth", "state.pth"), ("ai00", "state.st")):
        out[fmt] = folder / name
        export_state(state, out[fmt], fmt)
    out["full"] = folder / "full.safetensors"
    export_state(small_state(full=True), out["full"], "safetensors")
    out["merged"] = folder / "merged.pth"
    export_state(state, out["merged"], "merged", base_model=out["model"])
    out["jsonl"] = folder / "data.jsonl"
    out["jsonl"].write_text("".join(json.dumps({"text": f"the sky is blue {i}."}) + "\n" for i in range(4)))
    out["txt"] = folder / "data.txt"
    out["txt"].write_text("the sky is blue.\nthe sky is red.\n" * 3)
    write_binidx(folder / "data", [[1, 2, 3, 4, 5], [6, 7, 8], [9, 10, 11, 12]])
    out["binidx"] = folder / "data.idx"
    out["tokenizer"] = folder / "tokenizer.json"
    out["tokenizer"].write_text(json.dumps(hf_tokenizer_json()))
    native = out["safetensors"].read_bytes()
    out["manifest"] = folder / MANIFEST
    out["manifest"].write_text(json.dumps(manifest_for({"native": ("state.safetensors", native)})))
    return out


# ---------------------------------------------------------------- torch files, written by hand


class _Storage:
    """Pickled as torch's persistent id for a storage: ('storage', FloatStorage, key, 'cpu', numel)."""

    def __init__(self, key: str, numel: int, legacy: bool = False) -> None:
        self.key, self.numel, self.legacy = key, numel, legacy


class _Tensor:
    """Pickled as torch._utils._rebuild_tensor_v2(storage, 0, shape, stride, False, OrderedDict())."""

    def __init__(self, storage: _Storage, shape: tuple[int, ...]) -> None:
        self.storage, self.shape = storage, shape

    def __reduce__(self):
        stride, step = [], 1
        for d in reversed(self.shape):
            stride.insert(0, step)
            step *= d
        return (torch._utils._rebuild_tensor_v2,
                (self.storage, 0, self.shape, tuple(stride), False, collections.OrderedDict()))


class _TorchPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            pid = ("storage", torch.FloatStorage, obj.key, "cpu", obj.numel)
            return pid + (None,) if obj.legacy else pid
        return None


def _pickle(obj: Any) -> bytes:
    buf = io.BytesIO()
    _TorchPickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def torch_zip(tensors: dict[str, tuple[int, tuple[int, ...]]], data: dict[str, bytes],
              compress: bool = False) -> bytes:
    """A torch.save zip file by hand. tensors: name -> (claimed numel of its storage, shape); the storage of
    the i-th tensor is record data/i, holding data[str(i)] (compressed with deflate when asked)."""
    obj = {name: _Tensor(_Storage(str(i), numel), shape) for i, (name, (numel, shape)) in enumerate(tensors.items())}
    buf = io.BytesIO()
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", _pickle(obj))
        zf.writestr("archive/byteorder", "little")
        for key, payload in data.items():
            zf.writestr(f"archive/data/{key}", payload, compress_type=method)
        zf.writestr("archive/version", "3\n")
    return buf.getvalue()


def torch_legacy(tensors: dict[str, tuple[int, tuple[int, ...]]], data: dict[str, bytes]) -> bytes:
    """A pre-1.6 (non-zip) torch.save file by hand: magic, protocol, system info, the object, the storage keys,
    then each storage as its element count (int64) and its bytes, whatever the pickle claimed."""
    obj = {name: _Tensor(_Storage(str(i), numel, legacy=True), shape)
           for i, (name, (numel, shape)) in enumerate(tensors.items())}
    info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}
    parts = [pickle.dumps(v, protocol=2) for v in (0x1950A86A20F9469CFC6C, 1001, info)]
    parts += [_pickle(obj), pickle.dumps(list(data), protocol=2)]
    for payload in data.values():
        parts.append(struct.pack("<q", len(payload) // 4) + payload)
    return b"".join(parts)


def safetensors_raw(header: dict[str, Any], data: bytes = b"", length: int | None = None) -> bytes:
    """A safetensors file from its parts: the 8-byte header length (the true one unless `length` is given),
    the JSON header, the data."""
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text) if length is None else length) + text + data


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


# ---------------------------------------------------------------- the crafted files of issue 16


def _huge_layer_safetensors(folder: Path) -> Path:
    path = folder / "huge-layer.safetensors"
    save_file({"blocks.30000000.att.time_state": torch.zeros(1, 2, 2)}, str(path))
    return path


def _huge_layer_pth(folder: Path) -> Path:
    path = folder / "huge-layer.pth"
    torch.save({"blocks.30000000.att.time_state": torch.zeros(1, 2, 2)}, path)
    return path


def _merged_with_junk(folder: Path) -> Path:
    path = folder / "merged-junk.pth"
    sd = small_checkpoint()
    sd.update({f"blocks.{i}.att.time_state": torch.zeros(2, 32, 32) for i in range(2)})
    sd["blocks.3000000.junk"] = torch.zeros(1)
    torch.save(sd, path)
    return path


def _zip_bomb(folder: Path) -> Path:
    """archive/data/0 holds 1 GB of zeros, deflated to ~1 MB; the pickle claims all of it as one tensor."""
    path = folder / "zip-bomb.pth"
    numel = 250 << 20  # 1000 MiB of float32
    obj = {"blocks.0.att.time_state": _Tensor(_Storage("0", numel), (numel // 4, 2, 2))}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", _pickle(obj))
        zf.writestr("archive/byteorder", "little")
        info = zipfile.ZipInfo("archive/data/0")
        info.compress_type = zipfile.ZIP_DEFLATED
        with zf.open(info, "w", force_zip64=True) as entry:
            chunk = bytes(16 << 20)
            for _ in range(numel * 4 // len(chunk)):
                entry.write(chunk)
        zf.writestr("archive/version", "3\n")
    return path


def _storage_claims_more(folder: Path) -> Path:
    path = folder / "big-claim.pth"
    numel = 1 << 34  # 64 GiB of float32, backed by 16 bytes
    path.write_bytes(torch_zip({"blocks.0.att.time_state": (numel, (1 << 32, 2, 2))}, {"0": bytes(16)}))
    return path


def _legacy_claims_more(folder: Path) -> Path:
    path = folder / "legacy-claim.pth"
    numel = 1 << 34
    path.write_bytes(torch_legacy({"blocks.0.att.time_state": (numel, (1 << 32, 2, 2))}, {"0": bytes(16)}))
    return path


def _safetensors_long_header(folder: Path) -> Path:
    """The header length says 99 MiB (under safetensors' own 100 MB cap); the file has 1 KB."""
    path = folder / "long-header.safetensors"
    header = {"blocks.0.att.time_state": {"dtype": "F32", "shape": [1, 2, 2], "data_offsets": [0, 16]}}
    path.write_bytes(safetensors_raw(header, bytes(16), length=(100 << 20) - 8) + bytes(1024))
    return path


def _safetensors_huge_shape(folder: Path) -> Path:
    path = folder / "huge-shape.safetensors"
    n = 1 << 16
    header = {"blocks.0.att.time_state": {"dtype": "F32", "shape": [4, n, n], "data_offsets": [0, 16 * n * n]}}
    path.write_bytes(safetensors_raw(header, bytes(64)))
    return path


def _deep_metadata(folder: Path) -> Path:
    path = folder / "deep-metadata.safetensors"
    meta = {"format": "rwkv-state-hub", "layout": "head,value,key", "metadata": _deep(200_000)}
    save_file({f"blocks.{i}.att.time_state": torch.zeros(2, 4, 4) for i in range(2)}, str(path), metadata=meta)
    return path


def _manifest_many_files(folder: Path) -> Path:
    path = folder / "many-files" / MANIFEST
    path.parent.mkdir()
    good = manifest_for({"native": ("state.safetensors", b"x")})
    good["files"].update({f"{i:x}": 0 for i in range(100_000)})
    path.write_text(json.dumps(good, separators=(",", ":")))
    return path


def _manifest_deep(folder: Path) -> Path:
    path = folder / "deep-manifest" / MANIFEST
    path.parent.mkdir()
    path.write_text('{"format": "rwkv-state-hub/state-repo", "training": ' + _deep(200_000) + "}")
    return path


def _jsonl_deep_line(folder: Path) -> Path:
    path = folder / "deep-line.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n" + "[" * (CRAFTED_MAX_BYTES - 100) + "\n")
    return path


def _binidx_many_docs(folder: Path) -> Path:
    """The index header claims 2^31 documents; the index holds ~1 MB of them."""
    idx, bin_ = folder / "many-docs.idx", folder / "many-docs.bin"
    n_docs = 1 << 31
    body = bytes((CRAFTED_MAX_BYTES - 64) // 12 * 12)
    idx.write_bytes(struct.pack("<9sQBQQ", b"MMIDIDX\x00\x00", 1, 8, n_docs, n_docs + 1) + body)
    bin_.write_bytes(bytes(1024))
    return idx


def _tokenizer_deep(folder: Path) -> Path:
    path = folder / "deep-tokenizer.json"
    depth = 150_000
    path.write_text('{"version": "1.0", "model": ' + '{"a":' * depth + "1" + "}" * depth + "}")
    return path


# name -> (writer, kind); the kind says which readers and commands a file goes through
CRAFTED: dict[str, tuple[Callable[[Path], Path], str]] = {
    "huge-layer.safetensors": (_huge_layer_safetensors, "state"),
    "huge-layer.pth": (_huge_layer_pth, "state"),
    "merged-junk.pth": (_merged_with_junk, "checkpoint"),
    "zip-bomb.pth": (_zip_bomb, "checkpoint"),
    "big-claim.pth": (_storage_claims_more, "checkpoint"),
    "legacy-claim.pth": (_legacy_claims_more, "checkpoint"),
    "long-header.safetensors": (_safetensors_long_header, "state"),
    "huge-shape.safetensors": (_safetensors_huge_shape, "state"),
    "deep-metadata.safetensors": (_deep_metadata, "state"),
    "many-files-manifest": (_manifest_many_files, "manifest"),
    "deep-manifest": (_manifest_deep, "manifest"),
    "deep-line.jsonl": (_jsonl_deep_line, "data"),
    "many-docs.idx": (_binidx_many_docs, "data"),
    "deep-tokenizer.json": (_tokenizer_deep, "tokenizer"),
}


def write_crafted(folder: Path) -> dict[str, Path]:
    """Every crafted file in `folder` (the zip bomb takes a few seconds to deflate)."""
    folder.mkdir(parents=True, exist_ok=True)
    return {name: writer(folder) for name, (writer, _) in CRAFTED.items()}

"""Files a stranger made (issue 16): every reader answers with one StateHubError line naming the file and the
reason, at a cost set by the bytes really there, never by a number written inside; nothing non-finite is ever
written; non-UTF-8 file names work.

The cost cases measure wall time and the Python heap (tracemalloc): the old readers built a range or a dict as
large as a layer number found in a key."""

from __future__ import annotations

import json
import os
import struct
import time
import tracemalloc
import zipfile
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import random_state_like
from safetensors.torch import save_file

import rwkv_state_hub.checkpoint as checkpoint
from rwkv_state_hub import State, StateHubError, export_state, load_state, read_spec
from rwkv_state_hub.formats import MAGIC, detect_format, save_ai00, save_merged, save_native, save_pth
from rwkv_state_hub.hub_card import MANIFEST_FORMAT, read_manifest
from rwkv_state_hub.info import describe

HEADS, N = 3, 64  # the random models' state: 2 layers x 3 heads x 64


def key(i: int | str) -> str:
    return f"blocks.{i}.att.time_state"


def refused(fn, path: Path, *words: str, where: str | None = None) -> str:
    """fn(path) raises one StateHubError line that names `where` (the path by default) and holds `words`."""
    with pytest.raises(StateHubError) as e:
        fn(path)
    msg = str(e.value)
    assert "\n" not in msg, msg
    assert (where or str(path)) in msg, msg
    for word in words:
        assert word in msg, msg
    return msg


@contextmanager
def cheap(seconds: float = 1.0, heap: int = 16 << 20):
    """The block takes under `seconds` and grows the Python heap by under `heap` bytes."""
    tracemalloc.start()
    start = time.perf_counter()
    yield
    elapsed = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert elapsed < seconds, f"took {elapsed:.2f} s"
    assert peak < heap, f"Python heap peaked at {peak >> 20} MB"


def rezip(src: Path, dst: Path, pickle_edit=None, compression: int = zipfile.ZIP_STORED,
          extra: dict[str, bytes] | None = None) -> Path:
    """A copy of a torch.save zip: its pickle edited, its entries compressed, or entries added."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if pickle_edit and info.filename.endswith("/data.pkl"):
                data = pickle_edit(data)
            zout.writestr(info.filename, data)
        for name, data in (extra or {}).items():
            zout.writestr(name, data)
    return dst


def native_with_metadata(path: Path, metadata: str, **header: str) -> Path:
    """A two-layer state file whose header carries our magic and this metadata text."""
    tensors = {key(i): torch.zeros(HEADS, N, N) for i in range(2)}
    save_file(tensors, str(path), metadata={"format": MAGIC, "metadata": metadata, **header})
    return path


# ---------------------------------------------------------------- cost set by a number inside the file


@pytest.mark.parametrize("container", ["safetensors", "pth"])
def test_a_huge_layer_number_costs_nothing(tmp_path, container):
    """The issue's 6 KB state whose only key is blocks.30000000 (3.3 GB and 20 s before); here 3M."""
    path = tmp_path / f"far.{container}"
    tensors = {key(3_000_000): torch.zeros(HEADS, N, N)}
    if container == "safetensors":
        save_file(tensors, str(path))
    else:
        torch.save(tensors, path)
    for fn in (load_state, detect_format, describe):
        with cheap():
            refused(fn, path, "layer 0 is missing", "the last numbered 3000000")


def test_a_junk_block_in_a_merged_model_costs_nothing(random_models, tmp_path):
    """A merged .pth with one extra key blocks.300000.junk: the old reader checked 300k layers' shapes."""
    sd = torch.load(random_models["v6"], weights_only=True)
    sd.update({key(i): torch.zeros(HEADS, N, N) for i in range(2)})
    sd["blocks.300000.junk"] = torch.zeros(1)
    path = tmp_path / "merged.pth"
    torch.save(sd, path)
    for fn in (read_spec, load_state, describe):
        with cheap():
            refused(fn, path, "block 2 is missing", "3 blocks", "300000")


def test_a_layer_number_longer_than_python_parses(tmp_path):
    """int() refuses numbers over 4300 digits with ValueError: such a key is no layer key at all."""
    path = tmp_path / "digits.st"
    save_file({key("9" * 5000): torch.zeros(HEADS, N, N)}, str(path))
    refused(load_state, path, "no blocks.*.att.time_state")


def test_stride_0_views_cannot_claim_more_than_the_file(tmp_path):
    """A 1 KB file whose tensor is one float expanded to 1 x 2000 x 2000 (stacking it would copy 16 MB; with a
    bigger shape, gigabytes): the tensors may not claim more bytes than the file holds."""
    path = tmp_path / "expanded.pth"
    torch.save({key(0): torch.zeros(1).expand(1, 2000, 2000)}, path)
    with cheap():
        refused(load_state, path, "claim 16,000,000 bytes", "more than the file's")


def test_a_storage_larger_than_its_record_is_refused(tmp_path):
    """The pickle claims a storage and a tensor of 10^9 floats over a 16-byte record: torch refuses it
    before allocating (checked here, since our bound relies on it)."""
    torch.save({key(0): torch.zeros(4)}, tmp_path / "small.pth")
    big = b"J" + struct.pack("<i", 10**9)

    def claim(data: bytes) -> bytes:
        edited = data.replace(b"cpuq\x06K\x04t", b"cpuq\x06" + big + b"t").replace(b"QK\x00K\x04\x85",
                                                                                   b"QK\x00" + big + b"\x85")
        assert edited.count(big) == 2
        return edited

    path = rezip(tmp_path / "small.pth", tmp_path / "claims.pth", claim)
    with cheap():
        refused(load_state, path, "not a readable PyTorch checkpoint")


def test_compressed_entries_are_refused(tmp_path):
    torch.save({key(0): torch.zeros(HEADS, N, N)}, tmp_path / "plain.pth")
    path = rezip(tmp_path / "plain.pth", tmp_path / "deflated.pth", compression=zipfile.ZIP_DEFLATED)
    refused(load_state, path, "is compressed")


def test_entry_sizes_beyond_the_file_are_refused(tmp_path):
    """The central directory says data/0 holds 2 GB: refused from the directory, before torch reads a byte."""
    path = tmp_path / "claims.pth"
    torch.save({key(0): torch.zeros(HEADS, N, N)}, path)
    data = bytearray(path.read_bytes())
    at = -1
    while True:  # the central directory record of data/0: signature, then its name's length at 28, name at 46
        at = data.index(b"PK\x01\x02", at + 1)
        (name_length,) = struct.unpack("<H", data[at + 28 : at + 30])
        if data[at + 46 : at + 46 + name_length].endswith(b"/data/0"):
            break
    data[at + 24 : at + 28] = struct.pack("<I", 2**31)  # uncompressed size
    path.write_bytes(bytes(data))
    refused(load_state, path, "claim 2,1", "more than the file's")


def test_absurd_entry_names_and_counts_are_refused(tmp_path, monkeypatch):
    torch.save({key(0): torch.zeros(HEADS, N, N)}, tmp_path / "plain.pth")
    long = rezip(tmp_path / "plain.pth", tmp_path / "long.pth", extra={"x" * 2000: b""})
    refused(load_state, long, "an entry name of 2000 characters")
    many = rezip(tmp_path / "plain.pth", tmp_path / "many.pth", extra={f"e{i}": b"" for i in range(10)})
    monkeypatch.setattr(checkpoint, "MAX_ZIP_ENTRIES", 8)
    refused(load_state, many, "entries, over 8")


def test_the_legacy_format_is_refused_with_what_to_do(tmp_path):
    """Its storage sizes are numbers in the pickle, allocated before they can be checked."""
    path = tmp_path / "old.pth"
    torch.save({key(0): torch.zeros(HEADS, N, N)}, path, _use_new_zipfile_serialization=False)
    for fn in (load_state, read_spec, describe):
        refused(fn, path, "legacy", "re-save it with a current torch.save")


def test_an_empty_state_is_refused(tmp_path):
    path = tmp_path / "empty.st"
    save_file({key(0): torch.zeros(0, N, N)}, str(path))
    refused(load_state, path, "[0, 64, 64]", "none 0")


def test_a_key_with_a_line_break_stays_on_one_line(tmp_path):
    path = tmp_path / "keys.pth"
    torch.save({"conv\n1.weight": torch.zeros(1)}, path)
    refused(read_spec, path, "not an RWKV model checkpoint", "conv\\n1.weight")


# ---------------------------------------------------------------- state metadata


@pytest.mark.parametrize("metadata,words", [
    ("[1, 2]", ["metadata must be a JSON object, found a list"]),
    ('{"base_model_sha256": 5}', ["base_model_sha256 must be a string, found an integer"]),
    ('{"n_layer": true}', ["n_layer must be an integer, found true or false"]),
    ('{"training": "fast"}', ["training must be an object, found a string"]),
    ('{"training": {"steps": "many"}}', ["training.steps must be an integer"]),
    ('{"training": {"parents": [1]}}', ["training.parents must be a list of objects"]),
    ('{"base_model_name": "a\\nb"}', ["base_model_name holds line breaks"]),
    ("[" * 200_000 + "]" * 200_000, ["nested deeper than 16"]),
    ('{"a": ' * 17 + "1" + "}" * 17, ["nested deeper than 16"]),
    ('{"a": "' + "x" * (1 << 20) + '"}', ["over the 1048576 limit"]),
    ("{not json", ["not valid JSON"]),
], ids=["list", "sha-int", "bool-int", "training-str", "steps-str", "parents", "newline", "deep", "depth-17",
        "huge", "broken"])
def test_malformed_metadata_is_refused(tmp_path, metadata, words):
    path = native_with_metadata(tmp_path / "state.st", metadata)
    for fn in (load_state, describe):
        refused(fn, path, "metadata", *words)


def test_good_metadata_passes_with_its_unknown_keys(tmp_path):
    meta = {"arch": "v6", "n_layer": 2, "base_model_repo": None, "training": {"best_val_loss": 2, "data": {"a": [1]},
                                                                             "parents": [{"file": "a", "weight": 1}]},
            "prompt": "Once upon a time"}
    back = load_state(native_with_metadata(tmp_path / "state.st", json.dumps(meta)))
    assert back.metadata == meta


def test_an_unknown_layout_is_refused(tmp_path):
    path = native_with_metadata(tmp_path / "state.st", "{}", layout="value,head,key")
    refused(load_state, path, "unknown layout 'value,head,key'", "head,value,key")
    for layout, fmt in (("head,value,key", "safetensors"), ("head,key,value", "ai00")):
        assert detect_format(native_with_metadata(tmp_path / f"{fmt}.st", "{}", layout=layout)) == fmt


# ---------------------------------------------------------------- manifests


def good_manifest() -> dict:
    entry = {"path": "state.safetensors", "size": 10, "sha256": "cd" * 32}
    return {"format": MANIFEST_FORMAT, "format_version": 1, "base_model_sha256": "ab" * 32,
            "base_model": {"sha256": "ab" * 32, "name": "RWKV"}, "arch": "v6", "files": {"native": entry}}


def entry_with(**changes) -> dict:
    m = good_manifest()
    m["files"]["native"].update(changes)
    return m


@pytest.mark.parametrize("manifest,words", [
    ({**good_manifest(), "base_model": "str"}, ["base_model must be an object, found a string"]),
    ({**good_manifest(), "base_model": {"size": "big"}}, ["base_model.size must be an integer"]),
    ({**good_manifest(), "arch": ["v6"]}, ["arch must be a string, found a list"]),
    ({**good_manifest(), "format_version": True}, ["format_version must be an integer"]),
    ({**good_manifest(), "files": []}, ["files must be an object, found a list"]),
    ({**good_manifest(), "files": {"native": "state.st"}}, ["native file: expected an object, found a string"]),
    (entry_with(path="a" * 300 + ".safetensors"), ["native file: path", "not a plain file name"]),
    (entry_with(path="st\0ate"), ["native file: path holds line breaks or control characters"]),
    (entry_with(path="\ud800"), ["native file: path holds line breaks or control characters"]),
    (entry_with(path=".."), ["not a plain file name"]),
    (entry_with(size=True), ["native file: size must be an integer"]),
    (entry_with(size=-1), ["size of 0 or more"]),
    (entry_with(sha256=None), ["native file: it has no sha256"]),
    ({**good_manifest(), "files": {**good_manifest()["files"], "a\nb": good_manifest()["files"]["native"]}},
     ["'a\\nb', not a plain name"]),
    ({**good_manifest(), "files": {f"r{i}": good_manifest()["files"]["native"] for i in range(17)}},
     ["lists no native state file"]),
    ({**good_manifest(), "files": {**good_manifest()["files"],
                                   **{f"r{i}": good_manifest()["files"]["native"] for i in range(16)}}},
     ["17 files, over 16"]),
], ids=["base-str", "base-size", "arch-list", "version-bool", "files-list", "entry-str", "long-name", "nul",
        "surrogate", "dotdot", "size-bool", "size-negative", "no-sha", "role-newline", "no-native", "too-many"])
def test_malformed_manifests_are_refused(tmp_path, manifest, words):
    path = tmp_path / "rwkv-state.json"
    path.write_text(json.dumps(manifest))
    refused(lambda p: read_manifest(p, "alice/bad/rwkv-state.json"), path, *words, where="alice/bad/rwkv-state.json")


@pytest.mark.parametrize("content,words", [
    (b"[" * 200_000 + b"]" * 200_000, ["nested deeper than 16"]),
    (b'{"format": "' + b"x" * (1 << 20) + b'"}', ["over the 1048576 limit"]),
    (b'{"format": "\xff"}', ["not valid JSON"]),
], ids=["deep", "huge", "not-utf8"])
def test_unparsable_manifests_are_refused_cheaply(tmp_path, content, words):
    path = tmp_path / "rwkv-state.json"
    path.write_bytes(content)
    with cheap(heap=8 << 20):
        refused(lambda p: read_manifest(p, "alice/bad/rwkv-state.json"), path, *words,
                where="alice/bad/rwkv-state.json")


def test_a_good_manifest_passes(tmp_path):
    path = tmp_path / "rwkv-state.json"
    path.write_text(json.dumps(good_manifest()))
    assert read_manifest(path, "alice/good/rwkv-state.json") == good_manifest()


# ---------------------------------------------------------------- nothing non-finite is written


def poisoned(random_models, where: str) -> State:
    state = random_state_like(read_spec(random_models["v6"]), seed=3, full=True)
    if where == "wkv":
        state.wkv[1, 2, 63, 63] = float("nan")
    else:
        state.shift[0, 1, 5] = float("-inf")
    return state


@pytest.mark.parametrize("where", ["wkv", "token-shift"])
@pytest.mark.parametrize("writer", ["native", "pth", "ai00", "merged", "export"])
def test_no_writer_writes_a_nonfinite_state(random_models, tmp_path, writer, where):
    """mix and bake end in save_native or export_state: every writer checks, so none of them can write one (also
    the formats that drop the token shift: a state that broken is refused whole)."""
    state = poisoned(random_models, where)
    dest = tmp_path / "out" / "state.bin"
    write = {"native": save_native, "pth": save_pth, "ai00": save_ai00,
             "export": lambda s, p: export_state(s, p, "pth"),
             "merged": lambda s, p: save_merged(s, p, random_models["v6"])}[writer]
    with pytest.raises(StateHubError, match=f"{where} state has non-finite values .NaN or inf.; not writing it"):
        write(state, dest)
    assert not dest.parent.exists() or os.listdir(dest.parent) == []


def test_nonfinite_weights_are_found_slice_by_slice(random_models, tmp_path, monkeypatch):
    sd = torch.load(random_models["v7"], weights_only=True)
    assert checkpoint.nonfinite_tensors(sd) == []
    sd["blocks.1.att.key.weight"].view(-1)[-1] = float("nan")  # the last value of the last slice
    sd["head.weight"][0, 0] = float("inf")
    sd["emb.weight"] = sd["emb.weight"].bfloat16()
    path = tmp_path / "broken.pth"
    torch.save(sd, path)
    monkeypatch.setattr(checkpoint, "_CHUNK", 1000)  # 37 slices of key.weight
    assert describe(random_models["v7"])["nonfinite_tensors"] == []
    assert describe(path)["nonfinite_tensors"] == ["blocks.1.att.key.weight", "head.weight"]


def test_info_reports_a_nonfinite_state(random_models, tmp_path):
    state = poisoned(random_models, "wkv")
    path = tmp_path / "nan.pth"
    torch.save({key(i): state.wkv[i] for i in range(state.n_layer)}, path)
    assert describe(path)["nonfinite_tensors"] == ["wkv"]


# ---------------------------------------------------------------- non-UTF-8 file names


@pytest.mark.parametrize("fmt", ["safetensors", "pth", "ai00", "merged"])
def test_non_utf8_file_names_work(random_models, tmp_path, fmt):
    path = tmp_path / os.fsdecode(b"st\xff\xfe." + fmt.encode())
    try:
        path.write_bytes(b"")
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system takes only UTF-8 names")
    path.unlink()
    state = random_state_like(read_spec(random_models["v6"]), seed=4)
    export_state(state, path, fmt, base_model=random_models["v6"])
    assert os.fsencode(path).endswith(b"st\xff\xfe." + fmt.encode())
    assert detect_format(path) == fmt
    through = torch.float16 if fmt == "ai00" else torch.float32
    assert torch.equal(load_state(path).wkv, state.wkv.to(through).float())
    assert describe(path)["file"] == str(path)

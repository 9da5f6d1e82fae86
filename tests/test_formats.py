"""Every on-disk form of a State: round trips, the layout each consumer needs (read with plain torch and
safetensors, not our reader), detection by content, foreign files, merged models against the `rwkv` pip
package, one-line errors for bad files, and atomic writes."""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import re
import struct
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import ARCHS, random_state_like
from pip_reference import pip_model
from safetensors import safe_open
from safetensors.torch import save_file

import rwkv_state_hub.formats as formats
from rwkv_state_hub import State, StateHubError, export_state, load_model, load_state, read_spec
from rwkv_state_hub.errors import InvalidOptionError
from rwkv_state_hub.formats import detect_format, format_notes

TOL = 1e-4
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# (format, dtype argument, the dtype the wkv values pass through, what detect_format says)
ROUND_TRIPS = [
    ("safetensors", "fp32", torch.float32, "safetensors"),
    ("pth", "fp32", torch.float32, "pth"),
    ("pth", "bf16", torch.bfloat16, "pth"),
    ("pth", "fp16", torch.float16, "pth"),
    ("ai00", "fp16", torch.float16, "ai00"),
    ("ai00", None, torch.float16, "ai00"),
]
MERGEABLE = ["v5.2", "v6"]
TRAINING = {"lr_init": 1.0, "steps": 12, "data": {"name": "qa.jsonl", "sha256": "00" * 32}, "loss": [2.5, 2.25]}


def key(i: int) -> str:
    return f"blocks.{i}.att.time_state"


def spec_of(random_models, arch):
    return read_spec(random_models[arch])


def assert_refused(path: Path, *words: str) -> str:
    """load_state and detect_format both refuse `path` with one StateHubError line naming it."""
    for fn in (load_state, detect_format):
        with pytest.raises(StateHubError) as e:
            fn(path)
        msg = str(e.value)
        assert "\n" not in msg, msg
        assert str(path) in msg, msg
        for word in words:
            assert word in msg, msg
    return msg


def st_header(path: Path) -> dict:
    """The raw JSON header of a safetensors file."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n])


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("fmt,dtype,through,detected", ROUND_TRIPS, ids=[f"{f}-{d}" for f, d, _, _ in ROUND_TRIPS])
@pytest.mark.parametrize("full", [False, True], ids=["wkv", "full"])
def test_round_trip(random_models, tmp_path, arch, fmt, dtype, through, detected, full):
    spec = spec_of(random_models, arch)
    state = random_state_like(spec, seed=1, full=full)
    state.metadata["training"] = TRAINING
    path = tmp_path / "state.out"
    assert export_state(state, path, fmt, dtype=dtype) == path
    notes = format_notes(state, fmt)
    back = load_state(path)
    assert detect_format(path) == detected
    assert back.wkv.dtype == torch.float32 and back.wkv.shape == state.wkv.shape
    assert torch.equal(back.wkv, state.wkv.to(through).float())
    if through != torch.float32:  # the rounding really happened, so the comparison above means something
        assert not torch.equal(back.wkv, state.wkv)
    assert back.source == str(path)
    if fmt == "safetensors":
        assert notes == []
        for name in ("arch", "base_model_sha256", "base_model_name", "base_model_size", "n_layer", "head_size"):
            assert back.metadata[name] == state.metadata[name]
        assert back.metadata["training"] == TRAINING
        assert back.arch == arch and back.base_model_sha256 == spec.sha256
        assert back.metadata["format_version"] == 1
        if full:
            assert back.shift is not None and torch.equal(back.shift, state.shift)
        else:
            assert back.shift is None
    else:
        assert back.shift is None
        if full:
            assert len(notes) == 1 and fmt in notes[0] and "token shift" in notes[0]
        else:
            assert notes == []
    assert back.problems(spec) == []


@pytest.mark.parametrize("arch", MERGEABLE)
@pytest.mark.parametrize("full", [False, True], ids=["wkv", "full"])
def test_merged_round_trip(random_models, tmp_path, arch, full):
    spec = spec_of(random_models, arch)
    state = random_state_like(spec, seed=2, full=full)
    path = tmp_path / "merged.pth"
    assert export_state(state, path, "merged", base_model=random_models[arch]) == path
    notes = format_notes(state, "merged")
    assert detect_format(path) == "merged"
    back = load_state(path)
    assert torch.equal(back.wkv, state.wkv)
    assert back.shift is None
    assert back.arch == arch and back.metadata["merged_into"] == "merged.pth"
    assert (len(notes) == 1 and "token shift" in notes[0]) if full else notes == []
    # every weight of the base model is there, unchanged, plus exactly the n_layer state keys
    base = torch.load(random_models[arch], weights_only=True)
    merged = torch.load(path, weights_only=True)
    assert set(merged) == set(base) | {key(i) for i in range(spec.n_layer)}
    assert all(torch.equal(merged[k], base[k]) for k in base)


def test_merged_into_a_merged_model_replaces_its_state(random_models, tmp_path):
    spec = spec_of(random_models, "v6")
    first, second = random_state_like(spec, seed=3), random_state_like(spec, seed=4)
    a, b = tmp_path / "a.pth", tmp_path / "b.pth"
    export_state(first, a, "merged", base_model=random_models["v6"])
    export_state(second, b, "merged", base_model=a, force=True)  # a's sha256 differs from the state's model
    assert torch.equal(load_state(b).wkv, second.wkv)
    assert sum(k.endswith(".time_state") for k in torch.load(b, weights_only=True)) == spec.n_layer


# ---------------------------------------------------------------- on-disk layout, read without our reader


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_pth_layout(random_models, tmp_path, dtype):
    spec = spec_of(random_models, "v6")
    state = random_state_like(spec, seed=5, full=True)
    assert not torch.equal(state.wkv[0], state.wkv[0].transpose(1, 2))  # a transpose would show
    path = tmp_path / "state.pth"
    export_state(state, path, "pth", dtype=dtype)
    sd = torch.load(path, weights_only=True)
    assert isinstance(sd, dict)
    assert sorted(sd) == sorted(key(i) for i in range(spec.n_layer))  # exactly n_layer tensors, nothing else
    for i in range(spec.n_layer):
        t = sd[key(i)]
        assert t.shape == (spec.n_head, spec.head_size, spec.head_size)
        assert t.shape[0] * t.shape[1] == spec.n_embd  # RWKV Runner's check
        assert t.dtype == DTYPES[dtype]
        assert torch.equal(t, state.wkv[i].to(DTYPES[dtype]))


def test_ai00_layout(random_models, tmp_path):
    spec = spec_of(random_models, "v7")
    state = random_state_like(spec, seed=6, full=True)
    path = tmp_path / "state.st"
    export_state(state, path, "ai00")
    header = st_header(path)
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    assert sorted(tensors) == sorted(key(i) for i in range(spec.n_layer))
    assert all(v["dtype"] == "F16" for v in tensors.values())
    with safe_open(str(path), framework="pt") as f:
        for i in range(spec.n_layer):
            t = f.get_tensor(key(i))
            assert t.dtype == torch.float16 and t.shape == (spec.n_head, spec.head_size, spec.head_size)
            assert torch.equal(t, state.wkv[i].transpose(1, 2).half())  # [H, K, V]
            assert not torch.equal(t, state.wkv[i].half())


def test_native_layout(random_models, tmp_path):
    spec = spec_of(random_models, "v5.2")
    state = random_state_like(spec, seed=7, full=True)
    path = tmp_path / "state.st"
    export_state(state, path, "safetensors")
    header = st_header(path)
    meta = header["__metadata__"]
    assert meta["format"] == "rwkv-state-hub" and meta["layout"] == "head,value,key"
    assert json.loads(meta["metadata"])["base_model_sha256"] == spec.sha256
    with safe_open(str(path), framework="pt") as f:
        for i in range(spec.n_layer):
            t = f.get_tensor(key(i))
            assert header[key(i)]["dtype"] == "F32"
            assert torch.equal(t, state.wkv[i])  # [H, V, K], fp32
            assert torch.equal(f.get_tensor(f"blocks.{i}.att.shift_state"), state.shift[i, 0])
            assert torch.equal(f.get_tensor(f"blocks.{i}.ffn.shift_state"), state.shift[i, 1])


# ---------------------------------------------------------------- detection by content


@pytest.mark.parametrize(
    "fmt,name,detected",
    [("pth", "x.st", "pth"), ("ai00", "x.pth", "ai00"), ("safetensors", "x.bin", "safetensors")],
)
def test_detection_by_content_not_extension(random_models, tmp_path, fmt, name, detected):
    spec = spec_of(random_models, "v6")
    state = random_state_like(spec, seed=8)
    written = tmp_path / f"written.{fmt}"
    export_state(state, written, fmt)
    renamed = written.rename(tmp_path / name)
    assert detect_format(renamed) == detected
    back = load_state(renamed)
    through = torch.float16 if fmt == "ai00" else torch.float32
    assert torch.equal(back.wkv, state.wkv.to(through).float())


# ---------------------------------------------------------------- foreign files


def test_foreign_blinkdl_peft_bf16_pth(random_models, tmp_path):
    spec = spec_of(random_models, "v6")
    wkv = random_state_like(spec, seed=9).wkv
    path = tmp_path / "rwkv-x060-peft-state.pth"
    torch.save({key(i): wkv[i].bfloat16() for i in range(spec.n_layer)}, path)
    back = load_state(path)
    assert detect_format(path) == "pth"
    assert back.wkv.dtype == torch.float32
    assert torch.equal(back.wkv, wkv.bfloat16().float())  # [H, V, K] as stored, no transpose
    assert back.shift is None and back.metadata == {}
    assert back.problems(spec) == []


def test_foreign_f16_safetensors_is_ai00_layout(random_models, tmp_path):
    spec = spec_of(random_models, "v7")
    wkv = random_state_like(spec, seed=10).wkv
    path = tmp_path / "ai00.state"
    save_file({key(i): wkv[i].transpose(1, 2).half().contiguous() for i in range(spec.n_layer)}, str(path))
    assert "__metadata__" not in st_header(path)
    back = load_state(path)
    assert detect_format(path) == "ai00"
    assert torch.equal(back.wkv, wkv.half().float())  # transposed back to [H, V, K]


def test_foreign_fp32_safetensors_is_value_key_layout(random_models, tmp_path):
    spec = spec_of(random_models, "v5.2")
    wkv = random_state_like(spec, seed=11).wkv
    path = tmp_path / "foreign.safetensors"
    save_file({key(i): wkv[i].contiguous() for i in range(spec.n_layer)}, str(path))
    back = load_state(path)
    assert detect_format(path) == "safetensors"
    assert torch.equal(back.wkv, wkv)
    assert back.metadata == {}


def test_foreign_legacy_torch_container(random_models, tmp_path):
    """Old torch.save files (before the zip container) allocate sizes written in their pickle before anything
    can be checked: refused, saying how to convert them (issue 16)."""
    spec = spec_of(random_models, "v5.2")
    wkv = random_state_like(spec, seed=17).wkv
    path = tmp_path / "old.pth"
    torch.save({key(i): wkv[i].bfloat16() for i in range(spec.n_layer)}, path, _use_new_zipfile_serialization=False)
    assert path.read_bytes()[:1] == b"\x80"
    assert_refused(path, "legacy", "re-save it with a current torch.save")


# ---------------------------------------------------------------- merged models in the rwkv pip package


@pytest.mark.parametrize("arch", MERGEABLE)
def test_merged_model_in_pip_equals_ours_from_the_state(random_models, tmp_path, arch):
    base = random_models[arch]
    model = load_model(base)
    state = random_state_like(model.spec, seed=12, scale=0.5)
    merged = tmp_path / f"merged-{arch}.pth"
    export_state(state, merged, "merged", base_model=base)
    tokens = torch.randint(0, model.spec.vocab_size, (40,), generator=torch.Generator().manual_seed(2)).tolist()
    ref, _ = pip_model(merged, arch).forward(tokens, None, full_output=True)
    with torch.no_grad():
        ours = model(torch.tensor([tokens]), state.to_recurrent())[0][0]
        zero = model(torch.tensor([tokens]))[0][0]
    assert ref.shape == ours.shape
    assert (ours - ref.float()).abs().max().item() < TOL
    assert (ours - zero).abs().max().item() > 1e-2  # the state matters
    back = load_state(merged)
    assert detect_format(merged) == "merged" and torch.equal(back.wkv, state.wkv)


def test_no_merged_export_for_v7(random_models, tmp_path):
    spec = spec_of(random_models, "v7")
    path = tmp_path / "merged.pth"
    with pytest.raises(InvalidOptionError, match=re.escape(formats.PIP_V7_ADVICE)) as e:
        export_state(random_state_like(spec), path, "merged", base_model=random_models["v7"])
    assert "\n" not in str(e.value)
    assert not path.exists() and os.listdir(tmp_path) == []


def test_merged_refuses_a_state_for_another_model(random_models, tmp_path):
    state = random_state_like(spec_of(random_models, "v6"), seed=13)  # same dims as the v5.2 model
    path = tmp_path / "merged.pth"
    with pytest.raises(StateHubError, match="v6"):
        export_state(state, path, "merged", base_model=random_models["v5.2"])
    assert not path.exists()


def test_force_never_merges_a_state_of_the_wrong_shape(random_models, tmp_path):
    spec = spec_of(random_models, "v6")
    state = State(torch.zeros(spec.n_layer + 1, spec.n_head, spec.head_size, spec.head_size))
    path = tmp_path / "merged.pth"
    with pytest.raises(StateHubError, match="3 layers"):
        export_state(state, path, "merged", base_model=random_models["v6"], force=True)
    assert not path.exists()


@pytest.mark.parametrize("fmt,dtype", [("ai00", None), ("pth", "fp16")])
def test_f16_export_refuses_values_out_of_range(random_models, tmp_path, fmt, dtype):
    spec = spec_of(random_models, "v6")
    state = random_state_like(spec, seed=18)
    state.wkv[1, 2, 3, 4] = 1e5  # fine in fp32 and bf16, inf in fp16
    path = tmp_path / "state.out"
    with pytest.raises(StateHubError, match="layer 1 has values up to 1e[+]05") as err:
        export_state(state, path, fmt, dtype=dtype)
    assert "\n" not in str(err.value) and not path.exists()
    export_state(state, path, "pth", dtype="bf16")  # bf16 has the range
    assert torch.isfinite(load_state(path).wkv).all()


def test_non_finite_states_are_not_exported(random_models, tmp_path):
    state = random_state_like(spec_of(random_models, "v6"), seed=2)
    state.wkv[0, 0, 0, 0] = float("nan")
    with pytest.raises(StateHubError, match="non-finite"):
        export_state(state, tmp_path / "x.pth", "pth")
    assert not (tmp_path / "x.pth").exists()


def test_export_argument_errors(random_models, tmp_path):
    state = random_state_like(spec_of(random_models, "v6"))
    with pytest.raises(InvalidOptionError, match="bf16"):
        export_state(state, tmp_path / "a.pth", "pth", dtype="fp64")
    with pytest.raises(InvalidOptionError, match="base model"):
        export_state(state, tmp_path / "b.pth", "merged")
    with pytest.raises(InvalidOptionError, match="^fmt='gguf': unknown format.*ai00"):
        export_state(state, tmp_path / "c.gguf", "gguf")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("fmt,dtype", [("ai00", "bf16"), ("ai00", "fp32"), ("safetensors", "fp16"),
                                       ("merged", "bf16")])
def test_a_dtype_the_format_cannot_hold_is_refused_not_changed(random_models, tmp_path, fmt, dtype):
    """Ai00 reads F16 only, our file and a merged model keep fp32: any other dtype asked for is an error."""
    state = random_state_like(spec_of(random_models, "v6"))
    with pytest.raises(InvalidOptionError, match=f"^dtype='{dtype}': the {fmt} format holds fp(16|32) only"):
        export_state(state, tmp_path / "s.out", fmt, dtype=dtype, base_model=random_models["v6"])
    assert os.listdir(tmp_path) == []


def test_native_is_the_old_name_of_safetensors(random_models, tmp_path):
    state = random_state_like(spec_of(random_models, "v6"), full=True)
    assert formats.canonical_format("native") == "safetensors"
    assert export_state(state, tmp_path / "s.safetensors", "native") == tmp_path / "s.safetensors"
    assert format_notes(state, "native") == []  # nothing left behind: our format
    assert detect_format(tmp_path / "s.safetensors") == "safetensors"


# ---------------------------------------------------------------- bad files


def layers(shapes, dtype=torch.float32) -> dict[str, torch.Tensor]:
    return {key(i): torch.zeros(shape, dtype=dtype) for i, shape in shapes.items()}


class RunsCode:
    """Unpickling this opens (so creates) `marker` for writing: what a malicious .pth would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.pth"
    path.write_bytes(b"")
    assert_refused(path)


@pytest.mark.parametrize("prefix", [b"", b"\x80\x02", b"PK\x03\x04"], ids=["plain", "pickle-magic", "zip-magic"])
def test_random_bytes(tmp_path, prefix):
    data = random.Random(0).randbytes(4096)
    if not prefix:
        assert data[:1] != b"\x80" and data[:2] != b"PK"
    path = tmp_path / "noise.st"
    path.write_bytes(prefix + data)
    assert_refused(path)


def test_truncated_safetensors(random_models, tmp_path):
    path = tmp_path / "cut.st"
    export_state(random_state_like(spec_of(random_models, "v6")), path, "safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert_refused(path, "safetensors")


def test_truncated_pth(random_models, tmp_path):
    path = tmp_path / "cut.pth"
    export_state(random_state_like(spec_of(random_models, "v6")), path, "pth")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert_refused(path)


def test_missing_layer(tmp_path):
    path = tmp_path / "state.pth"
    torch.save(layers({0: (3, 64, 64), 2: (3, 64, 64)}), path)
    assert_refused(path, "layer 1", "missing")


def test_layers_of_different_shapes(tmp_path):
    path = tmp_path / "state.pth"
    torch.save(layers({0: (3, 64, 64), 1: (2, 64, 64)}), path)
    assert_refused(path, "layer 1", "[2, 64, 64]", "[3, 64, 64]")


def test_non_square_state(tmp_path):
    path = tmp_path / "state.pth"
    torch.save(layers({0: (3, 64, 32), 1: (3, 64, 32)}), path)
    assert_refused(path, "[3, 64, 32]")


def test_state_of_wrong_rank(tmp_path):
    path = tmp_path / "state.st"
    save_file(layers({0: (64, 64), 1: (64, 64)}), str(path))
    assert_refused(path, "[64, 64]")


def test_int_state(tmp_path):
    path = tmp_path / "state.pth"
    torch.save(layers({0: (3, 64, 64), 1: (3, 64, 64)}, dtype=torch.int32), path)
    assert_refused(path, "int32")


def test_unexpected_key(tmp_path):
    path = tmp_path / "state.pth"
    torch.save({**layers({0: (3, 64, 64), 1: (3, 64, 64)}), "optimizer.lr": torch.tensor(1.0)}, path)
    assert_refused(path, "optimizer.lr")


def test_not_a_dict(tmp_path):
    path = tmp_path / "state.pth"
    torch.save([torch.zeros(3, 64, 64)], path)
    assert_refused(path, "dict")


def test_no_such_file(tmp_path):
    assert_refused(tmp_path / "missing.pth", "no such file")


def test_model_without_time_state(random_models):
    assert_refused(random_models["v6"], "time_state")


def test_damaged_native_metadata(tmp_path):
    path = tmp_path / "state.st"
    save_file(layers({0: (3, 64, 64)}), str(path), metadata={"format": "rwkv-state-hub", "metadata": "{not json"})
    assert_refused(path, "metadata")


def test_incomplete_token_shift(tmp_path):
    path = tmp_path / "state.st"
    tensors = {**layers({0: (3, 64, 64), 1: (3, 64, 64)}), "blocks.0.att.shift_state": torch.zeros(192)}
    save_file(tensors, str(path))
    assert_refused(path, "token-shift")


@pytest.mark.parametrize("container", ["pickle", "torch.save"])
def test_pickle_that_would_run_code(tmp_path, container):
    # the payload is live: a plain unpickler runs it
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(RunsCode(proof), protocol=2)).close()
    assert proof.exists()

    marker = tmp_path / "pwned"
    evil = {key(0): torch.zeros(1, 4, 4), "blocks.1.att.time_state": RunsCode(marker)}
    path = tmp_path / "evil.pth"
    if container == "pickle":
        path.write_bytes(pickle.dumps(evil, protocol=2))
    else:
        torch.save(evil, path)
    assert_refused(path)
    assert not marker.exists()


# ---------------------------------------------------------------- atomic writes


def _disk_full() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _half_then_fail_save_file(tensors, filename, metadata=None):
    data = safetensors.torch.save(tensors, metadata=metadata)
    Path(filename).write_bytes(data[: len(data) // 2])
    raise _disk_full()


def _half_then_fail_torch_save(obj, f, *args, **kwargs):
    f.write(b"PK\x03\x04" + b"\0" * 100)  # our writers hand torch.save a file object
    raise _disk_full()


@pytest.mark.parametrize("fmt", ["safetensors", "ai00", "pth", "merged"])
def test_failed_write_keeps_the_old_file(random_models, tmp_path, monkeypatch, fmt):
    spec = spec_of(random_models, "v6")
    old, new = random_state_like(spec, seed=14), random_state_like(spec, seed=15)
    folder = tmp_path / "out"
    dest = folder / "state.bin"
    export_state(old, dest, fmt, base_model=random_models["v6"])
    before = dest.read_bytes()
    if fmt in ("safetensors", "ai00"):
        monkeypatch.setattr(formats, "save_file", _half_then_fail_save_file)
    else:
        monkeypatch.setattr(torch, "save", _half_then_fail_torch_save)
    with pytest.raises(StateHubError, match=f"^{dest}: cannot write \\(No space left on device\\)$"):
        export_state(new, dest, fmt, base_model=random_models["v6"])
    monkeypatch.undo()
    assert dest.read_bytes() == before
    assert os.listdir(folder) == ["state.bin"]  # no temp file left behind
    through = torch.float16 if fmt == "ai00" else torch.float32
    assert torch.equal(load_state(dest).wkv, old.wkv.to(through).float())


def test_write_to_a_new_folder(random_models, tmp_path):
    dest = tmp_path / "a" / "b" / "state.st"
    state = random_state_like(spec_of(random_models, "v6"))
    export_state(state, dest, "safetensors")
    assert os.listdir(dest.parent) == ["state.st"]
    assert torch.equal(load_state(dest).wkv, state.wkv)


def test_state_dataclass_survives_export(random_models, tmp_path):
    """Exporting never changes the State it was given."""
    spec = spec_of(random_models, "v6")
    state = random_state_like(spec, seed=16, full=True)
    wkv, shift, meta = state.wkv.clone(), state.shift.clone(), dict(state.metadata)
    for fmt in ("safetensors", "pth", "ai00", "merged"):
        export_state(state, tmp_path / f"s.{fmt}", fmt, base_model=random_models["v6"])
    assert isinstance(state, State)
    assert torch.equal(state.wkv, wkv) and torch.equal(state.shift, shift) and state.metadata == meta

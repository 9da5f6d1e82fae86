"""Issue 16 item 2: a property-based suite over every reader and parser a stranger's input reaches.

The property, for every generated input: it either works, or raises StateHubError whose message is one line and
names the file (and line, where there is one) or the option; no other exception escapes. Where working has a
meaning beyond "did not raise" (a config field has its type, a binidx sample can be read, a state's metadata is a
dict) that is checked too, because "accepted it and crashed later" is the same bug one step on.

Inputs: every state format (native, pth, ai00, merged) from valid files with bytes changed, cut or inserted,
wholly random bytes, crafted safetensors headers, crafted torch zips and legacy pickles; checkpoints as dicts of
tensors with odd keys, shapes and dtypes; our safetensors metadata JSON and layout; file names of any bytes; the
Hub manifest; jsonl, txt and binidx data; tokenizer.json files and arbitrary text (lone surrogates included)
through every tokenizer; `rwkv-state train --dry-run`, `generate`, `eval` and `mix` with arbitrary numbers;
TrainConfig.from_dict and `--config` TOML with values of any type; the demo's upload. The examples issue 16 names
are explicit @example inputs, run in every profile. The bigger-than-it-looks inputs (cost set by a claim in the
file) are tests/test_cost_bounds.py's.

Profiles (hypothesis settings): "ci", the default, a fixed seed (derandomize) and a few dozen examples per
property, the whole file in under a minute on one core; "long", 5000 examples per property from fresh seeds:

    RWKV_STATE_HUB_FUZZ=long .venv/bin/python -m pytest -q tests/test_fuzz.py      # an hour or more

A failure prints the smallest input found and a @reproduce_failure line to replay it.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import fields
from pathlib import Path

import pytest
import tomlkit
import torch
from click.testing import CliRunner
from fuzz_inputs import (
    assert_refusal,
    hf_tokenizer_json,
    manifest_for,
    safetensors_raw,
    small_checkpoint,
    torch_legacy,
    torch_zip,
    works_or_refuses,
    write_valid_files,
)
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from rwkv_state_hub import StateHubError, load_state
from rwkv_state_hub.checkpoint import read_spec, spec_from_state_dict
from rwkv_state_hub.cli import cli
from rwkv_state_hub.data import load_dataset
from rwkv_state_hub.formats import MAGIC, export_state
from rwkv_state_hub.hub_card import read_manifest
from rwkv_state_hub.info import describe
from rwkv_state_hub.tokenizer import get_tokenizer
from rwkv_state_hub.training import TrainConfig

_QUIET = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large,
          HealthCheck.large_base_example, HealthCheck.filter_too_much]
settings.register_profile("ci", max_examples=50, derandomize=True, deadline=None, database=None,
                          suppress_health_check=_QUIET, print_blob=True)
settings.register_profile("long", max_examples=5000, derandomize=False, deadline=None, database=None,
                          suppress_health_check=_QUIET, print_blob=True)
settings.load_profile(os.environ.get("RWKV_STATE_HUB_FUZZ", "ci"))


def examples(share: float) -> settings:
    """A share of the profile's examples: less for the tests whose every example runs a whole command, more for
    the cheap parsers."""
    return settings(max_examples=max(5, int(settings.default.max_examples * share)))


REPO_FILE = "mallory/crafted/rwkv-state.json"
LAYOUTS = ("head,value,key", "head,key,value")


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> dict[str, Path]:
    return write_valid_files(tmp_path_factory.mktemp("valid"))


@pytest.fixture(scope="module")
def spec(valid):
    return read_spec(valid["model"])


# ---------------------------------------------------------------- strategies

LAYER = st.one_of(st.integers(0, 3), st.integers(0, 1 << 20))
TENSOR_NAMES = st.one_of(
    LAYER.map(lambda i: f"blocks.{i}.att.time_state"),
    st.tuples(LAYER, st.sampled_from(["att", "ffn"])).map(lambda t: f"blocks.{t[0]}.{t[1]}.shift_state"),
    st.sampled_from(["emb.weight", "blocks.x.att.time_state", "blocks.01.att.time_state", "head.weight",
                     "model.blocks.0.att.time_state", "blocks.0.att.time_state.x", "__metadata__", ""]),
    st.text(max_size=40),
)
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int8, torch.uint8,
          torch.bool, torch.complex64]
SHAPES = st.lists(st.integers(0, 5), max_size=4).map(tuple)
# text as a stranger writes it: any characters, with what breaks a one-line message or an encoder mixed in
# (line breaks, terminal escapes, lone surrogates: what json.loads makes of "\ud800")
TEXT = st.lists(st.one_of(st.characters(), st.sampled_from(["\n", "\r", "\x1b[2J", "\u2028", "\x00", '"', "\\"]),
                          st.integers(0xD800, 0xDFFF).map(chr)), max_size=40).map("".join)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=16,
)


def _tensor(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.linspace(-3, 3, math.prod(shape)).reshape(shape).to(dtype)


def tensors() -> st.SearchStrategy[torch.Tensor]:
    return st.builds(_tensor, st.sampled_from(DTYPES), SHAPES)


# edits to a valid file: a byte changed anywhere or in the first kilobyte (where every length, offset and key
# name lives), a cut, bytes inserted: what a bad disk, a cut download or a hostile hand makes of it
EDITS = st.lists(st.tuples(st.sampled_from(["flip", "header", "cut", "insert"]), st.integers(0, 1 << 22),
                           st.binary(min_size=1, max_size=16)), min_size=1, max_size=4)


def edited(data: bytes, edits: list[tuple[str, int, bytes]]) -> bytes:
    out = bytearray(data)
    for kind, at, payload in edits:
        if kind == "insert":
            at %= len(out) + 1
            out[at:at] = payload
        elif out:
            at %= min(len(out), 1024) if kind == "header" else len(out)
            if kind == "cut":
                del out[at:]
            else:
                out[at] = payload[0]
    return bytes(out)


@st.composite
def safetensors_files(draw) -> bytes:
    """A safetensors file whose header is made up: names, dtypes, shapes, offsets (consistent, mostly), metadata,
    and sometimes a header length that lies."""
    header, offset = {}, 0
    for _ in range(draw(st.integers(0, 4))):
        dtype = draw(st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "U8", "BOOL", "XX"]))
        shape = list(draw(SHAPES))
        size = math.prod(shape) * {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8}.get(dtype, 1)
        end = offset + size if draw(st.integers(0, 4)) else draw(st.integers(-5, 1 << 40))
        header[draw(TENSOR_NAMES)] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, end]}
        offset = max(offset, end) if isinstance(end, int) and 0 <= end < 1 << 16 else offset
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.sampled_from(["format", "layout", "metadata", "x"]),
                                                      st.one_of(st.just(MAGIC), st.sampled_from(LAYOUTS), TEXT)))
    data = draw(st.binary(min_size=offset, max_size=offset + 8))
    length = draw(st.none() | st.integers(0, (1 << 64) - 1))
    return safetensors_raw(header, data, length)


@st.composite
def torch_containers(draw) -> bytes:
    """torch zip and legacy files written by hand: storages that claim more or fewer elements than they hold,
    deflated records, names and shapes made up."""
    entries, data = {}, {}
    for i in range(draw(st.integers(1, 3))):
        shape = draw(SHAPES)
        numel = draw(st.one_of(st.just(math.prod(shape)), st.integers(0, 64), st.integers(0, 1 << 40)))
        entries[draw(TENSOR_NAMES)] = (numel, shape)
        data[str(i)] = draw(st.binary(max_size=64).map(lambda b: b[: len(b) // 4 * 4]))
    if draw(st.booleans()):
        return torch_legacy(entries, data)
    return torch_zip(entries, data, compress=draw(st.booleans()))


def native_state(metadata: dict[str, str]) -> bytes:
    """A 2-layer state of ones for the test model, in a safetensors file with this header metadata (written by
    hand: the safetensors writer refuses text it could not write as UTF-8, a reader must not trust that)."""
    header = {f"blocks.{i}.att.time_state": {"dtype": "F32", "shape": [2, 32, 32],
                                             "data_offsets": [i * 8192, (i + 1) * 8192]} for i in range(2)}
    header["__metadata__"] = metadata
    return safetensors_raw(header, struct.pack("<f", 1.0) * 4096)


# ---------------------------------------------------------------- what a command does with a state file


def _through_commands(path: Path, spec, out: Path) -> None:
    """load_state, info, check against a model and export: each works or refuses by the rule, and what loads
    is a State the rest of the code can trust."""
    name = path.name
    state = works_or_refuses(lambda: load_state(path), name)
    works_or_refuses(lambda: describe(path), name)
    if state is None:
        return
    assert state.wkv.dim() == 4 and state.wkv.dtype == torch.float32
    assert isinstance(state.metadata, dict), f"metadata of type {type(state.metadata).__name__}"
    for problem in works_or_refuses(lambda: state.problems(spec), name) or []:
        assert_refusal(StateHubError(problem), name)
    works_or_refuses(lambda: state.check(spec, force=True), name)
    works_or_refuses(lambda: export_state(state, out / "exported.pth", "pth"), name)


def _cli_one_line(args: list[str], *names: str) -> str:
    """`rwkv-state ARGS`: exit 0, or exit 1 with exactly one line 'Error: ...' naming one of `names`."""
    result = CliRunner().invoke(cli, args)
    if result.exit_code == 0:
        return result.output
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), (
        f"exit {result.exit_code}, {type(result.exception).__name__}: {result.exception}\n{result.output[-2000:]}")
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), f"not one line: {result.output[-2000:]!r}"
    assert_refusal(StateHubError(lines[0].removeprefix("Error: ")), *names)
    return result.output


# ---------------------------------------------------------------- state files


@pytest.mark.parametrize("fmt", ["safetensors", "pth", "ai00", "merged", "full"])
@given(edits=EDITS)
def test_state_files_with_bytes_changed(valid, spec, tmp_path, fmt, edits):
    path = tmp_path / valid[fmt].name
    path.write_bytes(edited(valid[fmt].read_bytes(), edits))
    _through_commands(path, spec, tmp_path)


@given(prefix=st.sampled_from([b"", b"PK\x03\x04", b"\x80\x02", b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19.",
                               struct.pack("<Q", 2) + b"{}", struct.pack("<Q", 40) + b"{"]),
       body=st.binary(max_size=2048))
def test_random_bytes_as_a_state(spec, tmp_path, prefix, body):
    path = tmp_path / "random.st"
    path.write_bytes(prefix + body)
    _through_commands(path, spec, tmp_path)


@given(content=safetensors_files())
def test_crafted_safetensors_headers(spec, tmp_path, content):
    path = tmp_path / "crafted.safetensors"
    path.write_bytes(content)
    _through_commands(path, spec, tmp_path)


@given(content=torch_containers())
def test_crafted_torch_containers(spec, tmp_path, content):
    path = tmp_path / "crafted.pth"
    path.write_bytes(content)
    _through_commands(path, spec, tmp_path)


@given(obj=st.one_of(
    st.dictionaries(TENSOR_NAMES, tensors(), max_size=4),
    st.dictionaries(TENSOR_NAMES, st.one_of(tensors(), JSON), max_size=3),
    JSON, tensors(),
))
def test_torch_files_of_odd_tensors(spec, tmp_path, obj):
    path = tmp_path / "odd.pth"
    torch.save(obj, path)
    _through_commands(path, spec, tmp_path)


@given(meta=st.one_of(JSON.map(json.dumps), TEXT),
       layout=st.one_of(st.sampled_from(LAYOUTS), st.none(), TEXT),
       keyed=st.dictionaries(st.sampled_from(["arch", "base_model_sha256", "base_model_name", "training", "n_layer",
                                              "tokenizer", "format_version"]), JSON, max_size=4))
@example(meta="[1, 2]", layout="head,value,key", keyed={})  # issue 16: a list
@example(meta="{}", layout="value,key", keyed={})  # issue 16: an unknown layout
def test_state_metadata(valid, spec, tmp_path, meta, layout, keyed):
    """Our safetensors metadata: the JSON is made up (or made of our own keys with made-up values), and so is
    the layout. An unknown layout is refused, not read as head,value,key."""
    header = {"format": MAGIC, "metadata": meta if not keyed else json.dumps(keyed)}
    if layout is not None:
        header["layout"] = layout
    path = tmp_path / "meta.safetensors"
    path.write_bytes(native_state(header))
    _through_commands(path, spec, tmp_path)
    if layout and layout not in LAYOUTS:  # "" is read as no layout
        with pytest.raises(StateHubError):
            load_state(path)


@given(name=st.binary(min_size=1, max_size=60).filter(lambda b: b"/" not in b and b"\0" not in b
                                                       and b not in (b".", b"..")),
       fmt=st.sampled_from(["safetensors", "pth", "ai00"]))
@example(name=b"\x80", fmt="safetensors")  # issue 16: a non-UTF-8 name
def test_any_file_name(valid, tmp_path, name, fmt):
    """A valid state reads whatever bytes its name is made of (non-UTF-8 included), through the library and
    `rwkv-state info`."""
    path = tmp_path / os.fsdecode(name)
    path.write_bytes(valid[fmt].read_bytes())
    try:
        load_state(path)
        _cli_one_line(["info", str(path)])
    finally:
        path.unlink()


# ---------------------------------------------------------------- checkpoints


ARCHS = ["v5.2", "v6", "v7"]
_CHECKPOINTS = {arch: small_checkpoint(arch) for arch in ARCHS}


# a key by its index among the checkpoint's, or one the reader takes the model's dimensions from
SOME_KEY = st.one_of(st.integers(0, 200), st.sampled_from(["emb.weight", "head.weight", "blocks.0.att.time_faaaa",
                                                          "blocks.0.att.r_k", "blocks.0.ffn.key.weight",
                                                          "blocks.1.att.key.weight", "blocks.0.att.time_decay"]))
CHECKPOINT_OPS = st.one_of(
    st.tuples(st.just("drop"), SOME_KEY),
    st.tuples(st.just("add"), TENSOR_NAMES, st.sampled_from(DTYPES), SHAPES),
    st.tuples(st.just("block"), st.integers(2, 5000), st.sampled_from(["junk", "att.key.weight"]), SHAPES),
    st.tuples(st.just("reshape"), SOME_KEY, SHAPES),
    st.tuples(st.just("retype"), SOME_KEY, st.sampled_from(DTYPES)),
)


def odd_checkpoint(arch: str, ops: list[tuple]) -> dict[str, torch.Tensor]:
    """A valid checkpoint of `arch`, then keys dropped, added (also for a block far beyond the model's layers),
    reshaped and retyped: the ops are drawn, so a failure prints them rather than a page of tensors."""
    sd = dict(_CHECKPOINTS[arch])
    for op, *args in ops:
        keys = sorted(sd)
        key = args[0] if args[0] in sd else keys[args[0] % len(keys)] if keys and isinstance(args[0], int) else None
        if op == "drop" and key:
            del sd[key]
        elif op == "add":
            sd[args[0]] = _tensor(args[1], args[2])
        elif op == "block":
            sd[f"blocks.{args[0]}.{args[1]}"] = _tensor(torch.float32, args[2])
        elif op == "reshape" and key:
            sd[key] = _tensor(sd[key].dtype, args[1])
        elif op == "retype" and key:
            sd[key] = sd[key].to(args[1])
    return sd


@given(arch=st.sampled_from(ARCHS), ops=st.lists(CHECKPOINT_OPS, min_size=1, max_size=4))
@example(arch="v5.2", ops=[("reshape", "emb.weight", ())])
def test_checkpoint_reader(tmp_path, arch, ops):
    """spec_from_state_dict on a dict in memory, read_spec and `info` on the saved file."""
    sd = odd_checkpoint(arch, ops)
    path = tmp_path / "model.pth"
    spec_ = works_or_refuses(lambda: spec_from_state_dict(sd, path), path.name)
    if spec_ is not None:
        assert min(spec_.n_layer, spec_.n_head, spec_.head_size, spec_.vocab_size) >= 1
        assert spec_.n_head * spec_.head_size == spec_.n_embd
    torch.save(sd, path)
    works_or_refuses(lambda: read_spec(path), path.name)
    works_or_refuses(lambda: describe(path), path.name)


# ---------------------------------------------------------------- the Hub manifest


_MANIFEST_KEYS = ["format", "format_version", "arch", "n_layer", "base_model_sha256", "base_model", "files",
                  "training", "token_shift"]


@st.composite
def manifests(draw) -> bytes:
    """A valid manifest with keys set to any JSON (or long text) or removed; sometimes any JSON or bytes."""
    m = manifest_for({"native": ("state.safetensors", b"x"), "pth": ("state.pth", b"y")})
    for _ in range(draw(st.integers(0, 4))):
        key = draw(st.sampled_from(_MANIFEST_KEYS + ["files.native", "files.native.path", "base_model.name"]))
        value = draw(st.one_of(JSON, st.text(min_size=200, max_size=400)))
        *parents, leaf = key.split(".")
        target = m
        for p in parents:
            target = target.get(p) if isinstance(target.get(p), dict) else {}
        if draw(st.integers(0, 4)):
            target[leaf] = value
        else:
            target.pop(leaf, None)
    whole = draw(st.integers(0, 9))
    if whole == 0:
        return draw(st.binary(max_size=200))
    if whole == 1:
        return json.dumps(draw(JSON)).encode()
    return json.dumps(m).encode()


def _issue_manifests() -> list[bytes]:
    m = manifest_for({"native": ("state.safetensors", b"x")})
    long_name = manifest_for({"native": ("s" * 300 + ".safetensors", b"x")})
    return [json.dumps({**m, "base_model": "str"}).encode(), json.dumps(long_name).encode()]


ISSUE_MANIFESTS = _issue_manifests()


@given(content=manifests())
@examples(3)
@example(content=ISSUE_MANIFESTS[0])  # issue 16: "base_model": "str"
@example(content=ISSUE_MANIFESTS[1])  # issue 16: a 300-character file name
def test_manifest_reader(tmp_path, content):
    """read_manifest works or refuses naming the repo file; what it accepts, the puller and the demo can use."""
    path = tmp_path / "rwkv-state.json"
    path.write_bytes(content)
    m = works_or_refuses(lambda: read_manifest(path, REPO_FILE), REPO_FILE)
    if m is None:
        return
    assert isinstance(m.get("base_model") or {}, dict)
    assert isinstance((m.get("base_model") or {}).get("name") or "", str)
    assert isinstance(m.get("arch") or "", str)
    assert isinstance(m.get("training") or {}, dict)
    for entry in m["files"].values():
        assert isinstance(entry["path"], str) and 0 < len(entry["path"]) <= 255
        assert isinstance(entry["size"], int) and isinstance(entry["sha256"], str)


# ---------------------------------------------------------------- data and tokenizers


_RECORDS = [{"text": "the sky is blue."}, {"prompt": "sky?", "response": "blue."},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            {"instruction": "say", "input": "", "output": "it"}, {"tokens": [1, 2, 3], "mask": [0, 1, 1]}]


@st.composite
def odd_lines(draw) -> bytes:
    """One line of JSON Lines, without its newline: a record of made-up values, any JSON, any text or bytes."""
    kind = draw(st.integers(0, 4))
    if kind == 4:  # text as a stranger's editor writes it: any characters, lone surrogates as \ud800 escapes
        value = {draw(st.sampled_from(["text", "prompt", "output"])): draw(TEXT), "response": "r", "instruction": "i"}
    elif kind == 0:
        record = dict(draw(st.sampled_from(_RECORDS)))
        record[draw(st.sampled_from(["text", "prompt", "response", "messages", "tokens", "mask", "output"]))] = \
            draw(st.one_of(JSON, TEXT, st.lists(st.integers(-(2**40), 2**40), max_size=5)))
        value = record
    elif kind == 1:  # any JSON, often an object of unknown keys (quoted back in the refusal)
        value = draw(st.one_of(JSON, st.dictionaries(TEXT, JSON, min_size=1, max_size=3)))
    else:
        raw = draw(st.binary(max_size=80)) if kind == 2 else draw(TEXT).encode("utf-8", "surrogatepass")
        return raw.replace(b"\n", b" ")
    return json.dumps(value, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")


@pytest.fixture(scope="module")
def tokenizers(valid):
    return {"bytes": get_tokenizer("bytes"), "world": get_tokenizer("world"),
            "hf": get_tokenizer(str(valid["tokenizer"]))}


@given(line=odd_lines(), at=st.integers(0, 3), tok=st.sampled_from(["bytes", "world"]))
@examples(3)
@example(line=b'{"text": "\\ud800"}', at=1, tok="world")  # issue 16
@example(line=b'{"\\n": null}', at=0, tok="bytes")
def test_jsonl_data(tmp_path, tokenizers, line, at, tok):
    """Good lines around one odd line: it works, or the error names the file and that line."""
    lines = [json.dumps(r).encode() for r in _RECORDS[:3]]
    lines.insert(at, line)
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    tokenizer = tokenizers[tok]
    data = works_or_refuses(lambda: load_dataset(path, tokenizer, 32, tokenizer.vocab_size), f"{path.name}:{at + 1}")
    for sample in data or []:
        assert len(sample.tokens) == len(sample.mask) <= 33
        assert all(0 <= t < tokenizer.vocab_size for t in sample.tokens)


@given(content=st.one_of(st.binary(max_size=300), TEXT.map(lambda t: t.encode("utf-8", "surrogatepass"))))
@examples(3)
def test_text_data(tmp_path, tokenizers, content):
    """Any bytes as a .txt file; text that is not UTF-8 is refused naming the line of the first bad byte."""
    path = tmp_path / "notes.txt"
    path.write_bytes(content)
    tokenizer = tokenizers["bytes"]
    try:
        content.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = content[: e.start].count(b"\n") + 1
        with pytest.raises(StateHubError) as refused:
            load_dataset(path, tokenizer, 16, 256)
        assert_refusal(refused.value, f"{path.name}:{line}", f"line {line}")
        return
    data = works_or_refuses(lambda: load_dataset(path, tokenizer, 16, 256), path.name)
    for sample in data or []:
        assert all(0 <= t < 256 for t in sample.tokens)


@st.composite
def binidx_pairs(draw) -> tuple[bytes, bytes]:
    """A binidx index and data file: header fields, sizes and pointers made up or consistent, tokens of any
    value the dtype holds."""
    code = draw(st.sampled_from([1, 2, 3, 4, 5, 8, 8, 8, 6, 0, 99]))
    itemsize = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 4, 8: 2}.get(code, 1)
    sizes = draw(st.lists(st.integers(0, 12), max_size=5))
    pointers, at = [], 0
    for s in sizes:
        pointers.append(at if draw(st.integers(0, 5)) else draw(st.integers(-(2**40), 2**40)))
        at += s * itemsize
    n = len(sizes) if draw(st.integers(0, 5)) else draw(st.integers(0, 2**40))
    magic = b"MMIDIDX\x00\x00" if draw(st.integers(0, 5)) else draw(st.binary(min_size=9, max_size=9))
    version = 1 if draw(st.integers(0, 5)) else draw(st.integers(0, 2**64 - 1))
    header = struct.pack("<9sQBQQ", magic, version, code, n, len(sizes) + 1)
    index = header + struct.pack(f"<{len(sizes)}i", *sizes) + struct.pack(f"<{len(sizes)}q", *pointers)
    index += struct.pack(f"<{len(sizes) + 1}q", *range(len(sizes) + 1))
    data = draw(st.binary(min_size=at, max_size=at + 4))
    if not draw(st.integers(0, 5)):
        index = index[: draw(st.integers(0, len(index)))]
    return index, data


def _binidx(documents: list[list[int]]) -> tuple[bytes, bytes]:
    sizes = [len(d) for d in documents]
    pointers = [2 * sum(sizes[:i]) for i in range(len(sizes))]
    header = struct.pack("<9sQBQQ", b"MMIDIDX\x00\x00", 1, 8, len(sizes), len(sizes) + 1)
    index = header + struct.pack(f"<{len(sizes)}i", *sizes) + struct.pack(f"<{len(sizes)}q", *pointers)
    index += struct.pack(f"<{len(sizes) + 1}q", *range(len(sizes) + 1))
    return index, struct.pack(f"<{sum(sizes)}H", *(t for d in documents for t in d))


ISSUE_BINIDX = _binidx([[1, 2, 3]] * 20 + [[1, 300, 2]])


@given(pair=binidx_pairs())
@examples(3)
@example(pair=ISSUE_BINIDX)  # issue 16: an id beyond the vocabulary in document 20
def test_binidx_data(tmp_path, tokenizers, pair):
    """Loading checks everything: once load_dataset returns, every sample reads, inside the vocabulary."""
    (tmp_path / "tokens.idx").write_bytes(pair[0])
    (tmp_path / "tokens.bin").write_bytes(pair[1])
    data = works_or_refuses(lambda: load_dataset(tmp_path / "tokens.idx", tokenizers["bytes"], 8, 256), "tokens.")
    for i in range(min(len(data or []), 500)):
        assert all(0 <= t < 256 for t in data[i].tokens)


@st.composite
def tokenizer_files(draw) -> bytes:
    """A valid tokenizer.json with parts replaced by any JSON, or any bytes."""
    doc = hf_tokenizer_json()
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(["model", "model.vocab", "model.type", "model.unk_token", "added_tokens",
                                    "pre_tokenizer", "normalizer", "decoder", "version"]))
        *parents, leaf = key.split(".")
        target = doc
        for p in parents:
            target = target[p] if isinstance(target.get(p), dict) else {}
        target[leaf] = draw(JSON)
    return draw(st.one_of(st.just(json.dumps(doc).encode()), st.binary(max_size=200)))


@given(content=tokenizer_files(), text=TEXT)
def test_tokenizer_files(tmp_path, content, text):
    path = tmp_path / "tokenizer.json"
    path.write_bytes(content)
    tok = works_or_refuses(lambda: get_tokenizer(str(path)), path.name)
    if tok is not None:
        ids = works_or_refuses(lambda: tok.encode(text), "")
        assert ids is None or all(0 <= i < tok.vocab_size for i in ids)


@pytest.mark.parametrize("name", ["world", "bytes", "utf-16-le", "hf"])
@given(text=TEXT)
@example(text="\ud800")
def test_encode_decode_any_text(tokenizers, name, text):
    """Any text through any tokenizer: ids inside its vocabulary, or our one line; valid text comes back whole
    from the built-in tokenizers."""
    tok = tokenizers[name] if name in tokenizers else get_tokenizer(name)
    ids = works_or_refuses(lambda: tok.encode(text), "")
    if ids is None:
        return
    assert all(0 <= i < tok.vocab_size for i in ids)
    decoded = tok.decode(ids)
    if name != "hf" and not any(0xD800 <= ord(c) <= 0xDFFF for c in text):
        assert decoded == text


# ---------------------------------------------------------------- options and the TOML config


COUNTS = ["ctx_len", "micro_bsz", "grad_accum", "steps", "val_every", "save_every"]  # at least 1
POSITIVE = ["epochs", "lr_init", "lr_final"]  # finite and > 0
NON_NEGATIVE = ["warmup_steps", "grad_clip", "encoder_lr_scale", "memory_budget"]  # finite and >= 0
OTHER = ["seed", "beta1", "beta2", "adam_eps"]
NUMBERS = st.one_of(st.integers(-3, 3), st.integers(-(2**70), 2**70),
                    st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-320, 1e308]), st.floats())


def clearly_invalid(key: str, value: float) -> bool:
    """Values no reading of the option allows; each must be refused by name before any work."""
    if key in COUNTS:
        return not value >= 1
    if key in POSITIVE:
        return not (math.isfinite(value) and value > 0)
    if key in NON_NEGATIVE:
        return not (math.isfinite(value) and value >= 0)
    return False


def _names(key: str) -> tuple[str, str]:
    return key, key.replace("_", "-")


@given(key=st.sampled_from(COUNTS + POSITIVE + NON_NEGATIVE + ["seed"]), value=NUMBERS)
@examples(0.6)
# the examples of issue 16, run in every profile before anything generated
@example(key="save_every", value=0)
@example(key="val_every", value=0)
@example(key="micro_bsz", value=0)
@example(key="micro_bsz", value=-1)
@example(key="grad_accum", value=0)
@example(key="epochs", value=math.nan)
@example(key="lr_init", value=math.inf)
def test_train_options(valid, tmp_path, key, value):
    """`rwkv-state train --dry-run --OPTION VALUE` with any number: it runs, or one line names the option (click's
    own usage error, exit 2, included for a number its type cannot hold)."""
    option, text = "--" + key.replace("_", "-"), repr(value)
    args = ["train", "--model", str(valid["model"]), "--data", str(valid["jsonl"]), "--out", str(tmp_path / "run"),
            "--dry-run", option, text]
    result = CliRunner().invoke(cli, args)
    if result.exit_code == 2:  # click could not parse the value as its type: its own message, naming the option
        assert option in result.output and "Traceback" not in result.output
        return
    assert result.exit_code in (0, 1), f"exit {result.exit_code}: {result.exception!r}\n{result.output[-1500:]}"
    if result.exit_code == 1:
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: "), result.output[-1500:]
        assert_refusal(StateHubError(lines[0]), *_names(key))
    else:
        assert not clearly_invalid(key, float(text)), f"{option} {text} was accepted"


# (command, option) -> what no reading of the option allows; the arguments around it are valid
OTHER_COMMANDS = {
    ("generate", "--temperature"): lambda v: not (math.isfinite(v) and v >= 0),
    ("generate", "--top-p"): lambda v: not (math.isfinite(v) and 0 <= v <= 1),
    ("generate", "--max-tokens"): lambda v: not v >= 0,
    ("generate", "--samples"): lambda v: not v >= 0,
    ("eval", "--ctx-len"): lambda v: not v >= 1,
}


@given(which=st.sampled_from(sorted(OTHER_COMMANDS)), value=NUMBERS)
@examples(0.6)
def test_command_options(valid, which, value):
    """generate and eval with any number in one option: they run, or one line names the option. Counts that
    would make a command run long (tokens, samples) are drawn small when they are valid."""
    command, option = which
    if option in ("--max-tokens", "--samples") and isinstance(value, int) and value > 3:
        value = 3
    base = {"generate": ["generate", "--model", str(valid["model"]), "--prompt", "the sky", "--max-tokens", "3"],
            "eval": ["eval", "--model", str(valid["model"]), "--data", str(valid["jsonl"])]}[command]
    result = CliRunner().invoke(cli, base + [option, repr(value)])
    if result.exit_code == 2:
        assert option in result.output and "Traceback" not in result.output
        return
    assert result.exit_code in (0, 1), f"exit {result.exit_code}: {result.exception!r}\n{result.output[-1500:]}"
    if result.exit_code == 1:
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: "), result.output[-1500:]
        assert_refusal(StateHubError(lines[0]), option, option.removeprefix("--").replace("-", "_"))
    else:
        assert not OTHER_COMMANDS[which](float(value)), f"{command} {option} {value!r} was accepted"


@given(weights=st.lists(NUMBERS, min_size=1, max_size=3))
@examples(0.6)
@example(weights=[math.nan, 0.5])
@example(weights=[0, 1e38])  # overflows float32
def test_mix_weights(valid, tmp_path, weights):
    """`rwkv-state mix a b --weights ...` with any numbers: a finite state written, or one line, nothing written."""
    out = tmp_path / "mixed.safetensors"
    out.unlink(missing_ok=True)
    text = ",".join(repr(w) for w in weights)
    _cli_one_line(["mix", str(valid["safetensors"]), str(valid["full"]), "--weights", text, "-o", str(out)],
                  "--weights", "weight", out.name)
    if out.exists():
        mixed = load_state(out)
        assert torch.isfinite(mixed.wkv).all() and (mixed.shift is None or torch.isfinite(mixed.shift).all())


_TYPES = {f.name: f.type for f in fields(TrainConfig)}


def _well_typed(key: str, value: object) -> bool:
    kind = _TYPES[key]
    if value is None:
        return "None" in kind
    if kind.startswith("list"):
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if kind.startswith("bool"):
        return type(value) is bool
    if kind.startswith("int"):
        return type(value) is int
    if kind.startswith("float"):
        return type(value) in (int, float) and math.isfinite(value)
    return isinstance(value, str)


TOML_VALUES = st.one_of(NUMBERS.filter(lambda v: not isinstance(v, int) or abs(v) < 2**63), st.booleans(),
                        st.text(max_size=20), st.lists(st.text(max_size=8), max_size=3),
                        st.lists(st.integers(-5, 5), max_size=3), st.dictionaries(st.text(max_size=5),
                                                                                 st.integers(), max_size=2))


@given(values=st.dictionaries(st.sampled_from(sorted(set(_TYPES) - {"model", "data", "out"})), TOML_VALUES,
                              min_size=1, max_size=3))
@example(values={"micro_bsz": "4"})  # issue 16: wrongly typed TOML values
@example(values={"epochs": [1]})
def test_config_values(valid, tmp_path, values):
    """TrainConfig.from_dict with values of any type: refused naming the key, or a config whose every field has
    its declared type and an allowed value."""
    settings_ = {"model": str(valid["model"]), "data": [str(valid["jsonl"])], "out": str(tmp_path), **values}
    names = [n for k in values for n in _names(k)]
    cfg = works_or_refuses(lambda: TrainConfig.from_dict(settings_, "run.toml"), *names)
    if cfg is None:
        return
    for key in _TYPES:
        value = getattr(cfg, key)
        assert _well_typed(key, value), f"{key} = {value!r} accepted"
        if key in COUNTS + POSITIVE + NON_NEGATIVE and value is not None:
            assert not clearly_invalid(key, value), f"{key} = {value!r} accepted"


@given(values=st.dictionaries(st.sampled_from(COUNTS + POSITIVE + ["precision", "export", "full_state", "tokenizer"]),
                              TOML_VALUES, min_size=1, max_size=2))
@examples(0.5)
def test_config_file(valid, tmp_path, values):
    """`rwkv-state train --config run.toml --dry-run` with any values in the file: runs, or one line names the key."""
    doc = tomlkit.document()
    doc.update({"model": str(valid["model"]), "data": [str(valid["jsonl"])], "out": str(tmp_path / "run"), **values})
    path = tmp_path / "run.toml"
    path.write_text(tomlkit.dumps(doc))
    names = [n for k in values for n in _names(k)]
    _cli_one_line(["train", "--config", str(path), "--dry-run"], *names)


# ---------------------------------------------------------------- the demo's upload


@pytest.fixture(scope="module")
def engine(valid):
    from rwkv_state_hub.demo import DemoEngine

    return DemoEngine(str(valid["model"]))


@given(fmt=st.sampled_from(["safetensors", "pth", "ai00", "full"]), edits=EDITS,
       meta=st.dictionaries(st.sampled_from(["training", "base_model_name", "base_model_sha256", "tokenizer",
                                             "arch"]), JSON, max_size=3))
@examples(0.6)
@example(fmt="safetensors", edits=[], meta={"training": 5})  # metadata of the wrong shape, shown on the page
def test_demo_upload(engine, valid, tmp_path, fmt, edits, meta):
    """An uploaded file, with bytes changed or metadata made up: loaded and described on the page, or one line
    naming the file as the visitor named it (never the server's temp path)."""
    from rwkv_state_hub.demo import new_session

    path = tmp_path / f"upload-{fmt}.st"
    if meta and fmt != "full":
        path.write_bytes(native_state({"format": MAGIC, "layout": LAYOUTS[0], "metadata": json.dumps(meta)}))
    else:
        path.write_bytes(edited(valid[fmt].read_bytes(), edits))
    session = new_session()
    loaded = works_or_refuses(lambda: engine.load_upload(path, session), path.name)
    if loaded is not None:
        label, _ = loaded
        assert isinstance(engine.card(label, session), str)

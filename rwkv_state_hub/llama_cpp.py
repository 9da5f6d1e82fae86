"""llama.cpp (through llama-cpp-python) as a consumer: a State as the sequence-state blob llama.cpp restores,
checked against the GGUF it is meant for. docs/llama_cpp.md has the research: the blob's format (3.1), what
llama.cpp checks of it (3.2), and llama-cpp-python's bookkeeping (3.4).

The blob is written here from scratch (struct + numpy) and the GGUF is read by our own bounded parser, so an
export needs neither llama.cpp nor the `gguf` package, and a GGUF from a stranger costs at most its size to read.
The blob is llama.cpp's internal format with no version field: PIN is the version it was verified against.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from .errors import (
    ConsumerError,
    InvalidCheckpointError,
    InvalidOptionError,
    InvalidStateError,
    ModelMismatchError,
    option,
    warn,
)
from .files import atomic_write_bytes

if TYPE_CHECKING:
    import torch

    from .checkpoint import ModelSpec
    from .state import State

PIN = "llama-cpp-python==0.3.36"  # vendors llama.cpp 0c1e57098, whose sequence-state format this module writes
SEQ_MAGIC = 0xAF143CD8  # llama-context.cpp's io_magic
GGML_F32, GGML_F16, GGML_BF16 = 0, 1, 30
# the types whose values we read (to hash them): numpy dtype (little-endian, as the host: x86 and ARM), bytes
_READABLE = {GGML_F32: ("<f4", 4), GGML_F16: ("<f2", 2), GGML_BF16: ("<u2", 2)}
LLAMA_ARCHS = {"rwkv6": "v6", "rwkv7": "v7"}  # the GGUF architectures whose state is ours (two token shifts)
SENTINEL_TOKEN = 0  # what llama-cpp-python's input_ids hold for the restored position (docs 4.1 step 3)
_HEADER = struct.Struct("<IiIiIII")  # magic, seq_id, cell_count, pos, n_seq_id, s_trans, n_layer
_ROW = struct.Struct("<iQ")  # a layer's ggml type and row size in bytes

_MAX_NAME = 1 << 16  # a key or tensor name: real ones are under 100 bytes
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def _llama_cpp():
    """llama_cpp, imported only where a Llama is used: exporting and the CLI's --help never need it."""
    try:
        import llama_cpp
    except ImportError:
        raise ConsumerError(f"llama-cpp-python is not installed: pip install '{PIN}'") from None
    return llama_cpp


# ---------------------------------------------------------------- the GGUF, read by a bounded parser


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF: its numpy shape (ggml's ne reversed), ggml type and absolute byte offset."""

    shape: tuple[int, ...]
    ggml_type: int
    offset: int


@dataclass(frozen=True)
class GGUFModel:
    """What a GGUF header says: its scalar metadata (arrays as ("array", count)) and its tensors."""

    path: str
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensor]

    @property
    def llama_arch(self) -> str:
        return str(self.metadata.get("general.architecture"))

    def int_key(self, name: str, default: int | None = None) -> int:
        """`{arch}.{name}` as a positive whole number, or one line naming the file."""
        value = self.metadata.get(f"{self.llama_arch}.{name}", default)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise InvalidCheckpointError(f"{self.path}: {self.llama_arch}.{name} is {value!r:.40}, expected a "
                                         "whole number")
        return value

    def quantized(self) -> list[str]:
        """The ggml types of tensors whose values we cannot read (quantized): their weights cannot be hashed."""
        return sorted({_type_name(t.ggml_type) for t in self.tensors.values() if t.ggml_type not in _READABLE})


def _type_name(ggml_type: int) -> str:
    names = {2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K",
             14: "Q6_K"}
    return names.get(ggml_type, f"ggml type {ggml_type}")


class _Reader:
    """Reads a GGUF header with every length checked against the bytes left before anything is read."""

    def __init__(self, f: BinaryIO, size: int, where: str) -> None:
        self.f, self.size, self.where = f, size, where

    def fail(self, why: str) -> InvalidCheckpointError:
        return InvalidCheckpointError(f"{self.where}: not a readable GGUF file ({why})")

    def left(self) -> int:
        return self.size - self.f.tell()

    def read(self, n: int) -> bytes:
        if n > self.left():
            raise self.fail(f"{n:,} bytes claimed at offset {self.f.tell():,}, past the end of the file")
        return self.f.read(n)

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

    def string(self, limit: int | None = None) -> str:
        n = self.unpack("<Q")
        if limit is not None and n > limit:
            raise self.fail(f"a name of {n:,} bytes")
        try:
            return self.read(n).decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail("a string that is not UTF-8") from None

    def value(self, vtype: int) -> Any:
        """A scalar or a string; an array (its length checked, its content skipped) is ("array", count)."""
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype != _ARRAY:
            raise self.fail(f"unknown value type {vtype}")
        etype, count = self.unpack("<I"), self.unpack("<Q")
        if etype in _SCALARS:
            self.read(count * struct.calcsize(_SCALARS[etype]))
        elif etype == _STRING:
            if count > self.left() // 8:
                raise self.fail(f"an array of {count:,} strings in {self.left():,} bytes")
            for _ in range(count):
                self.read(self.unpack("<Q"))
        else:
            raise self.fail(f"an array of value type {etype}")
        return ("array", count)

    def tensor_info(self) -> tuple[str, tuple[int, ...], int, int]:
        name = self.string(_MAX_NAME)
        n_dims = self.unpack("<I")
        if not 1 <= n_dims <= 4:
            raise self.fail(f"tensor {name[:80]!r} has {n_dims} dimensions")
        ne = [self.unpack("<Q") for _ in range(n_dims)]
        ggml_type, offset = self.unpack("<I"), self.unpack("<Q")
        return name, tuple(reversed(ne)), ggml_type, offset


def read_gguf(path: str | os.PathLike) -> GGUFModel:
    """A GGUF's header (metadata and tensor table), every count, length and offset checked against the file's
    size: a damaged or hostile file is one InvalidCheckpointError line naming it, never a huge allocation."""
    where = os.fsdecode(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            return _read_header(_Reader(f, size, where))
    except OSError as e:
        raise InvalidCheckpointError(f"{where}: cannot read ({e.strerror or e})") from None


def _read_header(r: _Reader) -> GGUFModel:
    if r.size < 24 or r.read(4) != b"GGUF":
        raise InvalidCheckpointError(f"{r.where}: not a GGUF file (no GGUF magic)")
    version = r.unpack("<I")
    if version not in (2, 3):
        why = "big-endian, or" if version & 0xFFFF == 0 else "version"
        raise r.fail(f"{why} {version}; llama.cpp writes version 3 little-endian")
    n_tensors, n_kv = r.unpack("<Q"), r.unpack("<Q")
    if n_kv > r.left() // 12 or n_tensors > r.left() // 28:
        raise r.fail(f"{n_kv:,} keys and {n_tensors:,} tensors claimed in {r.size:,} bytes")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = r.string(_MAX_NAME)
        metadata[key] = r.value(r.unpack("<I"))
    infos = [r.tensor_info() for _ in range(n_tensors)]
    align = metadata.get("general.alignment", 32)
    if not isinstance(align, int) or align <= 0 or align & (align - 1):
        raise r.fail(f"general.alignment {align!r:.40} is not a power of two")
    start = -(-r.f.tell() // align) * align
    tensors = {}
    for name, shape, ggml_type, offset in infos:
        if name in tensors:
            raise r.fail(f"tensor {name[:80]!r} twice")
        count = 1
        for d in shape:
            count *= d
        width = _READABLE[ggml_type][1] if ggml_type in _READABLE else 1 / 8  # no ggml type packs 64 to a byte
        if offset % align or start + offset + count * width > r.size:
            raise r.fail(f"tensor {name[:80]!r} ({'x'.join(map(str, shape))}) lies past the end of the file")
        tensors[name] = GGUFTensor(shape, ggml_type, start + offset)
    return GGUFModel(r.where, metadata, tensors)


# ---------------------------------------------------------------- GGUF tensors under the official names


def _same(t):
    return t


def _transposed(t):
    return t.transpose(0, 1)


def _row(j: int) -> Callable:
    return lambda t: t[j]


def _reshaped(*shape: int) -> Callable:
    return lambda t: t.reshape(*shape)


def _scaled(factor: float) -> Callable:
    return _same if factor == 1 else (lambda t: t.float() * factor)


Sources = dict[str, tuple[str, Callable]]  # official name -> (GGUF name, transform back)


def _common_sources(n_layer: int) -> Sources:
    src: Sources = {"emb.weight": ("token_embd.weight", _same), "head.weight": ("output.weight", _same)}
    for ours, theirs in (("blocks.0.ln0", "token_embd_norm"), ("ln_out", "output_norm")):
        src |= {f"{ours}.{p}": (f"{theirs}.{p}", _same) for p in ("weight", "bias")}
    for i in range(n_layer):
        for ours, theirs in (("ln1", "attn_norm"), ("ln2", "attn_norm_2"), ("att.ln_x", "time_mix_ln")):
            src |= {f"blocks.{i}.{ours}.{p}": (f"blk.{i}.{theirs}.{p}", _same) for p in ("weight", "bias")}
    return src


def _v7_sources(n_layer: int, n_head: int, head_size: int) -> Sources:
    """The inverse of convert_hf_to_gguf's RWKV-7 transforms (docs/llama_cpp.md 1.3 and 4.3)."""
    src = _common_sources(n_layer)
    for i in range(n_layer):
        a, b, f = f"blocks.{i}.att.", f"blk.{i}.time_mix_", f"blocks.{i}.ffn."
        src |= {a + f"x_{x}": (b + "lerp_fused.weight", _row(j)) for j, x in enumerate("rwkvag")}
        for n in ("w", "a", "g") if i == 0 else ("w", "a", "v", "g"):  # layer 0's v0/v1/v2 are unused copies
            src |= {a + f"{n}1": (b + f"{n}1.weight", _transposed), a + f"{n}2": (b + f"{n}2.weight", _transposed)}
            if n != "g":
                src[a + f"{n}0"] = (b + f"{n}0.weight", _same)
        src |= {a + n: (b + f"{n}.weight", _same) for n in ("k_k", "k_a")}
        src[a + "r_k"] = (b + "r_k.weight", _reshaped(n_head, head_size))
        src |= {a + f"{n}.weight": (b + f"{n}.weight", _same) for n in ("receptance", "key", "value", "output")}
        src[f + "x_k"] = (f"blk.{i}.channel_mix_lerp_k.weight", _same)
        src |= {f + f"{n}.weight": (f"blk.{i}.channel_mix_{n}.weight", _same) for n in ("key", "value")}
    return src


def _v6_sources(n_layer: int, rescale_every: int, fused: bool) -> Sources:
    """The inverse of convert_hf_to_gguf's RWKV-6 transforms, its output rescaling included (docs 1.3)."""
    src = _common_sources(n_layer)
    for i in range(n_layer):
        a, b, f = f"blocks.{i}.att.", f"blk.{i}.time_mix_", f"blocks.{i}.ffn."
        scale = _scaled(2.0 ** (i // rescale_every) if rescale_every else 1)
        src[a + "time_maa_x"] = (b + "lerp_x.weight", _same)
        src |= {a + f"time_maa_{x}": (b + "lerp_fused.weight", _row(j)) if fused else (b + f"lerp_{x}.weight", _same)
                for j, x in enumerate("wkvrg")}
        src |= {a + "time_maa_w1": (b + "w1.weight", _transposed),
                a + "time_maa_w2": (b + "w2.weight", lambda t: t.permute(0, 2, 1)),
                a + "time_decay": (b + "decay.weight", _same), a + "time_faaaa": (b + "first.weight", _same),
                a + "time_decay_w1": (b + "decay_w1.weight", _transposed),
                a + "time_decay_w2": (b + "decay_w2.weight", _transposed),
                a + "output.weight": (b + "output.weight", scale)}
        src |= {a + f"{n}.weight": (b + f"{n}.weight", _same) for n in ("receptance", "key", "value", "gate")}
        src |= {f + f"time_maa_{x}": (f"blk.{i}.channel_mix_lerp_{x}.weight", _same) for x in "kr"}
        src |= {f + f"{n}.weight": (f"blk.{i}.channel_mix_{n}.weight", _same) for n in ("key", "receptance")}
        src[f + "value.weight"] = (f"blk.{i}.channel_mix_value.weight", scale)
    return src


def _sources(model: GGUFModel) -> Sources:
    """Official name -> where its values are in `model`, for the architecture and dims its header declares."""
    if model.llama_arch not in LLAMA_ARCHS:
        raise ModelMismatchError(f"{model.path}: a {model.llama_arch[:40]!r} GGUF; llama.cpp keeps an RWKV state "
                                 f"we can write only for {' and '.join(LLAMA_ARCHS)} models")
    shifts = model.int_key("token_shift_count", 2)
    if shifts != 2:
        raise ModelMismatchError(f"{model.path}: {shifts} token shifts per layer; our states carry 2 "
                                 "(rwkv6qwen2 and arwkv7 hybrids are not RWKV-6/7)")
    n_layer, n_embd, head_size = (model.int_key(k) for k in ("block_count", "embedding_length", "wkv.head_size"))
    if not (0 < n_layer <= len(model.tensors) // 8 and 0 < head_size <= n_embd and n_embd % head_size == 0):
        raise InvalidCheckpointError(f"{model.path}: {n_layer} layers, n_embd {n_embd} and head size {head_size} "
                                     f"do not make an RWKV model of {len(model.tensors)} tensors")
    if model.llama_arch == "rwkv7":
        return _v7_sources(n_layer, n_embd // head_size, head_size)
    fused = "blk.0.time_mix_lerp_fused.weight" in model.tensors
    return _v6_sources(n_layer, model.int_key("rescale_every_n_layers", 0), fused)


def _official(model: GGUFModel, sources: Sources, name: str, load: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """One official tensor from the GGUF through its transform; one line naming the file when the GGUF's tensor
    is missing or the transform does not fit its shape."""
    theirs, transform = sources[name]
    if theirs not in model.tensors:
        raise InvalidCheckpointError(f"{model.path}: no tensor {theirs}, which an {model.llama_arch} GGUF has")
    try:
        return transform(load(theirs))
    except (RuntimeError, IndexError, ValueError, OverflowError) as e:
        shape = "x".join(map(str, model.tensors[theirs].shape))
        raise InvalidCheckpointError(f"{model.path}: {theirs} has shape {shape}, not that of {name} "
                                     f"({' '.join(str(e).split())[:80]})") from None


def gguf_spec(model: GGUFModel) -> ModelSpec:
    """The ModelSpec of a GGUF, every tensor's shape checked as a checkpoint's are (spec_from_state_dict), from
    the header alone: quantized files are checked as well as any."""
    import torch

    from .checkpoint import spec_from_state_dict

    sources = _sources(model)

    def meta(name: str) -> torch.Tensor:
        return torch.empty(model.tensors[name].shape, device="meta")

    sd = {name: _official(model, sources, name, meta) for name in sources}
    spec = spec_from_state_dict(sd, model.path)
    declared = (model.int_key("block_count"), model.int_key("embedding_length"), model.int_key("wkv.head_size"))
    if (spec.n_layer, spec.n_embd, spec.head_size) != declared:
        raise InvalidCheckpointError(f"{model.path}: the header declares {declared[0]} layers, n_embd {declared[1]}, "
                                     f"head size {declared[2]}, but the tensors are those of {spec.dims()}")
    return spec


class _LazyWeights(Mapping):
    """The official tensors of a GGUF, each read from the file when asked for: hashing a big model holds one
    tensor at a time, as the memory-mapped .pth path does."""

    def __init__(self, model: GGUFModel, sources: Sources) -> None:
        self.model, self.sources = model, sources

    def __getitem__(self, name: str) -> torch.Tensor:
        return _official(self.model, self.sources, name, self._load)

    def __iter__(self) -> Iterator[str]:
        return iter(self.sources)

    def __len__(self) -> int:
        return len(self.sources)

    def _load(self, name: str) -> torch.Tensor:
        import numpy as np
        import torch

        t = self.model.tensors[name]
        dtype, _ = _READABLE[t.ggml_type]
        count = 1
        for d in t.shape:
            count *= d
        values = np.fromfile(self.model.path, dtype=dtype, count=count, offset=t.offset).reshape(t.shape)
        if t.ggml_type == GGML_BF16:
            return torch.from_numpy(values.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(values)


def gguf_fingerprint(model: GGUFModel, spec: ModelSpec) -> str | None:
    """The weights fingerprint (fingerprint.py) of an F32/F16/BF16 GGUF, over the official names and layouts:
    equal to the .pth's when the GGUF holds the same weights. None when it is quantized. Cached by the file's
    path, size and mtime, like a checkpoint's."""
    from .files import cached_by_stamp
    from .fingerprint import VERSION, fingerprint

    sources = _sources(model)
    if any(model.tensors[theirs].ggml_type not in _READABLE for theirs, _ in sources.values()):
        return None

    def compute() -> dict[str, str]:
        return {"fingerprint": fingerprint(spec, _LazyWeights(model, sources))}

    return cached_by_stamp(model.path, f"{VERSION}-gguf", ("fingerprint",), compute)["fingerprint"]


# ---------------------------------------------------------------- checking a state against a GGUF


def check_gguf(state: State, gguf: str | os.PathLike, *, force: bool = False) -> list[str]:
    """Raise ModelMismatchError unless `state` fits the GGUF: its architecture and dims always (the blob carries
    no model identity, and llama.cpp checks only the row sizes), and the weights fingerprint where the GGUF's
    weights can be read. `force` lets another model's fingerprint through as a warning, never a shape mismatch.
    Returns what the check found, one line each: "same weights as ...", or what was not or could not be checked
    (a forced mismatch, a quantized GGUF, a state without identity)."""
    confirmed, caveats = _check(state, read_gguf(gguf), force)
    return confirmed + caveats


def _check(state: State, model: GGUFModel, force: bool) -> tuple[list[str], list[str]]:
    """([the identity confirmed], [what to warn about]), or ModelMismatchError."""
    spec = gguf_spec(model)
    broken = state.problems(spec, identity=False)
    if broken:
        raise ModelMismatchError(broken[0])
    quantized = model.quantized()
    if quantized:
        return [], [f"{model.path}: quantized ({', '.join(quantized)}): only the architecture and dims of "
                    f"{state.source} were checked, not the weights fingerprint"]
    recorded = state.metadata.get("base_model_fingerprint")
    if not recorded:
        return [], [f"{state.source} does not record its base model's weights fingerprint; only its architecture "
                    f"and dims were checked against {model.path}"]
    return _identity(state, model, gguf_fingerprint(model, spec), recorded, force)


def _identity(state: State, model: GGUFModel, found: str | None, recorded: str,
              force: bool) -> tuple[list[str], list[str]]:
    from .state import same_weights_note

    made_for = state.metadata.get("base_model_name") or "another model"
    if found == recorded:
        return [same_weights_note(state.source, made_for, Path(model.path).name, f"{found[:20]}...")], []
    problem = (f"{state.source}: made for {made_for} ({recorded[:20]}...), but {model.path} holds other weights "
               f"({str(found)[:20]}...)")
    if not force:
        raise ModelMismatchError(f"{problem} (pass {option('force', True)} to use it anyway)")
    return [], [problem]


# ---------------------------------------------------------------- the sequence-state blob


def _encode(state: State, arch: str, seq_id: int = 0) -> bytes:
    """The bytes llama_state_seq_get_data would give for a sequence holding `state` (docs 3.1): one cell at
    position 0, the token-shift rows [att C | ffn C] of every layer, then the wkv rows (v7: our [head, value, key]
    as it is; v6: [head, key, value], the transpose). Little-endian, as llama.cpp writes on x86 and ARM."""
    import torch

    L, C = state.n_layer, state.n_embd
    wkv = state.wkv.float().transpose(-1, -2) if arch == "v6" else state.wkv.float()
    shift = torch.zeros(L, 2, C) if state.shift is None else state.shift.float()
    parts = [_HEADER.pack(SEQ_MAGIC, seq_id, 1, 0, 0, 0, L)]
    for rows, width in ((shift, 8 * C), (wkv, 4 * C * state.head_size)):
        for layer in range(L):
            parts += [_ROW.pack(GGML_F32, width), rows[layer].contiguous().numpy().astype("<f4").tobytes()]
    return b"".join(parts)


def state_blob(state: State, gguf: str | os.PathLike, *, force: bool = False) -> bytes:
    """The blob `llama_state_seq_set_data` takes, for the model in `gguf` (checked first, as check_gguf does;
    what it could not check is a warning). Written from scratch: no llama.cpp call, no token spent."""
    state.raise_if_nonfinite()
    model = read_gguf(gguf)
    for line in _check(state, model, force)[1]:
        warn(line)
    return _encode(state, LLAMA_ARCHS[model.llama_arch])


def export_llama_cpp(state: State, path: str | os.PathLike, *, gguf: str | os.PathLike,
                     force: bool = False) -> Path:
    """Write `state` as a llama.cpp sequence state for `gguf` (state_blob), atomically. Load it with
    llama_state_seq_set_data, or with load_into_llama, which also does llama-cpp-python's bookkeeping."""
    return atomic_write_bytes(path, state_blob(state, gguf, force=force))


def parse_blob(data: bytes, *, arch: str = "v7", where: str = "llama.cpp sequence state") -> State:
    """A State from a sequence-state blob (llama_state_seq_get_data's, or ours): every header field checked, the
    length exact, one InvalidStateError line otherwise. `arch` says the wkv layout (v6: transposed)."""
    import numpy as np
    import torch

    from .state import State

    if arch not in ("v6", "v7"):
        raise InvalidOptionError(f"{option('arch', arch)}: llama.cpp states are 'v6' or 'v7'")
    dims, offsets = _blob_layout(data, where)
    L, C, N = dims
    rows = [np.frombuffer(data, "<f4", n, off).astype(np.float32) for off, n in offsets]
    shift = torch.from_numpy(np.stack(rows[:L]).reshape(L, 2, C))
    wkv = torch.from_numpy(np.stack(rows[L:]).reshape(L, C // N, N, N))
    wkv = wkv.transpose(-1, -2).contiguous() if arch == "v6" else wkv
    meta = {"arch": arch, "n_layer": L, "n_embd": C, "n_head": C // N, "head_size": N}
    state = State(wkv, shift, meta, source=where)
    problem = state.nonfinite_problem()
    if problem:
        raise InvalidStateError(problem)
    return state


def _blob_layout(data: bytes, where: str) -> tuple[tuple[int, int, int], list[tuple[int, int]]]:
    """(n_layer, n_embd, head size) and each row's (offset, float count) of a blob, checked field by field."""
    def fail(why: str) -> InvalidStateError:
        return InvalidStateError(f"{where}: not a llama.cpp RWKV sequence state ({why})")

    if len(data) < _HEADER.size:
        raise fail(f"{len(data)} bytes, shorter than the {_HEADER.size}-byte header")
    magic, seq_id, cells, pos, n_seq_id, s_trans, L = _HEADER.unpack_from(data)
    if magic != SEQ_MAGIC:
        raise fail(f"magic {magic:#x}, expected {SEQ_MAGIC:#x}")
    for name, found, want in (("cell count", cells, 1), ("n_seq_id", n_seq_id, 0), ("s_trans", s_trans, 0)):
        if found != want:
            raise fail(f"{name} {found}, expected {want}")
    if seq_id < 0 or pos < 0 or not 0 < L <= (len(data) - _HEADER.size) // (2 * _ROW.size):
        raise fail(f"seq_id {seq_id}, position {pos}, {L} layers in {len(data)} bytes")
    offset, offsets, widths = _HEADER.size, [], []
    for part in ("token-shift", "wkv"):
        for layer in range(L):
            if offset + _ROW.size > len(data):
                raise fail(f"ends inside the {part} header of layer {layer}")
            ggml_type, width = _ROW.unpack_from(data, offset)
            first = widths[-1] if layer else width
            if ggml_type != GGML_F32 or width == 0 or width % 4 or width != first:
                raise fail(f"{part} rows of layer {layer}: ggml type {ggml_type}, {width} bytes")
            offsets.append((offset + _ROW.size, width // 4))
            widths.append(width)
            offset += _ROW.size + width
            if offset > len(data):
                raise fail(f"ends inside the {part} row of layer {layer}")
    if offset != len(data):
        raise fail(f"{len(data) - offset} bytes after the last row")
    C, S = widths[0] // 8, widths[-1] // 4
    N = S // C if C and widths[0] % 8 == 0 and S % C == 0 else 0
    if not N or C % N:
        raise fail(f"token-shift rows of {widths[0]} bytes and wkv rows of {widths[-1]} are not 2 x n_embd and "
                   "n_embd x head size floats")
    return (L, C, N), offsets


# ---------------------------------------------------------------- a live llama_cpp.Llama


def load_into_llama(llm: Any, state: State, *, seq_id: int = 0, force: bool = False) -> None:
    """Start sequence `seq_id` of a llama_cpp.Llama from `state`, checked against the GGUF it loaded. For
    sequence 0 (the one Llama's eval/generate use) it also records one restored position (docs 3.4): continue
    with llm.eval(tokens) or llm.generate(tokens, reset=False); create_completion and chat reset the memory."""
    llama_cpp = _llama_cpp()
    import ctypes

    blob = state_blob(state, llm.model_path, force=force)
    buffer = (ctypes.c_uint8 * len(blob)).from_buffer_copy(blob)
    read = llama_cpp.llama_state_seq_set_data(llm.ctx, buffer, len(blob), seq_id)
    if read != len(blob):
        raise ConsumerError(f"{llm.model_path}: llama.cpp took {read} of the state's {len(blob)} bytes (its log says "
                            f"why); this module writes the format of {PIN}")
    if seq_id == 0:
        llm.n_tokens = 1
        llm.input_ids[0] = SENTINEL_TOKEN
        llm._requires_eval = True


def state_from_llama(llm: Any, *, seq_id: int = 0) -> State:
    """The state of sequence `seq_id` of a llama_cpp.Llama (after a prompt: a baked state), as a State in our
    layout, read through the strict parser."""
    llama_cpp = _llama_cpp()
    import ctypes

    arch = LLAMA_ARCHS.get(llm.metadata.get("general.architecture", ""))
    if arch is None:
        raise ModelMismatchError(f"{llm.model_path}: not an RWKV-6/7 model; no state of ours to read")
    size = llama_cpp.llama_state_seq_get_size(llm.ctx, seq_id)
    buffer = (ctypes.c_uint8 * size)()
    written = llama_cpp.llama_state_seq_get_data(llm.ctx, buffer, size, seq_id)
    return parse_blob(bytes(buffer)[:written], arch=arch, where=f"{llm.model_path} sequence {seq_id}")

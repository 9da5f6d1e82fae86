"""Reading BlinkDL's official RWKV checkpoints: safe loading, architecture detection, ModelSpec.

The official key layout in a `.pth` (torch.save zip, any float dtype) or a safetensors file with the same keys.

Only v5.2, v6 (x060) and v7 (x070) are state-tunable here. Everything else gets one clear line.
"""

from __future__ import annotations

import os
import pickle
import re
import struct
import zipfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from .errors import InvalidCheckpointError, StateHubError
from .files import sha1_file, sha256_file

ARCHITECTURES = ("v5.2", "v6", "v7")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_BLOCK_KEY = re.compile(r"^blocks\.([0-9]{1,9})\.")  # int() refuses longer numbers; no model has 10^9 layers
MAX_ZIP_ENTRIES = 1 << 16  # one per tensor (plus 6): a 70B checkpoint has a few thousand
MAX_ZIP_NAME = 1024
_SHA1 = re.compile(r"[0-9a-f]{40}")
_CHUNK = 1 << 22  # values per isfinite() slice: a 4 MB temporary, whatever the tensor's size


@dataclass(frozen=True)
class ModelSpec:
    """What a checkpoint is. Made once by the reader; everything that asks "does this fit" compares to it."""

    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    head_size: int
    n_ffn: int
    vocab_size: int
    dtype: str = "float32"
    path: str | None = None
    file_size: int | None = None
    has_time_state: bool = False
    n_params: int = 0
    _sha256: str | None = field(default=None, repr=False, compare=False)

    @property
    def name(self) -> str:
        """The file name without extension, or a description when the model came from memory."""
        if self.path:
            return model_name(self.path)
        return f"RWKV-{self.arch} L{self.n_layer} D{self.n_embd}"

    @cached_property
    def sha256(self) -> str | None:
        """The base-model identity: sha256 of the whole file (cached across runs by path, size, mtime)."""
        if self._sha256 is not None:
            return self._sha256
        return sha256_file(self.path) if self.path else None

    @cached_property
    def fingerprint(self) -> str | None:
        """The weights fingerprint (fingerprint.py): equal for every file form and dtype of the same weights.
        Computed from the file once (a few seconds for 0.1B), then cached by path, size and mtime."""
        if not self.path:
            return None
        from .fingerprint import file_fingerprint

        return file_fingerprint(self.path)

    @cached_property
    def sha1(self) -> str | None:
        """sha1 of the whole file, computed with the sha256: web-rwkv's converter records it of its source .pth."""
        return sha1_file(self.path) if self.path else None

    @cached_property
    def source_sha1(self) -> str | None:
        """The SHA-1 of the .pth this file was converted from, where a web-rwkv/Ai00 `.st` records it in its
        metadata as `pth_SHA` (only Ai00's old convert_ai00.py computed it: docs/model_forms.md 2.3)."""
        if not self.path or not Path(self.path).is_file() or file_kind(Path(self.path)) != "safetensors":
            return None
        import safetensors

        try:
            with safetensors.safe_open(os.fsdecode(self.path), framework="pt") as f:
                recorded = (f.metadata() or {}).get("pth_SHA")
        except Exception:  # noqa: BLE001 - a header the tensor reader accepted; no metadata is no claim
            return None
        return recorded.lower() if isinstance(recorded, str) and _SHA1.fullmatch(recorded.lower()) else None

    def dims(self) -> str:
        """'12 layers x 12 heads x 64': the shape a state must have, in words."""
        return f"{self.n_layer} layers x {self.n_head} heads x {self.head_size}"

    def state_shape(self) -> tuple[int, int, int, int]:
        return (self.n_layer, self.n_head, self.head_size, self.head_size)

    def to_dict(self) -> dict:
        d = {
            "arch": self.arch,
            "n_layer": self.n_layer,
            "n_embd": self.n_embd,
            "n_head": self.n_head,
            "head_size": self.head_size,
            "n_ffn": self.n_ffn,
            "vocab_size": self.vocab_size,
            "dtype": self.dtype,
            "n_params": self.n_params,
        }
        if self.path:
            d.update(file_name=Path(self.path).name, file_size=self.file_size, sha256=self.sha256)
        return d


def model_name(path: str | os.PathLike) -> str:
    """A model file's name without its extension (.pth, .safetensors, .st), as states and cards record it; a
    Hugging Face folder's `model.safetensors` is named by its folder (the repo's name)."""
    path = Path(path)
    name = path.parent.name if path.name == "model.safetensors" and path.parent.name else path.name
    for suffix in (".pth", ".safetensors", ".st"):
        name = name.removesuffix(suffix)
    return name


def load_state_dict(
    path: str | os.PathLike, error: type[StateHubError] = InvalidCheckpointError, where: str | None = None
) -> dict[str, torch.Tensor]:
    """torch.load with weights_only=True over a memory map: no code runs from the file, and nothing it claims
    (entry sizes, tensor sizes) costs more than the bytes really there. `error`: the class raised for a bad
    file (InvalidStateError when the file should be a state); `where`: the file's name in messages (default:
    its path)."""
    path = Path(path)
    where = where or str(path)
    if not path.is_file():
        raise error(f"{where}: no such file")
    if file_kind(path, error, where) == "safetensors":
        return _read_safetensors_weights(path, error, where)
    sd, size = load_untrusted(path, error, where)
    if not isinstance(sd, dict):
        raise error(f"{where}: expected a dict of tensors, found {type(sd).__name__}")
    if not sd:
        raise error(f"{where}: the file holds an empty dict, no tensors")
    bad_key = next((k for k in sd if not isinstance(k, str)), None)
    if bad_key is not None:
        raise error(f"{where}: expected tensor names, found the key {bad_key!r:.80}")
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise error(f"{where}: expected a dict of tensors, but {bad[0]!r:.80} is a {type(sd[bad[0]]).__name__}")
    claimed = sum(t.numel() * t.element_size() for t in sd.values())
    if claimed > size:  # views with stride 0, or many over one storage: copying them would cost that much
        raise error(f"{where}: its tensors claim {claimed:,} bytes, more than the file's {size:,} "
                    "(overlapping views): damaged or crafted")
    return sd


def file_kind(path: Path, error: type[StateHubError] = InvalidCheckpointError, where: str | None = None) -> str:
    """'safetensors' or 'torch' from the first bytes, whatever the extension says."""
    where = where or str(path)
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as e:
        raise error(f"{where}: cannot read ({e.strerror})") from None
    if len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < (100 << 20):
        return "safetensors"
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return "torch"
    raise error(f"{where}: neither safetensors nor a PyTorch file")


def _read_safetensors_weights(path: Path, error: type[StateHubError], where: str) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors. safetensors checks every offset in the header against the file's size, so
    the cost is bounded by the bytes there; names that are not UTF-8 are read through Python's open."""
    import safetensors
    import safetensors.torch

    try:
        try:
            name = os.fsdecode(path)
            name.encode("utf-8")
        except UnicodeEncodeError:
            return safetensors.torch.load(path.read_bytes())
        with safetensors.safe_open(name, framework="pt") as f:
            sd = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - safe_open is not a mapping
    except OSError as e:
        raise error(f"{where}: cannot read ({e.strerror or e})") from None
    except Exception as e:  # noqa: BLE001 - a malformed header is the file's fault
        raise error(f"{where}: not a valid safetensors file ({' '.join(str(e).split())[:200]})") from None
    if not sd:
        raise error(f"{where}: the file holds no tensors")
    return sd


def load_untrusted(path: Path, error: type[StateHubError] = InvalidCheckpointError,
                   where: str | None = None) -> tuple[object, int]:
    """Whatever a torch.save file holds, and the file's size: the zip is checked first (check_torch_zip) and
    torch.load runs with weights_only=True, so no code runs and nothing costs more than the bytes there."""
    where = where or str(path)
    size = check_torch_zip(path, error, where)
    try:
        return _torch_load(path), size
    except Exception as e:  # noqa: BLE001 - any failure to read is the file's fault
        raise error(f"{where}: not a readable PyTorch checkpoint ({_load_failure(e)})") from None


def _torch_load(path: Path) -> object:
    """torch.load over a memory map. torch's memory map takes the name as UTF-8, and torch.load hands any
    name ending in .safetensors to the safetensors reader whatever the content: such files are read through
    a Python file object instead (into memory: the cost is the file's size)."""
    try:
        str(path).encode("utf-8")
        mappable = not path.name.endswith(".safetensors")
    except UnicodeEncodeError:
        mappable = False
    if mappable:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    with open(path, "rb") as f:
        return torch.load(f, map_location="cpu", weights_only=True)


def check_torch_zip(path: Path, error: type[StateHubError] = InvalidCheckpointError, where: str | None = None) -> int:
    """Refuse, from the zip's central directory alone, what would make torch.load cost more than the file's size:
    compressed entries (torch.save stores them), sizes beyond the file, absurd counts or names; and the legacy
    pre-zip format, whose storage sizes are numbers inside the pickle. Returns the file's size."""
    where = where or str(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            legacy = f.read(1) == b"\x80"
        if not legacy:
            with zipfile.ZipFile(path) as z:
                entries = z.infolist()
    except OSError as e:
        raise error(f"{where}: cannot read ({e.strerror or e})") from None
    except Exception as e:  # noqa: BLE001 - BadZipFile and friends: the file's fault
        reason = " ".join(str(e).split())[:160]
        raise error(f"{where}: not a readable PyTorch checkpoint (not a torch.save zip: {reason})") from None
    if legacy:
        raise error(f"{where}: not a readable PyTorch checkpoint (refused: the legacy pre-zip torch.save "
                    "format, whose sizes cannot be checked before loading; re-save it with a current "
                    "torch.save)")
    problem = _zip_problem(entries, size)
    if problem:
        raise error(f"{where}: not a readable PyTorch checkpoint ({problem})")
    return size


def _zip_problem(entries: list[zipfile.ZipInfo], size: int) -> str | None:
    """What is wrong with a zip's directory for a torch.save file of `size` bytes, or None."""
    if len(entries) > MAX_ZIP_ENTRIES:
        return f"{len(entries)} entries, over {MAX_ZIP_ENTRIES}"
    for e in entries:
        if len(e.filename) > MAX_ZIP_NAME:
            return f"an entry name of {len(e.filename)} characters"
        if e.compress_type != zipfile.ZIP_STORED:
            return f"entry {e.filename!r} is compressed (torch.save stores entries as they are)"
    claimed = sum(e.file_size for e in entries)
    if claimed > size:
        return f"its entries claim {claimed:,} bytes, more than the file's {size:,}"
    return None


def _load_failure(e: Exception) -> str:
    """The useful part of torch.load's complaint, on one line without terminal colour codes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    found = re.search(r"unsupported (?:global:? )?GLOBAL (\S+?)(?: whose|\s|$)", text, re.IGNORECASE)
    if isinstance(e, pickle.UnpicklingError) and found:
        return f"refused: loading it would call {found.group(1)}, not build plain tensors, and could run code"
    reason = re.search(r"WeightsUnpickler error: ([^\n]+)", text)
    first = reason.group(1) if reason else (text.strip().splitlines() or [type(e).__name__])[0]
    if "Weights only load failed" in first:
        return "damaged, or holds objects that are not plain tensors"
    return f"damaged or not a tensor file: {first[:160]}"


def detect_arch(sd: dict[str, torch.Tensor], where: str = "checkpoint") -> str:
    """v5.2 / v6 / v7 from the keys and shapes, as the rwkv pip package and RWKV Runner decide it."""
    keys = sd.keys()
    if "emb.weight" not in keys or not any(_BLOCK_KEY.match(k) for k in keys):
        found = ", ".join(repr(k)[1:-1][:60] for k in sorted(keys)[:3])  # escaped: one line whatever the key
        raise InvalidCheckpointError(f"{where}: not an RWKV model checkpoint (no emb.weight / blocks.*; found {found})")
    if "blocks.0.att.r_k" in keys or "blocks.0.att.x_r" in keys:
        if any(".ffn.s_emb" in k for k in keys):
            raise InvalidCheckpointError(f"{where}: RWKV-7 DeepEmbed checkpoint; only plain x070 models are supported")
        return "v7"
    if "blocks.0.att.time_maa_x" in keys:
        return "v6"
    if "blocks.0.att.ln_x.weight" in keys:
        decay = sd.get("blocks.0.att.time_decay")
        if "blocks.0.att.gate.weight" in keys and decay is not None and decay.dim() == 2 and decay.shape[1] > 1:
            return "v5.2"
        version = "v5.1" if "blocks.0.att.gate.weight" in keys else "v5.0"
        raise InvalidCheckpointError(f"{where}: RWKV {version} checkpoint; supported are v5.2, v6 (x060) and v7 (x070)")
    if "blocks.0.att.time_mix_k" in keys:
        raise InvalidCheckpointError(f"{where}: RWKV-4 checkpoint (no wkv matrix state); supported are v5.2, v6 and v7")
    raise InvalidCheckpointError(f"{where}: unrecognised RWKV checkpoint layout; supported are v5.2, v6 and v7")


def _expected_shapes(arch: str, layer: int, C: int, H: int, N: int, F: int) -> dict[str, tuple]:
    """Key suffix -> shape (None = a free LoRA dimension) for one block. Vectors compare after squeeze."""
    a = f"blocks.{layer}.att."
    f = f"blocks.{layer}.ffn."
    shapes: dict[str, tuple] = {
        f"blocks.{layer}.ln1.weight": (C,), f"blocks.{layer}.ln1.bias": (C,),
        f"blocks.{layer}.ln2.weight": (C,), f"blocks.{layer}.ln2.bias": (C,),
        a + "key.weight": (C, C), a + "value.weight": (C, C), a + "receptance.weight": (C, C),
        a + "output.weight": (C, C), a + "ln_x.weight": (C,), a + "ln_x.bias": (C,),
        f + "key.weight": (F, C), f + "value.weight": (C, F),
    }
    if arch == "v5.2":
        shapes.update({
            a + "time_mix_k": (C,), a + "time_mix_v": (C,), a + "time_mix_r": (C,), a + "time_mix_g": (C,),
            a + "time_decay": (H, N), a + "time_faaaa": (H, N), a + "gate.weight": (C, C),
            f + "time_mix_k": (C,), f + "time_mix_r": (C,), f + "receptance.weight": (C, C),
        })
    elif arch == "v6":
        shapes.update({
            **{a + f"time_maa_{x}": (C,) for x in "xwkvrg"},
            a + "time_maa_w1": (C, None), a + "time_maa_w2": (5, None, C),
            a + "time_decay": (C,), a + "time_decay_w1": (C, None), a + "time_decay_w2": (None, C),
            a + "time_faaaa": (H, N), a + "gate.weight": (C, C),
            f + "time_maa_k": (C,), f + "time_maa_r": (C,), f + "receptance.weight": (C, C),
        })
    else:
        shapes.update({
            **{a + f"x_{x}": (C,) for x in "rwkvag"},
            a + "w0": (C,), a + "w1": (C, None), a + "w2": (None, C),
            a + "a0": (C,), a + "a1": (C, None), a + "a2": (None, C),
            a + "g1": (C, None), a + "g2": (None, C),
            a + "k_k": (C,), a + "k_a": (C,), a + "r_k": (H, N),
            f + "x_k": (C,),
        })
        if layer > 0:
            shapes.update({a + "v0": (C,), a + "v1": (C, None), a + "v2": (None, C)})
    return shapes


def expected_tensors(arch: str, n_layer: int, C: int, H: int, N: int, F: int, vocab: int) -> dict[str, tuple]:
    """Every tensor the model uses, by its official name, with its shape (None = a free LoRA dimension)."""
    expected = {"emb.weight": (vocab, C), "blocks.0.ln0.weight": (C,), "blocks.0.ln0.bias": (C,),
                "ln_out.weight": (C,), "ln_out.bias": (C,), "head.weight": (vocab, C)}
    for layer in range(n_layer):
        expected.update(_expected_shapes(arch, layer, C, H, N, F))
    return expected


def _shape_ok(actual: torch.Size, expected: tuple) -> bool:
    if len(expected) == 1:  # vectors are stored as [C] or [1, 1, C]: compare the squeezed shape
        return [d for d in actual if d != 1] == [d for d in expected if d != 1] or tuple(actual) == expected
    return len(actual) == len(expected) and all(e is None or a == e for a, e in zip(actual, expected, strict=True))


def _count_layers(sd: dict[str, torch.Tensor], where: str) -> int:
    """The number of blocks the file holds, which must be numbered 0..n-1: the count, never the largest number,
    sets the work (a lone blocks.3000000.junk would otherwise ask for 3M layers' worth of checks)."""
    found = {int(m.group(1)) for k in sd if (m := _BLOCK_KEY.match(k))}
    n_layer = len(found)
    if max(found) >= n_layer:
        missing = min(set(range(n_layer)) - found)
        raise InvalidCheckpointError(
            f"{where}: block {missing} is missing ({n_layer} blocks, the last numbered {max(found)})")
    return n_layer


def spec_from_state_dict(sd: dict[str, torch.Tensor], path: str | os.PathLike | None = None) -> ModelSpec:
    """Detect the architecture, derive the dimensions and check every tensor the model will use."""
    where = str(path) if path else "checkpoint"
    arch = detect_arch(sd, where)
    for key in ("emb.weight", "blocks.0.ffn.key.weight"):
        if key in sd and sd[key].dim() != 2:
            raise InvalidCheckpointError(f"{where}: {key} has shape {list(sd[key].shape)}, expected a matrix")
    vocab, C = sd["emb.weight"].shape
    n_layer = _count_layers(sd, where)
    head_key = "blocks.0.att.r_k" if arch == "v7" else "blocks.0.att.time_faaaa"
    if head_key not in sd or sd[head_key].dim() != 2:
        raise InvalidCheckpointError(f"{where}: {arch} checkpoint without a 2-D {head_key}, cannot tell the head size")
    H, N = sd[head_key].shape
    if H * N != C:
        raise InvalidCheckpointError(f"{where}: {H} heads x {N} does not match n_embd {C}")
    F = sd["blocks.0.ffn.key.weight"].shape[0] if "blocks.0.ffn.key.weight" in sd else 0
    for key, shape in expected_tensors(arch, n_layer, C, H, N, F, vocab).items():
        if key not in sd:
            raise InvalidCheckpointError(f"{where}: {arch} checkpoint is missing {key}")
        t = sd[key]
        if not _shape_ok(t.shape, shape):
            want = "x".join("?" if d is None else str(d) for d in shape)
            raise InvalidCheckpointError(f"{where}: {key} has shape {list(t.shape)}, expected {want}")
        if t.dtype not in FLOAT_DTYPES:
            raise InvalidCheckpointError(f"{where}: {key} has dtype {t.dtype}; expected float32, float16 or bfloat16")
    dtype = str(sd["emb.weight"].dtype).removeprefix("torch.")
    has_time_state = any(k.endswith(".att.time_state") for k in sd)
    n_params = sum(t.numel() for k, t in sd.items() if not k.endswith(".time_state"))
    size = Path(path).stat().st_size if path else None
    return ModelSpec(arch=arch, n_layer=n_layer, n_embd=C, n_head=H, head_size=N, n_ffn=F, vocab_size=vocab,
                     dtype=dtype, path=str(Path(path).resolve()) if path else None, file_size=size,
                     has_time_state=has_time_state, n_params=n_params)


def nonfinite_tensors(sd: dict[str, torch.Tensor]) -> list[str]:
    """The names of the tensors holding NaN or inf. Streamed: each tensor is checked a slice at a time over the
    memory map, so the temporaries are _CHUNK values, never a second copy of the model."""
    bad = []
    for name, t in sd.items():
        if not t.is_floating_point():
            continue
        flat = t.reshape(-1)  # a view: torch.save writes contiguous tensors (a strided one is copied once)
        if not all(torch.isfinite(flat[i : i + _CHUNK]).all() for i in range(0, flat.numel(), _CHUNK)):
            bad.append(name)
    return bad


def raise_if_nonfinite_weights(sd: dict[str, torch.Tensor], where: str | os.PathLike) -> None:
    """A model with NaN or inf in its weights cannot work with any state: say which tensors, once."""
    bad = nonfinite_tensors(sd)
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise InvalidCheckpointError(f"{where}: the weights hold NaN or inf ({bad[0]}{more}); the model cannot work")


def read_checkpoint(path: str | os.PathLike) -> tuple[ModelSpec, dict[str, torch.Tensor]]:
    """Load a checkpoint safely and return its spec with its (memory-mapped) tensors, under the official names
    and layouts whatever its form: a `.pth`, safetensors, a web-rwkv/Ai00 `.st`, a Hugging Face RWKV-7 (a file
    or its folder)."""
    from .model_forms import hf_weights_file, to_official

    path = Path(path)
    if path.is_dir():
        path = hf_weights_file(path)
    sd = to_official(load_state_dict(path), path)
    return spec_from_state_dict(sd, path), sd


def read_spec(path: str | os.PathLike) -> ModelSpec:
    """The spec alone (memory-mapped: cheap even for a 15 GB file)."""
    return read_checkpoint(path)[0]

"""Every on-disk form of a State: one function to write each, one reader that detects them by content.

    safetensors  our own file: fp32 [H, V, K] wkv (+ token shift) and full metadata ("native" is its old name)
    pth          RWKV Runner / RWKV-PEFT / RWKV-LM: exactly n_layer tensors [H, V, K], fp32/bf16/fp16
    ai00         Ai00 / web-rwkv: safetensors, F16 only, [H, K, V] (the transpose)
    merged       the base model .pth with time_state keys added, for plain `rwkv` pip use (v5.2, v6 only)

The names (FORMATS, FORMAT_DTYPES) import no torch: the CLI builds its choices from them at start-up.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path
from typing import TYPE_CHECKING

from ._version import __version__
from .errors import InvalidOptionError, InvalidStateError, option
from .files import atomic_torch_save, atomic_write

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from .state import State

FORMATS = ("safetensors", "pth", "ai00", "merged", "llama.cpp")
FORMAT_ALIASES = {"native": "safetensors"}  # older names, still accepted
# format -> the tensor dtypes it can hold, its default first
FORMAT_DTYPES = {"safetensors": ("fp32",), "pth": ("fp32", "bf16", "fp16"), "ai00": ("fp16",), "merged": ("fp32",),
                 "llama.cpp": ("fp32",)}
# formats that carry the token shift as well as the wkv state
FULL_STATE_FORMATS = ("safetensors", "llama.cpp")
# formats written for one base-model file, which the export needs: format -> the parameter that names it
FOR_ONE_MODEL = {"merged": "base_model", "llama.cpp": "gguf"}
DTYPES = FORMAT_DTYPES["pth"]
_TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
MAGIC = "rwkv-state-hub"
LAYOUTS = {"head,value,key": "safetensors", "head,key,value": "ai00"}  # our header's layout -> the format
# what to call in Python instead of a merged RWKV-7 file (pip_bridge.pip_state's signature)
PIP_V7_ADVICE = "rwkv_state_hub.pip_state(state, arch='v7')"

# layer numbers of at most 9 digits: int() of a longer one is refused by Python, and no model has 10^9 layers
_STATE_KEY = re.compile(r"^(?:.*\.)?blocks\.([0-9]{1,9})\.att\.time_state$")
_SHIFT_KEY = re.compile(r"^blocks\.([0-9]{1,9})\.(att|ffn)\.shift_state$")


def time_state_key(layer: int) -> str:
    return f"blocks.{layer}.att.time_state"


def canonical_format(fmt: str) -> str:
    """Our one name for a format (an older name is accepted): the same name in every command and function."""
    name = FORMAT_ALIASES.get(fmt, fmt)
    if name not in FORMATS:
        raise InvalidOptionError(f"{option('fmt', fmt)}: unknown format; choose one of {', '.join(FORMATS)}")
    return name


def torch_dtype(name: str) -> torch.dtype:
    """'bf16' -> torch.bfloat16."""
    import torch

    if name not in _TORCH_DTYPES:
        raise InvalidOptionError(f"{option('dtype', name)}: choose one of {', '.join(_TORCH_DTYPES)}")
    return getattr(torch, _TORCH_DTYPES[name])


def _dtype_for(fmt: str, dtype: str | None) -> str:
    """The dtype `fmt` is written in: `dtype` if the format can hold it (refused otherwise, never silently
    changed), else the format's default."""
    allowed = FORMAT_DTYPES[fmt]
    if dtype is None:
        return allowed[0]
    if dtype not in allowed:
        why = " (Ai00 rejects any other dtype)" if fmt == "ai00" else ""
        raise InvalidOptionError(f"{option('dtype', dtype)}: the {fmt} format holds {' or '.join(allowed)} only"
                                 f"{why}; {option('fmt', 'pth')} takes {', '.join(DTYPES)}")
    return dtype


# ---------------------------------------------------------------- writing


def save_file(tensors: dict[str, Tensor], filename: str | os.PathLike, metadata: dict[str, str]) -> None:
    """safetensors' save_file, but written through Python's open: safetensors' own takes only UTF-8 names, and a
    file name may hold any bytes. States are small, so the one in-memory copy costs little."""
    import safetensors.torch

    Path(filename).write_bytes(safetensors.torch.save(tensors, metadata=metadata))


def _st_metadata(state: State, layout: str) -> dict[str, str]:
    from .state import FORMAT_VERSION

    meta = {**state.metadata, "format_version": FORMAT_VERSION, "created_with": f"rwkv-state-hub {__version__}"}
    return {"format": MAGIC, "layout": layout, "metadata": json.dumps(meta, sort_keys=True)}


def save_native(state: State, path: str | os.PathLike) -> Path:
    """Our own file (format `safetensors`): everything a State has, nothing lost."""
    state.raise_if_nonfinite()
    tensors = {time_state_key(i): state.wkv[i].float().contiguous() for i in range(state.n_layer)}
    if state.shift is not None:
        for i in range(state.n_layer):
            tensors[f"blocks.{i}.att.shift_state"] = state.shift[i, 0].float().contiguous()
            tensors[f"blocks.{i}.ffn.shift_state"] = state.shift[i, 1].float().contiguous()
    meta = _st_metadata(state, "head,value,key")
    return atomic_write(path, lambda p: save_file(tensors, p, metadata=meta))


def _check_fp16_range(state: State, what: str) -> None:
    """fp16 tops out at 65504: a bigger value would be written as inf without a word."""
    import torch

    limit = torch.finfo(torch.float16).max
    peak = state.wkv.abs().amax(dim=(1, 2, 3))
    if (peak > limit).any():
        layer = int((peak > limit).nonzero()[0])
        raise InvalidOptionError(f"{state.source}: layer {layer} has values up to {float(peak[layer]):.4g}, beyond "
                                 f"float16's {limit:.0f}; {what} cannot hold them (use {option('fmt', 'pth')} with "
                                 f"{option('dtype', 'bf16')} or fp32)")


def save_pth(state: State, path: str | os.PathLike, dtype: str = "fp32") -> Path:
    """What Runner, PEFT and RWKV-LM read: a plain dict of exactly n_layer [H, V, K] tensors, in `dtype`
    (fp32, bf16 or fp16)."""
    to = torch_dtype(dtype)
    state.raise_if_nonfinite()
    if dtype == "fp16":
        _check_fp16_range(state, "a float16 pth")
    tensors = {time_state_key(i): state.wkv[i].to(to).contiguous() for i in range(state.n_layer)}
    return atomic_torch_save(path, tensors)


def save_ai00(state: State, path: str | os.PathLike) -> Path:
    """Ai00 / web-rwkv: F16 exactly, each head as [key, value]."""
    import torch

    state.raise_if_nonfinite()
    _check_fp16_range(state, "Ai00's F16 format")
    tensors = {time_state_key(i): state.wkv[i].transpose(1, 2).to(torch.float16).contiguous()
               for i in range(state.n_layer)}
    meta = _st_metadata(state, "head,key,value")
    return atomic_write(path, lambda p: save_file(tensors, p, metadata=meta))


def save_merged(state: State, path: str | os.PathLike, base_model: str | os.PathLike, force: bool = False) -> Path:
    """The base checkpoint with `blocks.{i}.att.time_state` added: the rwkv pip package (v5/v6) then
    starts every `forward(tokens, None)` from this state."""
    from .checkpoint import read_checkpoint

    state.raise_if_nonfinite()
    spec, weights = read_checkpoint(base_model)
    if spec.arch == "v7":
        raise InvalidOptionError(
            f"{base_model}: no merged export for RWKV-7: the rwkv pip package's v7 ignores time_state, so the "
            f"file would silently act as the base model; in Python, pass {PIP_V7_ADVICE} to its forward instead"
        )
    state.check(spec, force=force)
    merged = {k: v for k, v in weights.items() if not k.endswith(".att.time_state")}
    merged.update({time_state_key(i): state.wkv[i].float().contiguous() for i in range(state.n_layer)})
    return atomic_torch_save(path, merged)


def export_state(
    state: State,
    path: str | os.PathLike,
    fmt: str,
    dtype: str | None = None,
    base_model: str | os.PathLike | None = None,
    force: bool = False,
    gguf: str | os.PathLike | None = None,
) -> Path:
    """Write `state` in format `fmt` (FORMATS); `dtype` only where the format can hold it (FORMAT_DTYPES; None:
    the format's own). `merged` needs `base_model` (the .pth), `llama.cpp` the `gguf` it is for; both are
    checked against the state first. Returns the path written; `format_notes` says what the format leaves out."""
    fmt = canonical_format(fmt)
    dtype = _dtype_for(fmt, dtype)
    needed = FOR_ONE_MODEL.get(fmt)
    if needed and {"base_model": base_model, "gguf": gguf}[needed] is None:
        what = "base model .pth" if needed == "base_model" else "GGUF model file it is for"
        raise InvalidOptionError(f"the {fmt} format needs the {what}: pass {option(needed)}")
    if fmt == "llama.cpp":
        from .llama_cpp import export_llama_cpp

        return export_llama_cpp(state, path, gguf=gguf, force=force)
    if fmt == "safetensors":
        save_native(state, path)
    elif fmt == "pth":
        save_pth(state, path, dtype)
    elif fmt == "ai00":
        save_ai00(state, path)
    else:
        save_merged(state, path, base_model, force=force)
    return Path(path)


def format_notes(state: State, fmt: str) -> list[str]:
    """What `fmt` cannot carry of `state`, for the user: consumers then start that part from zero."""
    if state.shift is not None and canonical_format(fmt) not in FULL_STATE_FORMATS:
        return [f"the {canonical_format(fmt)} format carries only the wkv state; consumers start the token shift "
                "from zero"]
    return []


# ---------------------------------------------------------------- reading


def _kind(path: Path, where: str) -> str:
    """'safetensors' or 'torch' from the first bytes, whatever the extension says."""
    from .checkpoint import file_kind

    return file_kind(path, InvalidStateError, where)


def _stack_layers(where: str, tensors: dict[str, Tensor]) -> Tensor:
    """blocks.{i}.att.time_state for i = 0..L-1 -> [L, H, N, N] fp32, checked. L is the number of layers the
    file holds, never a number written in a key: blocks.30000000 alone is a missing layer 0, not 30M layers."""
    import torch

    by_layer = {int(m.group(1)): t for k, t in tensors.items() if (m := _STATE_KEY.match(k))}
    if not by_layer:
        raise InvalidStateError(f"{where}: no blocks.*.att.time_state tensors: not an RWKV state")
    L = len(by_layer)
    if max(by_layer) >= L:
        missing = min(set(range(L)) - set(by_layer))
        raise InvalidStateError(f"{where}: time_state of layer {missing} is missing ({L} layers, the last numbered "
                                f"{max(by_layer)})")
    first = by_layer[0]
    for i in range(L):
        t = by_layer[i]
        if t.dim() != 3 or t.shape[1] != t.shape[2] or t.shape != first.shape or t.numel() == 0:
            raise InvalidStateError(f"{where}: layer {i} time_state has shape {list(t.shape)}, expected [H, N, N] "
                                    f"(none 0) like layer 0 {list(first.shape)}")
        if not t.is_floating_point():
            raise InvalidStateError(f"{where}: layer {i} time_state has dtype {t.dtype}, expected a float type")
    return torch.stack([by_layer[i].float() for i in range(L)])


def _read_safetensors(path: Path, where: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and the header's metadata. The bytes are read here, not by safetensors' safe_open, which takes
    only UTF-8 names; the cost is the file's size, and safetensors checks every offset in the header against it."""
    import safetensors.torch

    try:
        data = path.read_bytes()
    except OSError as e:
        raise InvalidStateError(f"{where}: cannot read ({e.strerror})") from None
    try:
        tensors = safetensors.torch.load(data)
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + n])  # already parsed and checked once by safetensors
    except Exception as e:  # noqa: BLE001 - a malformed header is the file's fault
        raise InvalidStateError(f"{where}: not a valid safetensors file ({' '.join(str(e).split())[:200]})") from None
    return tensors, header.get("__metadata__") or {}


def detect_format(path: str | os.PathLike) -> str:
    """The format of a state file, from its content: safetensors, ai00, pth or merged."""
    return _load(Path(path))[1]


def load_state(path: str | os.PathLike, name: str | None = None) -> State:
    """Read a state in any supported format (safetensors, pth, ai00, merged, BlinkDL/PEFT .pth, bf16 or not).
    `name`: what messages and `State.source` call the file (an upload's own name, a Hub repo/file), default its
    path."""
    return _load(Path(path), name)[0]


def _load(path: Path, name: str | None = None) -> tuple[State, str]:
    from .checkpoint import load_state_dict, spec_from_state_dict
    from .state import State, parse_metadata

    where = name or str(path)
    if not path.is_file():
        raise InvalidStateError(f"{where}: no such file")
    if _kind(path, where) == "safetensors":
        tensors, header = _read_safetensors(path, where)
        meta = parse_metadata(header.get("metadata", "{}"), where) if header.get("format") == MAGIC else {}
        # Ai00 reads [H, K, V] and only F16; our ai00 files say so. A foreign F16 file is Ai00's.
        layout = header.get("layout") or ("head,key,value" if _all_f16(tensors) else "head,value,key")
        if layout not in LAYOUTS:
            raise InvalidStateError(f"{where}: unknown layout {layout[:40]!r} in the header; expected "
                                    f"{' or '.join(map(repr, LAYOUTS))}")
        wkv = _stack_layers(where, tensors)
        if LAYOUTS[layout] == "ai00":
            wkv = wkv.transpose(2, 3).contiguous()
        shift = _read_shift(where, tensors, wkv.shape[0])
        return State(wkv, shift, meta, source=where), LAYOUTS[layout]
    sd = load_state_dict(path, InvalidStateError, where)
    wkv = _stack_layers(where, sd)
    if "emb.weight" in sd:  # a model with a state inside
        spec = spec_from_state_dict(sd, path)
        meta = {"arch": spec.arch, "n_layer": spec.n_layer, "n_embd": spec.n_embd, "n_head": spec.n_head,
                "head_size": spec.head_size, "merged_into": path.name}
        return State(wkv, None, meta, source=where), "merged"
    extra = [k for k in sd if not _STATE_KEY.match(k)]
    if extra:
        raise InvalidStateError(f"{where}: unexpected tensor {extra[0][:80]!r} in a state file")
    return State(wkv, None, {}, source=where), "pth"


def _all_f16(tensors: dict[str, Tensor]) -> bool:
    import torch

    states = [t for k, t in tensors.items() if _STATE_KEY.match(k)]
    return bool(states) and all(t.dtype == torch.float16 for t in states)


def _read_shift(where: str, tensors: dict[str, Tensor], n_layer: int) -> Tensor | None:
    import torch

    found = {(int(m.group(1)), m.group(2)): t for k, t in tensors.items() if (m := _SHIFT_KEY.match(k))}
    if not found:
        return None
    if len(found) != 2 * n_layer:
        raise InvalidStateError(f"{where}: token-shift state for {len(found)} of {2 * n_layer} (layer, mixer) pairs")
    rows = []
    for i in range(n_layer):
        pair = [found.get((i, "att")), found.get((i, "ffn"))]
        if any(t is None or t.dim() != 1 for t in pair) or pair[0].shape != pair[1].shape:
            raise InvalidStateError(f"{where}: token-shift state of layer {i} is missing or not a vector")
        rows.append(torch.stack([t.float() for t in pair]))
    return torch.stack(rows)

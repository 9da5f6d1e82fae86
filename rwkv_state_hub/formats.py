"""Every on-disk form of a State: one function to write each, one reader that detects them by content.

    safetensors  the native file: fp32 [H, V, K] wkv (+ token shift) and full metadata
    pth          RWKV Runner / RWKV-PEFT / RWKV-LM: exactly n_layer tensors [H, V, K], fp32/bf16/fp16
    ai00         Ai00 / web-rwkv: safetensors, F16 only, [H, K, V] (the transpose)
    merged       the base model .pth with time_state keys added, for plain `rwkv` pip use (v5.2, v6 only)
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import safetensors.torch
import torch
from torch import Tensor

from . import __version__
from .checkpoint import load_state_dict, read_checkpoint, spec_from_state_dict
from .errors import StateHubError
from .files import atomic_torch_save, atomic_write
from .state import FORMAT_VERSION, State, parse_metadata

FORMATS = ("safetensors", "pth", "ai00", "merged")
PTH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MAGIC = "rwkv-state-hub"
LAYOUTS = {"head,value,key": "safetensors", "head,key,value": "ai00"}  # our header's layout -> the format

# layer numbers of at most 9 digits: int() of a longer one is refused by Python, and no model has 10^9 layers
_STATE_KEY = re.compile(r"^(?:.*\.)?blocks\.([0-9]{1,9})\.att\.time_state$")
_SHIFT_KEY = re.compile(r"^blocks\.([0-9]{1,9})\.(att|ffn)\.shift_state$")


def time_state_key(layer: int) -> str:
    return f"blocks.{layer}.att.time_state"


# ---------------------------------------------------------------- writing


def save_file(tensors: dict[str, Tensor], filename: str | os.PathLike, metadata: dict[str, str]) -> None:
    """safetensors' save_file, but written through Python's open: safetensors' own takes only UTF-8 names, and a
    file name may hold any bytes. States are small, so the one in-memory copy costs little."""
    Path(filename).write_bytes(safetensors.torch.save(tensors, metadata=metadata))


def _st_metadata(state: State, layout: str) -> dict[str, str]:
    meta = {**state.metadata, "format_version": FORMAT_VERSION, "created_with": f"rwkv-state-hub {__version__}"}
    return {"format": MAGIC, "layout": layout, "metadata": json.dumps(meta, sort_keys=True)}


def save_native(state: State, path: str | os.PathLike) -> Path:
    """The project's own file: everything a State has, nothing lost."""
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
    limit = torch.finfo(torch.float16).max
    peak = state.wkv.abs().amax(dim=(1, 2, 3))
    if (peak > limit).any():
        layer = int((peak > limit).nonzero()[0])
        raise StateHubError(f"{state.source}: layer {layer} has values up to {float(peak[layer]):.4g}, beyond "
                            f"float16's {limit:.0f}; {what} cannot hold them (use pth with --dtype bf16 or fp32)")


def save_pth(state: State, path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Path:
    """What Runner, PEFT and RWKV-LM read: a plain dict of exactly n_layer [H, V, K] tensors."""
    state.raise_if_nonfinite()
    if dtype == torch.float16:
        _check_fp16_range(state, "a float16 pth")
    tensors = {time_state_key(i): state.wkv[i].to(dtype).contiguous() for i in range(state.n_layer)}
    return atomic_torch_save(path, tensors)


def save_ai00(state: State, path: str | os.PathLike) -> Path:
    """Ai00 / web-rwkv: F16 exactly, each head as [key, value]."""
    state.raise_if_nonfinite()
    _check_fp16_range(state, "Ai00's F16 format")
    tensors = {time_state_key(i): state.wkv[i].transpose(1, 2).to(torch.float16).contiguous()
               for i in range(state.n_layer)}
    meta = _st_metadata(state, "head,key,value")
    return atomic_write(path, lambda p: save_file(tensors, p, metadata=meta))


def save_merged(state: State, path: str | os.PathLike, base_model: str | os.PathLike, force: bool = False) -> Path:
    """The base checkpoint with `blocks.{i}.att.time_state` added: the rwkv pip package (v5/v6) then
    starts every `forward(tokens, None)` from this state."""
    state.raise_if_nonfinite()
    spec, weights = read_checkpoint(base_model)
    if spec.arch == "v7":
        raise StateHubError(
            f"{base_model}: no merged export for RWKV-7: the rwkv pip package's v7 ignores time_state, so the "
            "file would silently act as the base model; use rwkv_state_hub.pip_state(state, model) instead"
        )
    state.check(spec, force=force)
    merged = {k: v for k, v in weights.items() if not k.endswith(".att.time_state")}
    merged.update({time_state_key(i): state.wkv[i].float().contiguous() for i in range(state.n_layer)})
    return atomic_torch_save(path, merged)


def export_state(
    state: State,
    path: str | os.PathLike,
    fmt: str,
    dtype: str = "fp32",
    base_model: str | os.PathLike | None = None,
    force: bool = False,
) -> list[str]:
    """Write `state` in format `fmt`; returns notes for the user (what the format cannot carry)."""
    notes = []
    if state.shift is not None and fmt != "safetensors":
        notes.append(f"the {fmt} format carries only the wkv state; consumers start the token shift from zero")
    if fmt == "safetensors":
        save_native(state, path)
    elif fmt == "pth":
        if dtype not in PTH_DTYPES:
            raise StateHubError(f"--dtype {dtype}: choose one of {', '.join(PTH_DTYPES)}")
        save_pth(state, path, PTH_DTYPES[dtype])
    elif fmt == "ai00":
        save_ai00(state, path)
    elif fmt == "merged":
        if base_model is None:
            raise StateHubError("the merged format needs the base model (--model BASE.pth)")
        save_merged(state, path, base_model, force=force)
    else:
        raise StateHubError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return notes


# ---------------------------------------------------------------- reading


def _kind(path: Path) -> str:
    """'safetensors' or 'torch' from the first bytes, whatever the extension says."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as e:
        raise StateHubError(f"{path}: cannot read ({e.strerror})") from None
    if len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < (100 << 20):
        return "safetensors"
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return "torch"
    raise StateHubError(f"{path}: neither safetensors nor a PyTorch file")


def _stack_layers(path: Path, tensors: dict[str, Tensor]) -> Tensor:
    """blocks.{i}.att.time_state for i = 0..L-1 -> [L, H, N, N] fp32, checked. L is the number of layers the
    file holds, never a number written in a key: blocks.30000000 alone is a missing layer 0, not 30M layers."""
    by_layer = {int(m.group(1)): t for k, t in tensors.items() if (m := _STATE_KEY.match(k))}
    if not by_layer:
        raise StateHubError(f"{path}: no blocks.*.att.time_state tensors: not an RWKV state")
    L = len(by_layer)
    if max(by_layer) >= L:
        missing = min(set(range(L)) - set(by_layer))
        raise StateHubError(f"{path}: time_state of layer {missing} is missing ({L} layers, the last numbered "
                            f"{max(by_layer)})")
    first = by_layer[0]
    for i in range(L):
        t = by_layer[i]
        if t.dim() != 3 or t.shape[1] != t.shape[2] or t.shape != first.shape or t.numel() == 0:
            raise StateHubError(f"{path}: layer {i} time_state has shape {list(t.shape)}, expected [H, N, N] "
                                f"(none 0) like layer 0 {list(first.shape)}")
        if not t.is_floating_point():
            raise StateHubError(f"{path}: layer {i} time_state has dtype {t.dtype}, expected a float type")
    return torch.stack([by_layer[i].float() for i in range(L)])


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and the header's metadata. The bytes are read here, not by safetensors' safe_open, which takes
    only UTF-8 names; the cost is the file's size, and safetensors checks every offset in the header against it."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise StateHubError(f"{path}: cannot read ({e.strerror})") from None
    try:
        tensors = safetensors.torch.load(data)
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + n])  # already parsed and checked once by safetensors
    except Exception as e:  # noqa: BLE001 - a malformed header is the file's fault
        raise StateHubError(f"{path}: not a valid safetensors file ({' '.join(str(e).split())[:200]})") from None
    return tensors, header.get("__metadata__") or {}


def detect_format(path: str | os.PathLike) -> str:
    """The format of a state file, from its content: safetensors, ai00, pth or merged."""
    return _load(Path(path))[1]


def load_state(path: str | os.PathLike) -> State:
    """Read a state in any supported format (native, pth, ai00, merged, BlinkDL/PEFT .pth, bf16 or not)."""
    return _load(Path(path))[0]


def _load(path: Path) -> tuple[State, str]:
    if not path.is_file():
        raise StateHubError(f"{path}: no such file")
    if _kind(path) == "safetensors":
        tensors, header = _read_safetensors(path)
        meta = parse_metadata(header.get("metadata", "{}"), str(path)) if header.get("format") == MAGIC else {}
        # Ai00 reads [H, K, V] and only F16; our ai00 files say so. A foreign F16 file is Ai00's.
        layout = header.get("layout") or ("head,key,value" if _all_f16(tensors) else "head,value,key")
        if layout not in LAYOUTS:
            raise StateHubError(f"{path}: unknown layout {layout[:40]!r} in the header; expected "
                                f"{' or '.join(map(repr, LAYOUTS))}")
        wkv = _stack_layers(path, tensors)
        if LAYOUTS[layout] == "ai00":
            wkv = wkv.transpose(2, 3).contiguous()
        shift = _read_shift(path, tensors, wkv.shape[0])
        return State(wkv, shift, meta, source=str(path)), LAYOUTS[layout]
    sd = load_state_dict(path)
    wkv = _stack_layers(path, sd)
    if "emb.weight" in sd:  # a model with a state inside
        spec = spec_from_state_dict(sd, path)
        meta = {"arch": spec.arch, "n_layer": spec.n_layer, "n_embd": spec.n_embd, "n_head": spec.n_head,
                "head_size": spec.head_size, "merged_into": path.name}
        return State(wkv, None, meta, source=str(path)), "merged"
    extra = [k for k in sd if not _STATE_KEY.match(k)]
    if extra:
        raise StateHubError(f"{path}: unexpected tensor {extra[0][:80]!r} in a state file")
    return State(wkv, None, {}, source=str(path)), "pth"


def _all_f16(tensors: dict[str, Tensor]) -> bool:
    states = [t for k, t in tensors.items() if _STATE_KEY.match(k)]
    return bool(states) and all(t.dtype == torch.float16 for t in states)


def _read_shift(path: Path, tensors: dict[str, Tensor], n_layer: int) -> Tensor | None:
    found = {(int(m.group(1)), m.group(2)): t for k, t in tensors.items() if (m := _SHIFT_KEY.match(k))}
    if not found:
        return None
    if len(found) != 2 * n_layer:
        raise StateHubError(f"{path}: token-shift state for {len(found)} of {2 * n_layer} (layer, mixer) pairs")
    rows = []
    for i in range(n_layer):
        pair = [found.get((i, "att")), found.get((i, "ffn"))]
        if any(t is None or t.dim() != 1 for t in pair) or pair[0].shape != pair[1].shape:
            raise StateHubError(f"{path}: token-shift state of layer {i} is missing or not a vector")
        rows.append(torch.stack([t.float() for t in pair]))
    return torch.stack(rows)

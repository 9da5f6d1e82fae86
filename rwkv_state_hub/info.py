"""`describe(path)`: what a file is (a checkpoint or a state, in which format) and who can load it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .checkpoint import ModelSpec, load_state_dict, nonfinite_tensors, spec_from_state_dict
from .errors import FileAccessError, option
from .files import sha256_file
from .formats import _kind, _load
from .model_forms import to_official

TOKENIZERS = {65536: "world (rwkv_vocab_v20230424)", 256: "bytes"}


def checkpoint_consumers(spec: ModelSpec) -> list[str]:
    pip = "rwkv pip package (set RWKV_V7_ON=1 before importing rwkv)" if spec.arch == "v7" else "rwkv pip package"
    return [pip, "RWKV Runner", "RWKV-PEFT / RWKV-LM", "rwkv-state-hub"]


def state_consumers(fmt: str, arch: str | None) -> list[str]:
    if fmt == "pth":
        pip = "rwkv pip package via rwkv_state_hub.pip_state (or a merged export, v5.2/v6)"
        return ["RWKV Runner (state-models/)", "RWKV-PEFT merge_state.py", pip, "rwkv-state-hub"]
    if fmt == "ai00":
        return ["Ai00 server / web-rwkv ([[state]] in Config.toml)", "rwkv-state-hub"]
    if fmt == "merged":
        return ["rwkv pip package (forward(tokens, None) starts from the state; v5.2/v6 only)", "rwkv-state-hub"]
    return [f"rwkv-state-hub (export it: {option('fmt', 'pth')} for Runner/PEFT/pip, {option('fmt', 'ai00')} for Ai00)"]


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """A dict describing a checkpoint or state file, for `rwkv-state info`."""
    path = Path(path)
    if not path.is_file():
        raise FileAccessError(f"{path}: no such file")
    out: dict[str, Any] = {"file": str(path), "size": path.stat().st_size}
    _kind(path, str(path))  # neither safetensors nor torch: one line, before anything is read
    sd = to_official(load_state_dict(path), path)
    if "emb.weight" in sd:  # a model (.pth or safetensors with the official keys); else a state
        spec = spec_from_state_dict(sd, path)
        out.update(kind="checkpoint", **spec.to_dict())
        out["tokenizer"] = TOKENIZERS.get(spec.vocab_size, f"unknown ({spec.vocab_size} tokens)")
        out["has_time_state"] = spec.has_time_state
        out["nonfinite_tensors"] = nonfinite_tensors(sd)  # NaN or inf weights: the model cannot work
        out["consumers"] = checkpoint_consumers(spec)
        return out
    state, fmt = _load(path)
    out.update(
        kind="state",
        format=fmt,
        n_layer=state.n_layer,
        n_head=state.n_head,
        head_size=state.head_size,
        n_embd=state.n_embd,
        token_shift=state.shift is not None,
        sha256=sha256_file(path),
        wkv_norm=round(float(state.wkv.norm()), 4),
        nonfinite_tensors=nonfinite_tensors(state.tensors()),
        metadata=state.metadata,
        consumers=state_consumers(fmt, state.arch),
    )
    return out

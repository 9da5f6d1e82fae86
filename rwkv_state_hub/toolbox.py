"""Operations on states that need no training: bake one from a prompt, mix several, compare two."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch

from .checkpoint import nonfinite_tensors
from .errors import InvalidOptionError, InvalidStateError, ModelMismatchError, option, warn
from .files import sha256_file
from .model import RWKV
from .state import State
from .tokenizer import Tokenizer


@torch.no_grad()
def bake(model: RWKV, tokenizer: Tokenizer, prompt: str) -> State:
    """Run `prompt` from the zero state and keep the whole recurrent state it leaves behind, token shift
    included: continuing from it equals continuing after the prompt. The cheapest state there is, and
    the baseline a trained state must beat."""
    tokens = tokenizer.encode(prompt)
    if not tokens:
        raise InvalidOptionError("the prompt is empty: nothing to bake")
    _, final = model(torch.tensor([tokens], device=model.emb.weight.device))
    return State.from_recurrent(
        final, model.spec, full_state=True, tokenizer=tokenizer.name,
        training={"method": "baked", "prompt_sha256": hashlib.sha256(prompt.encode()).hexdigest(),
                  "prompt_tokens": len(tokens), "prompt_chars": len(prompt)},
    )


def mix(states: list[State], weights: list[float]) -> State:
    """sum_i weights[i] * states[i]: for states of one base model only (by dims and by sha256). A state without a
    token shift counts as a zero one; a warning says so, as it changes what the mix's token shift means."""
    if len(states) < 2 or len(states) != len(weights):
        raise InvalidOptionError(f"mix needs two or more states and one of {option('weights')} each, got "
                                 f"{len(states)} states and {len(weights)} weights")
    if not all(math.isfinite(w) for w in weights):
        raise InvalidOptionError(f"{option('weights', weights)}: every weight must be a finite number")
    for s in states:
        problem = s.nonfinite_problem()
        if problem:
            raise InvalidStateError(f"{problem}: cannot mix it")
    _check_same_model(states)
    wkv = sum(w * s.wkv.float() for w, s in zip(weights, states, strict=True))
    shift = None
    if any(s.shift is not None for s in states):
        shift = sum(w * (s.shift if s.shift is not None else torch.zeros(s.n_layer, 2, s.n_embd))
                    for w, s in zip(weights, states, strict=True))
    base = next((s for s in states if s.base_model_sha256), states[0])
    identity = {k: v for k, v in base.metadata.items() if k.startswith("base_model") or k in
                ("arch", "n_layer", "n_embd", "n_head", "head_size", "tokenizer")}
    parents = [_parent(s, w) for s, w in zip(states, weights, strict=True)]
    mixed = State(wkv, shift, {**identity, "training": {"method": "mixed", "parents": parents}}, source="mix")
    overflowed = nonfinite_tensors(mixed.tensors())
    if overflowed:
        raise InvalidOptionError(f"{option('weights', weights)}: the {overflowed[0]} state overflows float32 (NaN "
                                 "or inf); use smaller weights")
    if shift is not None and any(s.shift is None for s in states):
        warn(_zero_shift_warning(states, weights))
    return mixed


def _check_same_model(states: list[State]) -> None:
    first = states[0]
    for s in states[1:]:
        if s.wkv.shape != first.wkv.shape:
            raise ModelMismatchError(f"{s.source}: {s.dims()}, but {first.source} has {first.dims()}: not the same "
                                     "model")
        a, b = first.base_model_sha256, s.base_model_sha256
        if a and b and a != b:
            raise ModelMismatchError(f"{s.source}: made for base model sha256 {b[:12]}, but {first.source} for "
                                     f"{a[:12]}: states of different base models cannot be mixed")
        if s.arch and first.arch and s.arch != first.arch:
            raise ModelMismatchError(f"{s.source}: an RWKV {s.arch} state, but {first.source} is {first.arch}")


def _zero_shift_warning(states: list[State], weights: list[float]) -> str:
    missing = [Path(s.source).name for s in states if s.shift is None]
    kept = " + ".join(f"{w:g} x {Path(s.source).name}'s" for s, w in zip(states, weights, strict=True)
                      if s.shift is not None)
    verb = "has" if len(missing) == 1 else "have"
    return (f"{', '.join(missing)} {verb} no token-shift state (wkv only): the mix's token shift is {kept} alone, "
            "as if the missing one were zero")


def _parent(state: State, weight: float) -> dict:
    """How a mix records one of its states: file name, weight, the file's sha256 (when it came from a file)."""
    source = Path(state.source)
    return {"file": source.name, "weight": weight, "sha256": sha256_file(source) if source.is_file() else None,
            "method": (state.metadata.get("training") or {}).get("method")}


def diff(a: State, b: State) -> torch.Tensor:
    """Per layer and head: ||a - b|| / max(||a||, ||b||) over the head's N x N matrix, [L, H], in [0, 2]."""
    if a.wkv.shape != b.wkv.shape:
        raise ModelMismatchError(f"{b.source}: {b.dims()}, but {a.source} has {a.dims()}: nothing to compare")
    num = (a.wkv - b.wkv).flatten(2).norm(dim=-1)
    den = torch.maximum(a.wkv.flatten(2).norm(dim=-1), b.wkv.flatten(2).norm(dim=-1)).clamp_min(1e-12)
    return num / den


def diff_table(d: torch.Tensor) -> str:
    """The diff as text: one row a layer, one column a head (mean and max at the end of each row)."""
    L, H = d.shape
    show = min(H, 16)
    head = "layer " + " ".join(f"h{h:<4}" for h in range(show)) + ("  ..." if H > show else "") + "   mean    max"
    rows = [head]
    for i in range(L):
        cells = " ".join(f"{float(v):5.3f}" for v in d[i, :show])
        more = "  ..." if H > show else ""
        rows.append(f"{i:>5} {cells}{more}  {float(d[i].mean()):5.3f}  {float(d[i].max()):5.3f}")
    return "\n".join(rows)

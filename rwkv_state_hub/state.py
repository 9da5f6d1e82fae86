"""`State`: a learned (or baked) initial recurrent state, with the identity of the model it belongs to.

One layout inside the project: the wkv tensors [L, H, N, N] fp32 as [head, value, key], the layout of
the de-facto `.pth` files. Transposes happen only at the edges that need them (formats.py, pip_bridge.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .checkpoint import ModelSpec
from .errors import StateHubError

FORMAT_VERSION = 1


@dataclass
class State:
    """wkv [L, H, N, N] fp32 ([head, value, key]); shift [L, 2, C] fp32 (time-mix and channel-mix
    token-shift vectors) or None when only the wkv part is learned; metadata about where it came from."""

    wkv: Tensor
    shift: Tensor | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    source: str = "state"  # the file it was read from, for messages

    @property
    def n_layer(self) -> int:
        return self.wkv.shape[0]

    @property
    def n_head(self) -> int:
        return self.wkv.shape[1]

    @property
    def head_size(self) -> int:
        return self.wkv.shape[2]

    @property
    def n_embd(self) -> int:
        return self.n_head * self.head_size

    @property
    def arch(self) -> str | None:
        return self.metadata.get("arch")

    @property
    def base_model_sha256(self) -> str | None:
        return self.metadata.get("base_model_sha256")

    def dims(self) -> str:
        return f"{self.n_layer} layers x {self.n_head} heads x {self.head_size}"

    @classmethod
    def zeros(cls, spec: ModelSpec, full_state: bool = False) -> State:
        shift = torch.zeros(spec.n_layer, 2, spec.n_embd) if full_state else None
        return cls(torch.zeros(spec.state_shape()), shift, for_model(spec))

    def with_model(self, spec: ModelSpec) -> State:
        """The same tensors, labelled with the identity of `spec` (its architecture, dims and sha256)."""
        return State(self.wkv, self.shift, {**self.metadata, **for_model(spec)}, self.source)

    def check(self, spec: ModelSpec, force: bool = False) -> list[str]:
        """Raise StateHubError unless this state fits `spec`.

        `force` waives only a base-model sha256 mismatch (a state may be reused on a fine-tune of its
        model, at the user's risk) and returns it; a state of the wrong shape, dtype or architecture,
        or with non-finite values, is always refused: it cannot work.
        """
        broken = self.fit_problems(spec)
        if broken:
            raise StateHubError(broken[0])
        identity = self.identity_problem(spec)
        if identity and not force:
            raise StateHubError(f"{identity} (use --force to use it anyway)")
        return [identity] if identity else []

    def problems(self, spec: ModelSpec) -> list[str]:
        """Every way this state does not fit `spec`, each a one-line message; [] when it fits."""
        identity = self.identity_problem(spec)
        return self.fit_problems(spec) + ([identity] if identity else [])

    def fit_problems(self, spec: ModelSpec) -> list[str]:
        """What makes this state unusable on `spec`: shape, architecture, dtype, non-finite values."""
        out = []
        if self.wkv.dim() != 4 or self.wkv.shape[2] != self.wkv.shape[3]:
            return [f"{self.source}: wkv state has shape {list(self.wkv.shape)}, expected [layers, heads, N, N]"]
        if (self.n_layer, self.n_head, self.head_size) != (spec.n_layer, spec.n_head, spec.head_size):
            out.append(f"{self.source}: {self.dims()}, but {spec.name} has {spec.dims()}")
        if self.arch and self.arch != spec.arch:
            out.append(f"{self.source}: made for an RWKV {self.arch} model, but {spec.name} is {spec.arch}")
        if self.shift is not None and tuple(self.shift.shape) != (spec.n_layer, 2, spec.n_embd):
            out.append(f"{self.source}: token-shift state {list(self.shift.shape)}, "
                       f"but {spec.name} needs [{spec.n_layer}, 2, {spec.n_embd}]")
        for name, t in (("wkv", self.wkv), ("token-shift", self.shift)):
            if t is not None and t.dtype != torch.float32:
                out.append(f"{self.source}: {name} state is {t.dtype}, expected float32")
            if t is not None and not torch.isfinite(t).all():
                out.append(f"{self.source}: {name} state has non-finite values (NaN or inf)")
        return out

    def identity_problem(self, spec: ModelSpec) -> str | None:
        """A message if this state records another base model (by sha256) than `spec`'s file."""
        want = self.base_model_sha256
        if want and spec.sha256 and want != spec.sha256:
            made_for = self.metadata.get("base_model_name") or "another model"
            return (f"{self.source}: made for {made_for} (sha256 {want[:12]}), "
                    f"but {spec.name} has sha256 {spec.sha256[:12]}")
        return None

    def to_recurrent(self, batch: int = 1, device: str | torch.device = "cpu"):
        """The model's runtime state for a batch, every sequence starting from this state."""
        from .model import RecurrentState

        L, C = self.n_layer, self.n_embd
        shift = self.shift if self.shift is not None else torch.zeros(L, 2, C)
        rs = RecurrentState(self.wkv[None], shift[None, :, 0], shift[None, :, 1])
        rs = RecurrentState(*(t.to(device=device, dtype=torch.float32) for t in (rs.wkv, rs.att_x, rs.ffn_x)))
        return rs.expand(batch)

    def learnable(self, spec: ModelSpec, full_state: bool | None = None):
        """A LearnedState initialised from this state, to train further (full_state: learn the token shift
        too; by default, when this state has one)."""
        from .model import LearnedState

        full = self.shift is not None if full_state is None else full_state
        return LearnedState(spec, full, self.wkv, self.shift)

    @classmethod
    def from_learned(cls, learned, spec: ModelSpec, **metadata) -> State:
        """Freeze a LearnedState (or EncodedState) into a plain State for `spec` (token shift kept only if it
        was learned)."""
        shift = learned.shift.detach().float().cpu().clone() if learned.full_state else None
        return cls(learned.wkv.detach().float().cpu().clone(), shift, {**for_model(spec), **metadata})

    @classmethod
    def from_recurrent(cls, rs, spec: ModelSpec, index: int = 0, full_state: bool = True, **metadata) -> State:
        """Take one sequence's state out of a batch (e.g. after running a prompt: a baked state)."""
        wkv = rs.wkv[index].detach().float().cpu().clone()
        shift = None
        if full_state:
            shift = torch.stack((rs.att_x[index], rs.ffn_x[index]), 1).detach().float().cpu().clone()
        return cls(wkv, shift, {**for_model(spec), **metadata})


def for_model(spec: ModelSpec) -> dict[str, Any]:
    """The metadata that ties a state to its base model."""
    meta: dict[str, Any] = {
        "arch": spec.arch,
        "n_layer": spec.n_layer,
        "n_embd": spec.n_embd,
        "n_head": spec.n_head,
        "head_size": spec.head_size,
    }
    if spec.path:
        meta.update(base_model_sha256=spec.sha256, base_model_name=spec.name, base_model_size=spec.file_size)
    return meta

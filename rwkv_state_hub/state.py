"""`State`: a learned (or baked) initial recurrent state, with the identity of the model it belongs to.

One layout inside the project: the wkv tensors [L, H, N, N] fp32 as [head, value, key], the layout of
the de-facto `.pth` files. Transposes happen only at the edges that need them (formats.py, pip_bridge.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .checkpoint import ModelSpec, nonfinite_tensors
from .errors import StateHubError

FORMAT_VERSION = 1
MAX_METADATA_BYTES = 1 << 20
MAX_FIELD_CHARS = 1024  # names, hashes, methods: what ends up in one-line messages
MAX_JSON_DEPTH = 16  # our own files nest 4 deep (metadata -> training -> parents -> entry)

# the keys we read from a state's metadata, and their JSON types (null = absent); other keys pass untouched
METADATA_TYPES: dict[str, type] = {
    "arch": str, "n_layer": int, "n_embd": int, "n_head": int, "head_size": int, "tokenizer": str,
    "base_model_sha256": str, "base_model_name": str, "base_model_size": int, "base_model_repo": str,
    "base_model_file": str, "format_version": int, "created_with": str, "merged_into": str, "training": dict,
}
TRAINING_TYPES: dict[str, type] = {
    "method": str, "which": str, "steps": int, "tokens_seen": int, "best_val_loss": float, "final_val_loss": float,
    "data_sha256": str, "data_files": list, "hyperparameters": dict, "parents": list, "prompt_sha256": str,
    "prompt_tokens": int, "prompt_chars": int,
}
_JSON_NAMES = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number",
               bool: "true or false", type(None): "null"}


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
        for name, t in self.tensors().items():
            if t.dtype != torch.float32:
                out.append(f"{self.source}: {name} state is {t.dtype}, expected float32")
        nonfinite = self.nonfinite_problem()
        return out + ([nonfinite] if nonfinite else [])

    def tensors(self) -> dict[str, Tensor]:
        """The state's tensors by name: wkv, and token-shift when it has one."""
        return {"wkv": self.wkv} | ({"token-shift": self.shift} if self.shift is not None else {})

    def nonfinite_problem(self) -> str | None:
        """A message if the wkv or token-shift tensor holds NaN or inf (a diverged run, a bad mix): such a
        state cannot work and must never be written."""
        bad = nonfinite_tensors(self.tensors())
        return f"{self.source}: {bad[0]} state has non-finite values (NaN or inf)" if bad else None

    def raise_if_nonfinite(self) -> None:
        """The one check every writer makes before a byte is written."""
        problem = self.nonfinite_problem()
        if problem:
            raise StateHubError(f"{problem}; not writing it")

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


# ---------------------------------------------------------------- untrusted JSON: metadata (and manifests)


def load_json(text: str | bytes, where: str, max_bytes: int) -> Any:
    """JSON from a file a stranger made: at most `max_bytes` and MAX_JSON_DEPTH levels (the parser recurses once
    per level, so depth is bounded too), one line naming `where` otherwise."""
    if len(text) > max_bytes:
        raise StateHubError(f"{where}: {len(text)} bytes of JSON, over the {max_bytes} limit")
    try:
        value = json.loads(text)
    except RecursionError:
        raise StateHubError(f"{where}: JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError both are
        raise StateHubError(f"{where}: not valid JSON ({' '.join(str(e).split())[:120]})") from None
    if _deeper_than(value, MAX_JSON_DEPTH):
        raise StateHubError(f"{where}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return value


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether `value` nests more than `limit` levels; stops at limit + 1, so the recursion is bounded."""
    if not isinstance(value, (dict, list)):
        return False
    if limit <= 0:
        return True
    children = value.values() if isinstance(value, dict) else value
    return any(_deeper_than(v, limit - 1) for v in children)


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, for messages."""
    return _JSON_NAMES.get(type(value), type(value).__name__)


def check_types(obj: dict[str, Any], types: dict[str, type], where: str, prefix: str = "") -> None:
    """Each key of `types` that `obj` has (null counts as absent) holds that JSON type; an integer must not be
    true/false, a number may be an integer, and a string must be short and printable (it ends up in one-line
    messages)."""
    for key, want in types.items():
        value = obj.get(key)
        if value is None:
            continue
        ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
        if want is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok:
            raise StateHubError(f"{where}: {prefix}{key} must be {_JSON_NAMES[want]}, found {json_type(value)}")
        if want is str and (not value.isprintable() or len(value) > MAX_FIELD_CHARS):
            raise StateHubError(f"{where}: {prefix}{key} holds line breaks or control characters, or is over "
                                f"{MAX_FIELD_CHARS} characters")


def parse_metadata(text: str, where: str) -> dict[str, Any]:
    """A state file's metadata JSON, bounded and type-checked: the one gate every reader of metadata goes through,
    so that check, info, export, mix and the demo can rely on the types of the keys they read."""
    meta = load_json(text, f"{where}: metadata", MAX_METADATA_BYTES)
    if not isinstance(meta, dict):
        raise StateHubError(f"{where}: metadata must be a JSON object, found {json_type(meta)}")
    check_types(meta, METADATA_TYPES, f"{where}: metadata")
    training = meta.get("training") or {}
    check_types(training, TRAINING_TYPES, f"{where}: metadata", "training.")
    parents = training.get("parents") or []
    if not all(isinstance(p, dict) for p in parents):
        raise StateHubError(f"{where}: metadata training.parents must be a list of objects")
    return meta

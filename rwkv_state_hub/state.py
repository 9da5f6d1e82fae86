"""`State`: a learned (or baked) initial recurrent state, with the identity of the model it belongs to.

One layout inside the project: the wkv tensors [L, H, N, N] fp32 as [head, value, key], the layout of
the de-facto `.pth` files. Transposes happen only at the edges that need them (formats.py, pip_bridge.py).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .checkpoint import ModelSpec, nonfinite_tensors
from .errors import InvalidOptionError, InvalidStateError, ModelMismatchError, StateHubError, option, warn

if TYPE_CHECKING:
    from .model import RWKV

STATE_FILE = "state.safetensors"  # the state in a saved folder, a Hub repo and a training run

FORMAT_VERSION = 1
MAX_METADATA_BYTES = 1 << 20
MAX_FIELD_CHARS = 1024  # names, hashes, methods: what ends up in one-line messages
MAX_JSON_DEPTH = 16  # our own files nest 4 deep (metadata -> training -> parents -> entry)

# the keys we read from a state's metadata, and their JSON types (null = absent); other keys pass untouched
METADATA_TYPES: dict[str, type] = {
    "arch": str, "n_layer": int, "n_embd": int, "n_head": int, "head_size": int, "tokenizer": str,
    "base_model_sha256": str, "base_model_sha1": str, "base_model_fingerprint": str, "base_model_name": str,
    "base_model_size": int, "base_model_repo": str, "base_model_file": str, "format_version": int,
    "created_with": str, "merged_into": str, "training": dict,
}
TRAINING_TYPES: dict[str, type] = {
    "method": str, "which": str, "steps": int, "tokens_seen": int, "best_val_loss": float, "final_val_loss": float,
    "data_sha256": str, "data_files": list, "hyperparameters": dict, "parents": list, "prompt_sha256": str,
    "prompt_tokens": int, "prompt_chars": int,
}
_JSON_NAMES = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number",
               bool: "true or false", type(None): "null"}


def same_weights_note(source: str, made_for: str, model: str, evidence: str) -> str:
    """The one line every check prints when a state meets its base model's weights in another file; `evidence`
    says how that is known (the weights fingerprint, or the source .pth's SHA-1 an .st records)."""
    return f"{source}: made for {made_for}; {model} holds the same weights in another file ({evidence})"


@dataclass
class State:
    """wkv [L, H, N, N] fp32 ([head, value, key]); shift [L, 2, C] fp32 (time-mix and channel-mix
    token-shift vectors) or None when only the wkv part is learned; metadata about where it came from."""

    wkv: Tensor
    shift: Tensor | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    source: str = "state"  # the file it was read from, for messages
    metrics: list[dict] = field(default_factory=list, repr=False, compare=False)  # training history, for loss.png

    def __repr__(self) -> str:
        base = self.metadata.get("base_model_name") or "unknown base model"
        sha = f" {self.base_model_sha256[:12]}" if self.base_model_sha256 else ""
        parts = "wkv + token shift" if self.shift is not None else "wkv"
        return f"State({self.arch or 'RWKV'}, {self.dims()}, {parts}, for {base}{sha}, from {self.source!r})"

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike, *, model: RWKV | ModelSpec | str | os.PathLike | None = None,
                        force: bool = False, revision: str | None = None, token: str | None = None,
                        endpoint: str | None = None) -> State:
        """A state from a folder (`save_pretrained`'s, or a training run's), a state file in any format we read
        (.safetensors, .pth, Ai00 .st), or a Hub repo id ("owner/name", "owner/name@revision").

        With `model` (a loaded RWKV, its ModelSpec, or a path / hf:// name), the state must fit it: a
        ModelMismatchError otherwise; `force=True` waives only another base model's sha256, with a warning."""
        from .formats import load_state
        from .hub import is_repo_id, pull

        spec = model_spec(model)
        path = Path(os.fsdecode(source))
        if path.is_dir():
            path = _state_file_in(path)
        elif not path.exists() and is_repo_id(os.fsdecode(source)):
            path = pull(os.fsdecode(source), spec, revision=revision, force=force, token=token, endpoint=endpoint)
        state = load_state(path)
        if spec is not None:
            for problem in state.check(spec, force=force):
                warn(problem)
        return state

    def save_pretrained(self, folder: str | os.PathLike, *, exports: tuple[str, ...] | list[str] = ("pth", "ai00"),
                        model: RWKV | ModelSpec | str | os.PathLike | None = None, force: bool = False) -> Path:
        """Write `folder` as a Hub repo would hold it: state.safetensors, the consumer `exports` ("pth" for RWKV
        Runner / RWKV-PEFT / the rwkv pip package, "ai00"), loss.png when the state has a training history,
        the manifest and a model card. `model` labels (and checks) a state that does not record its base
        model. Returns the folder."""
        from .hub import save_folder

        return save_folder(self, folder, model=model_spec(model), exports=exports, force=force).path

    def push_to_hub(self, repo_id: str, *, model: RWKV | ModelSpec | str | os.PathLike | None = None,
                    private: bool = False, revision: str | None = None,
                    exports: tuple[str, ...] | list[str] = ("pth", "ai00"), token: str | None = None,
                    endpoint: str | None = None, force: bool = False, message: str | None = None):
        """Upload what `save_pretrained` writes to `repo_id` in one commit (creating the repo); returns the
        PushResult (url, commit, files). `model` may also be hf://owner/repo/file.pth: checked without a
        download."""
        from .hub import push

        if model is not None and not isinstance(model, str | os.PathLike | ModelSpec):
            model = model_spec(model)
        return push(self, repo_id, model=model, private=private, revision=revision, exports=exports, token=token,
                    endpoint=endpoint, force=force, message=message)

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
        """Raise ModelMismatchError unless this state fits `spec`; return the warnings `force` let through.

        `force` waives only a base-model sha256 mismatch (a state may be reused on a fine-tune of its
        model, at the user's risk); a state of the wrong shape, dtype or architecture, or with non-finite
        values, is always refused: it cannot work.
        """
        broken = self.problems(spec, identity=False)
        if broken:
            raise ModelMismatchError(broken[0])
        identity = self._identity_problem(spec)
        if identity and not force:
            raise ModelMismatchError(f"{identity} (pass {option('force', True)} to use it anyway)")
        return [identity] if identity else self._identity_note(spec)

    def problems(self, spec: ModelSpec, identity: bool = True) -> list[str]:
        """Every way this state does not fit `spec`, one line each; [] when it fits. With identity=False, only
        what makes it unusable (shape, architecture, dtype, non-finite values), not another base model's sha256."""
        if self.wkv.dim() != 4 or self.wkv.shape[2] != self.wkv.shape[3]:
            return [f"{self.source}: wkv state has shape {list(self.wkv.shape)}, expected [layers, heads, N, N]"]
        out = []
        if (self.n_layer, self.n_head, self.head_size) != (spec.n_layer, spec.n_head, spec.head_size):
            out.append(f"{self.source}: {self.dims()}, but {spec.name} has {spec.dims()}")
        if self.arch and self.arch != spec.arch:
            out.append(f"{self.source}: made for an RWKV {self.arch} model, but {spec.name} is {spec.arch}")
        if self.shift is not None and tuple(self.shift.shape) != (spec.n_layer, 2, spec.n_embd):
            out.append(f"{self.source}: token-shift state {list(self.shift.shape)}, "
                       f"but {spec.name} needs [{spec.n_layer}, 2, {spec.n_embd}]")
        out += [f"{self.source}: {name} state is {t.dtype}, expected float32"
                for name, t in self.tensors().items() if t.dtype != torch.float32]
        out += [p for p in (self.nonfinite_problem(), identity and self._identity_problem(spec)) if p]
        return out

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
            raise InvalidStateError(f"{problem}; not writing it")

    def identity(self, spec: ModelSpec) -> str:
        """How the base model this state records relates to `spec`'s file: "same file" (sha256), "same weights"
        (the weights fingerprint: the same model in another file form or dtype), "another model", or "unknown"
        (the state records no base model, or `spec` has no file)."""
        want = self.base_model_sha256
        if not want or not spec.sha256:
            return "unknown"
        if want == spec.sha256:
            return "same file"
        sha1 = self.metadata.get("base_model_sha1")
        if sha1 and sha1 == spec.source_sha1:
            return "same weights"
        recorded = self.metadata.get("base_model_fingerprint")
        return "same weights" if recorded and recorded == spec.fingerprint else "another model"

    def _identity_problem(self, spec: ModelSpec) -> str | None:
        """A message if this state records another base model (by sha256 and by fingerprint) than `spec`'s."""
        if self.identity(spec) != "another model":
            return None
        made_for = self.metadata.get("base_model_name") or "another model"
        return (f"{self.source}: made for {made_for} (sha256 {self.base_model_sha256[:12]}), "
                f"but {spec.name} has sha256 {spec.sha256[:12]} and other weights")

    def _identity_note(self, spec: ModelSpec) -> list[str]:
        if self.identity(spec) != "same weights":
            return []
        made_for = self.metadata.get("base_model_name") or "its base model"
        sha1 = self.metadata.get("base_model_sha1")
        evidence = f"converted from sha1 {sha1[:12]}" if sha1 and sha1 == spec.source_sha1 else \
            f"{self.metadata['base_model_fingerprint'][:20]}..."
        return [same_weights_note(self.source, made_for, spec.name, evidence)]

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


def model_spec(model: RWKV | ModelSpec | str | os.PathLike | None) -> ModelSpec | None:
    """What a `model=` parameter names, as a ModelSpec: a loaded RWKV's, a spec itself, or a checkpoint's
    (a path or hf://owner/repo/file.pth, read without loading the weights)."""
    if model is None or isinstance(model, ModelSpec):
        return model
    if isinstance(model, str | os.PathLike):
        from .checkpoint import read_spec
        from .hub import resolve_model

        return read_spec(resolve_model(model))
    spec = getattr(model, "spec", None)
    if not isinstance(spec, ModelSpec):
        raise InvalidOptionError(f"model: expected an RWKV model, a ModelSpec or a checkpoint path, "
                                 f"found {type(model).__name__}")
    return spec


def _state_file_in(folder: Path) -> Path:
    """The state of a saved folder or a training run (its last state, not best.safetensors)."""
    path = folder / STATE_FILE
    if not path.is_file():
        raise InvalidStateError(f"{folder}: a folder without {STATE_FILE}; name the state file itself")
    return path


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
        meta.update(base_model_sha256=spec.sha256, base_model_sha1=spec.sha1, base_model_name=spec.name,
                    base_model_size=spec.file_size, base_model_fingerprint=spec.fingerprint)
    return meta


# ---------------------------------------------------------------- untrusted JSON: metadata (and manifests)


def load_json(text: str | bytes, where: str, max_bytes: int, error: type[StateHubError] = InvalidStateError) -> Any:
    """JSON from a file a stranger made: at most `max_bytes` and MAX_JSON_DEPTH levels (the parser recurses once
    per level, so depth is bounded too), one line naming `where` otherwise."""
    if len(text) > max_bytes:
        raise error(f"{where}: {len(text)} bytes of JSON, over the {max_bytes} limit")
    try:
        value = json.loads(text)
    except RecursionError:
        raise error(f"{where}: JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError both are
        raise error(f"{where}: not valid JSON ({' '.join(str(e).split())[:120]})") from None
    if _deeper_than(value, MAX_JSON_DEPTH):
        raise error(f"{where}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
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


def check_types(obj: dict[str, Any], types: dict[str, type], where: str, prefix: str = "",
                error: type[StateHubError] = InvalidStateError) -> None:
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
            raise error(f"{where}: {prefix}{key} must be {_JSON_NAMES[want]}, found {json_type(value)}")
        if want is str and (not value.isprintable() or len(value) > MAX_FIELD_CHARS):
            raise error(f"{where}: {prefix}{key} holds line breaks or control characters, or is over "
                        f"{MAX_FIELD_CHARS} characters")


def parse_metadata(text: str, where: str) -> dict[str, Any]:
    """A state file's metadata JSON, bounded and type-checked: the one gate every reader of metadata goes through,
    so that check, info, export, mix and the demo can rely on the types of the keys they read."""
    meta = load_json(text, f"{where}: metadata", MAX_METADATA_BYTES)
    if not isinstance(meta, dict):
        raise InvalidStateError(f"{where}: metadata must be a JSON object, found {json_type(meta)}")
    check_types(meta, METADATA_TYPES, f"{where}: metadata")
    training = meta.get("training") or {}
    check_types(training, TRAINING_TYPES, f"{where}: metadata", "training.")
    parents = training.get("parents") or []
    if not all(isinstance(p, dict) for p in parents):
        raise InvalidStateError(f"{where}: metadata training.parents must be a list of objects")
    return meta

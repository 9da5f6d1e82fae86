"""RWKV Runner's rules for a state, and the two ways in: a file in `state-models/`, a live `/update-config` call.

What Runner's Python backend does with a state (`backend-python/utils/rwkv.py`, `load_rwkv_state`, 1.9.x):
- the model and the state must both be `.pth` files (its WebGPU/safetensors mode takes no state);
- `torch.load`s the state, then accepts it only if it holds exactly n_layer entries and the *first* tensor has
  `shape[0] * shape[1] == n_embd`, else HTTP 400 "state shape mismatch";
- reads `blocks.{i}.att.time_state` for every layer, `.transpose(1, 2)` for v5/v6, as is for v7, `.to(float)`;
- starts the token shift from zeros; an empty `state` string unloads.
Its UI lists `state-models/*.pth`, and `models/*.pth` under 200 MB, as states. Its model manifest (embedded, and
copied into `cache.json` beside the executable) carries each downloadable model's SHA256 and size.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from rwkv_state_hub.errors import ConsumerError, InvalidOptionError, ModelMismatchError, StateHubError, option
from rwkv_state_hub.files import atomic_path, sha256_file
from rwkv_state_hub.formats import detect_format, export_state, format_notes, time_state_key

from .. import post_json, resolve_state, state_stem

if TYPE_CHECKING:
    import torch

    from rwkv_state_hub.checkpoint import ModelSpec
    from rwkv_state_hub.state import State

STATE_FOLDER = "state-models"
DEFAULT_MODELS_FOLDER = "models"
DEFAULT_URL = "http://127.0.0.1:8000"
MANIFEST_FILES = ("cache.json", "manifest.json")  # the user's copy of the manifest, then a source checkout's
SERVER = "RWKV Runner"


def wkv_as_runner_uses_it(tensor: torch.Tensor, arch: str) -> torch.Tensor:
    """Runner's transform of one file tensor into its state list entry."""
    import torch

    t = tensor if arch == "v7" else tensor.transpose(1, 2)
    return t.to(torch.float).contiguous()


def runner_problems(tensors: dict[str, torch.Tensor], spec: ModelSpec) -> list[str]:
    """Why Runner would refuse (or crash on) these tensors as a state for `spec`; [] when it loads them."""
    if len(tensors) != spec.n_layer:
        return [f"{len(tensors)} tensors, but Runner wants exactly {spec.n_layer} (one per layer of {spec.name})"]
    first = next(iter(tensors.values()))
    if first.dim() < 2 or first.shape[0] * first.shape[1] != spec.n_embd:
        return [f"first tensor has shape {list(first.shape)}, Runner wants shape[0] * shape[1] == {spec.n_embd}"]
    out = []
    for i in range(spec.n_layer):
        t = tensors.get(time_state_key(i))
        if t is None:
            out.append(f"no {time_state_key(i)} (Runner fails with HTTP 500)")
        elif tuple(t.shape) != spec.state_shape()[1:] or not t.is_floating_point():
            want = list(spec.state_shape()[1:])
            out.append(f"{time_state_key(i)} is {t.dtype} {list(t.shape)}, expected a float tensor {want}")
    return out


# ---------------------------------------------------------------- install


@dataclass
class Installed:
    """What `install` did, for the command to say."""

    path: Path
    model: ModelSpec
    replaced: bool
    notes: list[str] = field(default_factory=list)


def _read_json(path: Path) -> object:
    """One of Runner's own JSON files, or None where it is missing, unreadable or not JSON: Runner's files only
    help find the model, and a broken one must not stop an install."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None


def models_folder(runner_dir: Path) -> Path:
    """Runner's models folder: `settings.customModelsPath` of its config.json, `models/` by default."""
    folder = DEFAULT_MODELS_FOLDER
    config = _read_json(runner_dir / "config.json")
    settings = config.get("settings") if isinstance(config, dict) else None
    if isinstance(settings, dict) and isinstance(settings.get("customModelsPath"), str):
        folder = settings["customModelsPath"] or folder
    path = Path(folder)
    return path if path.is_absolute() else runner_dir / path


def manifest_sha256(runner_dir: Path) -> dict[tuple[str, int], str]:
    """(file name, size) -> SHA256 from Runner's manifest copies; unreadable copies are skipped."""
    known: dict[tuple[str, int], str] = {}
    for name in MANIFEST_FILES:
        manifest = _read_json(runner_dir / name)
        models = manifest.get("models") if isinstance(manifest, dict) else None
        for m in models if isinstance(models, list) else []:
            if isinstance(m, dict) and isinstance(m.get("SHA256"), str) and isinstance(m.get("size"), int):
                known.setdefault((str(m.get("name")), m["size"]), m["SHA256"].lower())
    return known


def model_sha256(path: Path, manifest: dict[tuple[str, int], str]) -> str:
    """Runner's own SHA256 when its manifest names this file at this size; else the file's (hashed once, cached)."""
    return manifest.get((path.name, path.stat().st_size)) or sha256_file(path)


def named_model(runner_dir: Path, model: str) -> Path:
    """The model named by `model`: a path, or a file name (".pth" optional) in Runner's models folder."""
    folder = models_folder(runner_dir)
    path = Path(model) if Path(model).is_absolute() or Path(model).is_file() else folder / model
    if not path.is_file() and path.suffix != ".pth":
        path = path.with_name(path.name + ".pth")
    if not path.is_file():
        raise InvalidOptionError(f"{option('model', model)}: no such model in {folder}")
    if path.suffix != ".pth":
        raise ConsumerError(f"{path}: Runner loads states only with .pth models (not in its WebGPU mode)")
    return path


def find_base_model(state: State, runner_dir: Path, model: str | None = None, force: bool = False
                    ) -> tuple[ModelSpec, list[str]]:
    """The model in Runner's models folder this state was made for (by sha256), or `model` when given, checked."""
    from rwkv_state_hub.checkpoint import read_spec

    folder = models_folder(runner_dir)
    manifest = manifest_sha256(runner_dir)
    if model:
        path = named_model(runner_dir, model)
        spec = replace(read_spec(path), _sha256=model_sha256(path, manifest))
        return spec, state.check(spec, force=force)
    if not folder.is_dir():
        raise ConsumerError(f"{runner_dir}: no models folder {folder}; is this RWKV Runner's folder?")
    candidates = sorted(p for p in folder.glob("*.pth") if p.is_file())
    want = state.base_model_sha256
    if want:
        size = state.metadata.get("base_model_size")
        for path in candidates:
            if size and path.stat().st_size != size:
                continue  # a different size cannot have the same sha256: no need to hash it
            sha = model_sha256(path, manifest)
            if sha == want:
                spec = replace(read_spec(path), _sha256=sha)
                return spec, state.check(spec, force=force)
        made_for = state.metadata.get("base_model_name") or "another model"
        names = ", ".join(p.name for p in candidates) or "none"
        raise ModelMismatchError(f"{state.source}: made for {made_for} (sha256 {want[:12]}), which is not among "
                                 f"Runner's models in {folder} (found: {names}); download it, or pass "
                                 f"{option('model')} to name one")
    fits = []
    for path in candidates:
        try:
            spec = read_spec(path)
        except StateHubError:
            continue  # a state or another file in models/: not a model
        if not state.problems(spec, identity=False):
            fits.append(spec)
    if len(fits) != 1:
        names = ", ".join(s.name for s in fits) or "none"
        error = InvalidOptionError if fits else ModelMismatchError  # several to choose from, or none that fits
        raise error(f"{state.source} does not record its base model, and {len(fits)} of Runner's models in "
                    f"{folder} have its shape ({state.dims()}: {names}); pass {option('model')} to name one")
    return fits[0], [f"{state.source} does not record its base model; {fits[0].name} was chosen by shape alone"]


def install(state_or_repo: str | os.PathLike, runner_dir: str | os.PathLike, model: str | None = None,
            force: bool = False) -> Installed:
    """Write STATE as `state-models/<state>--for-<model>.pth` in Runner's folder, for the model it was made for.

    The file is checked against Runner's own loading rules before it takes its place, so what Runner lists
    always loads.
    """
    from rwkv_state_hub.checkpoint import load_state_dict, read_spec

    runner_dir = Path(runner_dir)
    if not runner_dir.is_dir():
        raise ConsumerError(f"{option('runner_dir', str(runner_dir))}: no such folder")
    # a Hub state is verified against the named model while it is pulled; without a model, by sha256 below
    state = resolve_state(state_or_repo, read_spec(named_model(runner_dir, model)) if model else None, force)
    spec, notes = find_base_model(state, runner_dir, model, force)
    state = state.with_model(spec)
    target = runner_dir / STATE_FOLDER / f"{state_stem(state_or_repo)}--for-{spec.name}.pth"
    replaced = target.exists()
    with atomic_path(target) as tmp:
        export_state(state, tmp, "pth", "fp32")  # fp32 [H, V, K]
        notes += format_notes(state, "pth")  # a token shift left behind
        broken = runner_problems(load_state_dict(tmp), spec)
        if broken:
            raise ConsumerError(f"{target}: Runner would refuse the file we wrote: {broken[0]}")
    return Installed(target, spec, replaced, notes)


# ---------------------------------------------------------------- mount


def _path_as_runner_sees_it(state: str | os.PathLike) -> str:
    """A local file goes as its absolute path (Runner takes those as they are); anything else as given, to be
    resolved by Runner against its own folder (e.g. `state-models/x.pth`)."""
    path = Path(state)
    if not str(state).endswith(".pth"):
        raise ConsumerError(f"{state}: Runner loads only .pth states (its rule); install the state first, which "
                            "writes one")
    if not path.exists():
        return str(state)
    if detect_format(path) != "pth":
        raise ConsumerError(f"{state}: Runner takes only a plain state .pth (one tensor per layer); install the "
                            "state first, which writes one")
    return str(path.resolve())


def mount(state: str | os.PathLike, url: str = DEFAULT_URL, timeout: float = 60.0) -> str:
    """Ask a running Runner backend to use STATE from now on; returns the path Runner was given."""
    path = _path_as_runner_sees_it(state)
    post_json(url.rstrip("/") + "/update-config", {"state": path}, SERVER, timeout)
    return path


def unmount(url: str = DEFAULT_URL, timeout: float = 60.0) -> None:
    """Back to the model's zero state (Runner unloads on an empty `state`)."""
    post_json(url.rstrip("/") + "/update-config", {"state": ""}, SERVER, timeout)

"""States on the Hugging Face Hub: push, pull, search, keyed to the exact sha256 of the base model file.

Everything goes through huggingface_hub (its token, endpoint, cache, resumable downloads, offline mode).
A base model on the Hub is named `hf://owner/repo/path/file.pth` (optionally `hf://owner/repo@revision/...`);
its sha256 comes from the Hub's LFS metadata, so checking a state against a 15 GB model downloads nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from .checkpoint import ModelSpec, model_name, read_spec
from .errors import (
    HubEntryNotFoundError,
    HubError,
    InvalidOptionError,
    InvalidStateError,
    ModelMismatchError,
    StateHubError,
    option,
)
from .files import atomic_path, atomic_write_bytes, os_reason, sha256_bytes, sha256_file
from .formats import FORMAT_ALIASES, detect_format, export_state, load_state
from .hub_card import (
    EXPORT_FORMATS,
    LOSS_PLOT,
    MANIFEST,
    REPO_FILES,
    ROLE_OF_FORMAT,
    BaseModel,
    build_manifest,
    check_sha256,
    fingerprint_of,
    hash_tag,
    read_manifest,
    render_card,
    weights_tag,
)
from .plot import plot_losses
from .state import State, same_weights_note

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
PULL_FORMATS = tuple(ROLE_OF_FORMAT)
MAX_CARD_BYTES = 1 << 20  # a model card is a stranger's file: larger ones are not read


def _endpoint(endpoint: str | None) -> str | None:
    """--endpoint, else $HF_ENDPOINT read now (huggingface_hub reads it once, at import), else the Hub."""
    return (endpoint or os.environ.get("HF_ENDPOINT") or "").rstrip("/") or None


# ---------------------------------------------------------------- names: repo ids and hf:// models


def is_repo_id(text: str) -> bool:
    """True for "owner/name" (optionally "owner/name@revision") that is not an existing local path."""
    if not isinstance(text, str) or text.startswith("hf://") or os.path.exists(text):
        return False
    return bool(_REPO_ID.match(text.split("@", 1)[0]))


def _split_revision(repo_id: str, revision: str | None) -> tuple[str, str | None]:
    name, _, rev = repo_id.partition("@")
    if not _REPO_ID.match(name):
        raise InvalidOptionError(f"{repo_id}: not a Hub repo id (expected owner/name)")
    if rev and revision and rev != revision:
        raise InvalidOptionError(f"{repo_id}: two revisions given ({rev} and {option('revision', revision)})")
    return name, (rev or revision)


@dataclass(frozen=True)
class HubFile:
    """A file in a Hub model repo: `hf://owner/repo[@revision]/path/in/repo`."""

    repo_id: str
    path: str
    revision: str | None = None

    def __str__(self) -> str:
        return f"hf://{self.repo_id}{'@' + self.revision if self.revision else ''}/{self.path}"


def parse_hf_url(text: str) -> HubFile | None:
    """`hf://owner/repo[@rev]/path/file.pth` -> HubFile; None when `text` is not an hf:// name."""
    if not isinstance(text, str) or not text.startswith("hf://"):
        return None
    parts = text.removeprefix("hf://").split("/")
    if len(parts) < 3 or not all(parts):
        raise InvalidOptionError(f"{text}: expected hf://owner/repo/path/to/file.pth")
    repo, path = "/".join(parts[:2]), "/".join(parts[2:])
    repo_id, revision = _split_revision(repo, None)
    return HubFile(repo_id, path, revision)


def resolve_model(model: str | os.PathLike, *, token: str | None = None, endpoint: str | None = None) -> Path:
    """A local path for a base model: as given, or downloaded through huggingface_hub's cache (hf://).
    The one place that tells a model's two kinds of name apart: the CLI's --model, a --config file's model,
    the demo and the plugins all come through here."""
    if not isinstance(model, str | os.PathLike):
        raise InvalidOptionError(f"model {str(model)[:40]!r}: expected a .pth path or hf://owner/repo/file.pth, "
                                 f"found {type(model).__name__}")
    endpoint = _endpoint(endpoint)
    text = os.fsdecode(model)
    hub_file = parse_hf_url(text)
    if hub_file is None:
        return Path(text)
    with _hub_errors(hub_file.repo_id, token, hub_file.path):
        return Path(hf_hub_download(hub_file.repo_id, hub_file.path, revision=hub_file.revision, token=token,
                                    endpoint=endpoint))


def model_identity(model: str | os.PathLike | ModelSpec, *, token: str | None = None,
                   endpoint: str | None = None) -> BaseModel:
    """The sha256 (and name, size, repo) of a base model. For hf:// it comes from the Hub's LFS metadata
    without downloading the file; local files use the cached hash."""
    endpoint = _endpoint(endpoint)
    if isinstance(model, ModelSpec):
        if not model.sha256:
            raise InvalidOptionError(f"{model.name}: this model spec has no file, so no sha256 to compare states with")
        return BaseModel(model.sha256, model.name, model.file_size)
    hub_file = parse_hf_url(str(model))
    if hub_file is None:
        path = Path(model)
        return BaseModel(sha256_file(path), model_name(path), path.stat().st_size)
    name = model_name(hub_file.path)
    if constants.is_offline_mode():  # no Hub to ask: the cached download, if there is one
        path = resolve_model(str(hub_file), token=token, endpoint=endpoint)
        return BaseModel(sha256_file(path), name, path.stat().st_size, hub_file.repo_id, hub_file.path)
    with _hub_errors(hub_file.repo_id, token, hub_file.path):
        infos = HfApi(endpoint=endpoint).get_paths_info(hub_file.repo_id, [hub_file.path],
                                                        revision=hub_file.revision, token=token)
    info = next((i for i in infos if getattr(i, "path", None) == hub_file.path and hasattr(i, "lfs")), None)
    if info is None:
        raise HubEntryNotFoundError(f"{hub_file}: no such file in {hub_file.repo_id}")
    if info.lfs is not None:
        sha256, size = info.lfs.sha256, info.lfs.size
    else:  # a small file kept in git: the Hub has no sha256 for it, so hash the download
        sha256, size = sha256_file(resolve_model(str(hub_file), token=token, endpoint=endpoint)), info.size
    return BaseModel(sha256, name, size, hub_file.repo_id, hub_file.path)


# ---------------------------------------------------------------- errors the huggingface_hub way, in one line


def _secret(token: str | None) -> str | None:
    return token or get_token()


def _scrub(text: str, token: str | None) -> str:
    secret = _secret(token)
    return text.replace(secret, "***") if secret else text


@contextlib.contextmanager
def _hub_errors(repo_id: str, token: str | None, what: str = "") -> Iterator[None]:
    """Turn what huggingface_hub and httpx raise into one StateHubError line that says what to do.

    The order matters: huggingface_hub's errors subclass each other (a missing file is an HTTP error, a file
    missing from the offline cache is an entry-not-found error)."""
    import httpx2

    login = f"log in with `hf auth login`, set HF_TOKEN, or pass {option('token')}"
    offline = f"{repo_id}: HF_HUB_OFFLINE is set and {what or 'this'} is not in the local cache; pull it once online"
    try:
        yield
    except StateHubError:
        raise
    except GatedRepoError:  # a subclass of RepositoryNotFoundError: the repo exists, the advice differs
        raise HubError(f"{repo_id}: the repo is gated: request access on its Hub page, then {login} with "
                       "the account that was granted it") from None
    except RepositoryNotFoundError:
        msg = f"{repo_id}: no such repo on the Hub, or it is private and your token cannot see it ({login})"
        raise HubError(msg) from None
    except RevisionNotFoundError:
        raise HubError(f"{repo_id}: no such revision (branch, tag or commit)") from None
    except LocalEntryNotFoundError:
        if constants.is_offline_mode():
            raise HubError(offline) from None
        raise HubError(f"{repo_id}: cannot reach the Hub to get {what or 'the file'} and it is not in the local "
                       f"cache; check the network (or HF_ENDPOINT / {option('endpoint')}) and run again") from None
    except EntryNotFoundError:
        raise HubEntryNotFoundError(f"{repo_id}: {what or 'the file'} is not in the repo") from None
    except OfflineModeIsEnabled:
        raise HubError(offline) from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status == 401:
            msg = f"{repo_id}: the Hub refused the token (401 unauthorized): {login} with a valid token"
        elif status == 403:
            msg = (f"{repo_id}: your token has no access to this (403 forbidden): use a token with write access "
                   "to that namespace, or push to your own")
        else:
            msg = f"{repo_id}: the Hub answered {status}: {_scrub(' '.join(str(e).split())[:200], token)}"
        raise HubError(msg) from None
    except (httpx2.TransportError, ConnectionError) as e:
        raise HubError(f"{repo_id}: network failure talking to the Hub ({type(e).__name__}: "
                       f"{_scrub(str(e), token)[:160]}); check the connection (or HF_ENDPOINT / "
                       f"{option('endpoint')}) "
                       "and run again") from None
    except OSError as e:
        if "Consistency check failed" in str(e):
            raise HubError(f"{repo_id}: {what or 'a download'} arrived incomplete (network trouble); "
                           "run again") from None
        # e.g. a file name too long for the disk (from a hostile manifest), a full disk under the cache
        raise HubError(f"{repo_id}: {what or 'a file'}: the operating system refused it "
                       f"({os_reason(e) or type(e).__name__})") from None


# ---------------------------------------------------------------- push


@dataclass(frozen=True)
class PushResult:
    repo_id: str
    url: str
    commit: str
    files: list[str]
    base_model: BaseModel
    warnings: list[str]


def _state_identity(state: State, model, force: bool, token: str | None,
                    endpoint: str | None) -> tuple[State, BaseModel, list[str]]:
    """The state labelled with its base model: from `model` when given (checked), else from its metadata;
    with the mismatch `force` let through, if any."""
    if model is None:
        if not state.base_model_sha256:
            raise InvalidOptionError(f"{state.source}: the state does not record its base model; give the model it "
                                     f"was made for ({option('model', 'BASE.pth')} or hf://owner/repo/file.pth)")
        meta = state.metadata
        return state, BaseModel(check_sha256(state.base_model_sha256, f"{state.source}: base_model_sha256"),
                                meta.get("base_model_name"), meta.get("base_model_size"), meta.get("base_model_repo"),
                                meta.get("base_model_file")), []
    if isinstance(model, ModelSpec) or parse_hf_url(str(model)) is None:
        spec = model if isinstance(model, ModelSpec) else read_spec(model)
        warnings = state.check(spec, force=force)
        meta = state.with_model(spec).metadata
        if state.base_model_sha256 != spec.sha256:  # a Hub location recorded for another model is not this one's
            meta = {k: v for k, v in meta.items() if k not in ("base_model_repo", "base_model_file")}
        base = BaseModel(spec.sha256, spec.name, spec.file_size, meta.get("base_model_repo"),
                         meta.get("base_model_file"))
        return State(state.wkv, state.shift, meta, state.source), base, warnings
    base = model_identity(model, token=token, endpoint=endpoint)
    warnings = []
    if state.base_model_sha256 and state.base_model_sha256 != base.sha256:
        problem = (f"{state.source}: made for {state.metadata.get('base_model_name') or 'another model'} "
                   f"(sha256 {state.base_model_sha256[:12]}), but {model} has sha256 {base.sha256[:12]}")
        if not force:
            raise ModelMismatchError(f"{problem} (pass {option('force', True)} to push it anyway)")
        warnings.append(problem)
    same = state.base_model_sha256 == base.sha256  # else the file's other hashes are unknown here
    sha1, weights = (state.metadata.get(k) if same else None for k in ("base_model_sha1", "base_model_fingerprint"))
    meta = {**state.metadata, "base_model_sha256": base.sha256, "base_model_sha1": sha1,
            "base_model_fingerprint": weights, "base_model_name": base.name,
            "base_model_size": base.size, "base_model_repo": base.repo, "base_model_file": base.file}
    return State(state.wkv, state.shift, meta, state.source), base, warnings


@dataclass(frozen=True)
class SavedFolder:
    path: Path
    state: State  # as written: labelled with its base model
    files: list[str]
    base_model: BaseModel
    warnings: list[str]


def _check_exports(exports: tuple[str, ...] | list[str]) -> None:
    unknown = [e for e in exports if e not in ("pth", "ai00")]
    if unknown:
        raise InvalidOptionError(f"{option('exports', list(exports))}: unknown format {unknown[0]!r}; "
                                 "choose from pth, ai00")


def _file_of(state: State) -> Path | None:
    """The file a State was read from, if it still exists (its loss.png may sit beside it)."""
    path = Path(state.source)
    return path if path.is_file() else None


def _loss_plot(state: State, source: Path | None, target: Path) -> Path | None:
    """loss.png for the folder: drawn from the state's training history, or the one beside its file."""
    if state.metrics:
        plot_losses(state.metrics, target, title=f"{state.metadata.get('base_model_name') or 'RWKV'}: state tuning")
        return target
    beside = source.parent / LOSS_PLOT if source else None
    if beside and beside.is_file():
        with atomic_path(target) as tmp:
            shutil.copyfile(beside, tmp)
        return target
    return None


def save_folder(state: str | os.PathLike | State, folder: str | os.PathLike, *, repo_id: str | None = None,
                model: str | os.PathLike | ModelSpec | None = None,
                exports: tuple[str, ...] | list[str] = ("pth", "ai00"), force: bool = False,
                token: str | None = None, endpoint: str | None = None) -> SavedFolder:
    """Write what a state repo holds into `folder`: the native file, the consumer exports, loss.png (from the
    state's training history, or beside its file), the manifest and the model card. `State.save_pretrained`
    and `push` both come through here, so a folder saved locally is exactly what a push uploads."""
    _check_exports(exports)
    source = None if isinstance(state, State) else Path(state)
    if source is not None:
        state = load_state(source)
    loaded_metadata = dict(state.metadata)
    state, base, warnings = _state_identity(state, model, force, token, _endpoint(endpoint))
    if not state.arch:
        raise InvalidOptionError(f"{state.source}: the state does not record its architecture; give the base model "
                                 f"as a local file ({option('model', 'BASE.pth')}) to check and label it")
    folder = Path(folder)
    files: dict[str, Path] = {}
    for role in ("native", *dict.fromkeys(exports)):
        files[role] = folder / REPO_FILES[role]
        export_state(state, files[role], EXPORT_FORMATS[role])
    if source and state.metadata == loaded_metadata and detect_format(source) == "safetensors":
        with atomic_path(files["native"]) as tmp:  # already a labelled native file: keep it byte for byte
            shutil.copyfile(source, tmp)
    plot = _loss_plot(state, source or _file_of(state), folder / LOSS_PLOT)
    if plot:
        files["plot"] = plot
    manifest = build_manifest(state, base, files)
    atomic_write_bytes(folder / MANIFEST, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    card_id = repo_id or f"your-name/{folder.resolve().name}"
    atomic_write_bytes(folder / "README.md", render_card(card_id, state, manifest, base).encode())
    return SavedFolder(folder, state, [p.name for p in files.values()] + [MANIFEST, "README.md"], base, warnings)


def push(state: str | os.PathLike | State, repo_id: str, *, model: str | os.PathLike | ModelSpec | None = None,
         private: bool = False, revision: str | None = None, exports: tuple[str, ...] | list[str] = ("pth", "ai00"),
         token: str | None = None, endpoint: str | None = None, force: bool = False,
         message: str | None = None) -> PushResult:
    """Upload a state to `repo_id` in one commit: what `save_folder` writes. Creates the repo (and branch)
    if needed."""
    endpoint = _endpoint(endpoint)
    repo_id, revision = _split_revision(repo_id, revision)
    _check_exports(exports)
    if not _secret(token):
        raise HubError(f"{repo_id}: pushing needs a Hugging Face token: log in with `hf auth login`, "
                       f"set HF_TOKEN, or pass {option('token')}")
    with tempfile.TemporaryDirectory(prefix="rwkv-state-push-") as tmp:
        saved = save_folder(state, tmp, repo_id=repo_id, model=model, exports=exports, force=force, token=token,
                            endpoint=endpoint)
        ops = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(saved.path / name)) for name in saved.files]
        api = HfApi(endpoint=endpoint, token=token)
        base = saved.base_model
        with _hub_errors(repo_id, token):
            url = api.create_repo(repo_id, private=private, exist_ok=True)
            if revision and revision != "main":
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            info = api.create_commit(repo_id, ops, revision=revision,
                                     commit_message=message or f"rwkv-state push: {saved.state.arch} state for "
                                                               f"{base.label} ({base.sha256[:12]})")
    return PushResult(repo_id, str(url), info.oid, saved.files, base, saved.warnings)


# ---------------------------------------------------------------- pull


@dataclass(frozen=True)
class PullResult:
    path: Path
    manifest: dict[str, Any]
    commit: str | None
    warnings: list[str]


def _download(repo_id: str, filename: str, revision: str | None, token: str | None, endpoint: str | None) -> Path:
    with _hub_errors(repo_id, token, filename):
        return Path(hf_hub_download(repo_id, filename, revision=revision, token=token, endpoint=endpoint))


def _forget(path: Path) -> None:
    """Drop a bad file from huggingface_hub's cache (the snapshot link and the blob it points to), so the next
    pull downloads it afresh instead of trusting it."""
    blob = path.resolve()
    for p in (path, blob):
        with contextlib.suppress(OSError):
            p.unlink()


def _matches_etag(path: Path) -> bool:
    """huggingface_hub names a cached blob by the file's ETag: the git blob sha1 of a file kept in git, the
    sha256 of an LFS file. Check the bytes against it (the manifest has no other checksum)."""
    etag, data = path.resolve().name, path.read_bytes()
    if re.fullmatch(r"[0-9a-f]{40}", etag):
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest() == etag
    if re.fullmatch(r"[0-9a-f]{64}", etag):
        return sha256_bytes(data) == etag
    return True  # a cache without symlinks: nothing to compare with


def _verified(path: Path, entry: dict[str, Any], where: str) -> None:
    size = path.stat().st_size
    digest = sha256_file(path, use_cache=False)
    if size != entry["size"] or digest != entry["sha256"]:
        _forget(path)
        raise HubError(f"{where}: the download does not match the manifest (sha256 {digest[:12]}, "
                       f"{size} bytes; expected {entry['sha256'][:12]}, {entry['size']} bytes): it was "
                       "corrupted on the way and has been removed from the cache; run again")


def _read_repo_manifest(repo_id: str, revision: str | None, token: str | None,
                        endpoint: str | None) -> tuple[dict[str, Any], str | None]:
    """The repo's manifest, verified against its ETag, and the commit it came from."""
    try:
        manifest_path = _download(repo_id, MANIFEST, revision, token, endpoint)
    except HubEntryNotFoundError:
        raise HubError(f"{repo_id}: not an rwkv-state repo (it has no {MANIFEST}); push states with "
                       "`rwkv-state push`") from None
    if not _matches_etag(manifest_path):
        _forget(manifest_path)
        raise HubError(f"{repo_id}/{MANIFEST}: the download does not match its ETag: it was corrupted on the "
                       "way and has been removed from the cache; run again")
    commit = manifest_path.parent.name if _COMMIT.match(manifest_path.parent.name) else revision
    return read_manifest(manifest_path, f"{repo_id}/{MANIFEST}"), commit


def _check_made_for(repo_id: str, manifest: dict[str, Any], model: str | os.PathLike | ModelSpec, force: bool,
                    token: str | None, endpoint: str | None) -> tuple[ModelSpec | None, list[str]]:
    """The repo's base model against `model`, by sha256 (an hf:// model: from the Hub, without downloading it);
    the model's spec when it is a local file, and the mismatch `force` let through, if any."""
    made_for = manifest["base_model_sha256"]
    base_model = manifest.get("base_model")
    made_for_name = (base_model.get("name") if isinstance(base_model, dict) else None) or "another model"
    spec = None
    if isinstance(model, ModelSpec) or parse_hf_url(str(model)) is None:
        spec = model if isinstance(model, ModelSpec) else read_spec(model)
    have = model_identity(spec or model, token=token, endpoint=endpoint)
    if have.sha256 == made_for:
        return spec, []
    recorded = fingerprint_of(manifest.get("base_model_fingerprint"))
    if spec is not None and recorded and spec.fingerprint == recorded:
        return spec, [same_weights_note(repo_id, made_for_name, spec.name, f"{recorded[:20]}...")]
    problem = f"{repo_id}: made for {made_for_name} (sha256 {made_for[:12]}), but {have.label} has sha256 " \
              f"{have.sha256[:12]}"
    if not force:
        raise ModelMismatchError(f"{problem} (pass {option('force', True)} to use it anyway)")
    return spec, [problem]


def _fetch_entry(repo_id: str, manifest: dict[str, Any], role: str, commit: str | None, token: str | None,
                 endpoint: str | None, max_bytes: int | None) -> tuple[Path, dict[str, Any], State]:
    """Download one file the manifest lists, verify its bytes, and read it as a state."""
    entry = manifest["files"].get(role)
    if entry is None:
        have = ", ".join(EXPORT_FORMATS[r] for r in manifest["files"] if r in REPO_FILES)
        raise HubEntryNotFoundError(f"{repo_id}: no {EXPORT_FORMATS[role]} file in this repo (it has: {have})")
    where = f"{repo_id}/{entry['path']}"
    if max_bytes is not None and entry["size"] > max_bytes:
        raise InvalidStateError(f"{where}: {entry['size'] >> 20} MB says the manifest, over the {max_bytes >> 20} MB "
                                "taken here; not downloaded")
    path = _download(repo_id, entry["path"], commit, token, endpoint)
    _verified(path, entry, where)
    state = load_state(path, name=where)
    recorded, made_for = state.base_model_sha256, manifest["base_model_sha256"]
    if recorded and recorded != made_for:  # a native or ai00 file says itself which model it was made for
        raise InvalidStateError(f"{where}: the file records base model sha256 {recorded[:12]}, but the repo's "
                                f"{MANIFEST} says {made_for[:12]}: the repo is inconsistent; not using it")
    return path, entry, state


def pull_state(repo_id: str, model: str | os.PathLike | ModelSpec | None = None, *, fmt: str = "safetensors",
               output: str | os.PathLike | None = None, revision: str | None = None, force: bool = False,
               token: str | None = None, endpoint: str | None = None, max_bytes: int | None = None) -> PullResult:
    """`pull` with everything it learned: the manifest, the commit, and the warnings `force` let through.
    With `max_bytes`, a state the manifest says is larger is refused before it is downloaded."""
    endpoint = _endpoint(endpoint)
    repo_id, revision = _split_revision(repo_id, revision)
    role = ROLE_OF_FORMAT.get(FORMAT_ALIASES.get(fmt, fmt))
    if role is None:
        raise InvalidOptionError(f"{option('fmt', fmt)}: choose one of {', '.join(PULL_FORMATS)}")
    manifest, commit = _read_repo_manifest(repo_id, revision, token, endpoint)
    spec, warnings = (None, []) if model is None else _check_made_for(repo_id, manifest, model, force, token,
                                                                      endpoint)
    path, entry, state = _fetch_entry(repo_id, manifest, role, commit, token, endpoint, max_bytes)
    if spec is not None:
        labelled = State(state.wkv, state.shift, {**state.metadata, "arch": manifest.get("arch")}, state.source)
        broken = labelled.problems(spec, identity=False)
        if broken:
            raise ModelMismatchError(broken[0])
    if output is not None:
        out = Path(output)
        out = out / entry["path"] if out.is_dir() else out
        with atomic_path(out) as tmp:
            shutil.copyfile(path, tmp)
            _verified(tmp, entry, state.source)
        path = out
    return PullResult(path, manifest, commit, warnings)


def pull(repo_id: str, model: str | os.PathLike | ModelSpec | None = None, *, fmt: str = "safetensors",
         output: str | os.PathLike | None = None, revision: str | None = None, force: bool = False,
         token: str | None = None, endpoint: str | None = None, max_bytes: int | None = None) -> Path:
    """Download a state (huggingface_hub's cache, resumable), verify every byte against the manifest, check it
    was made for `model` (local path, hf://owner/repo/file.pth or a ModelSpec; None skips that check), and
    return the local path of the file in format `fmt` ("safetensors" | "pth" | "ai00")."""
    return pull_state(repo_id, model, fmt=fmt, output=output, revision=revision, force=force, token=token,
                      endpoint=endpoint, max_bytes=max_bytes).path


def model_card(repo_id: str, *, revision: str | None = None, token: str | None = None,
               endpoint: str | None = None, max_bytes: int = MAX_CARD_BYTES) -> str:
    """The README.md text of a state repo (for the demo to show): UTF-8 text of at most `max_bytes`, or one
    StateHubError line (a card is a stranger's file: its size is checked before it is read)."""
    endpoint = _endpoint(endpoint)
    repo_id, revision = _split_revision(repo_id, revision)
    path = _download(repo_id, "README.md", revision, token, endpoint)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise HubError(f"{repo_id}/README.md: {size >> 10} KB, over the {max_bytes >> 10} KB shown")
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise HubError(f"{repo_id}/README.md: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise HubError(f"{repo_id}/README.md: cannot be read ({os_reason(e) or type(e).__name__})") from None


# ---------------------------------------------------------------- search


@dataclass(frozen=True)
class StateRecord:
    """One state repo found for a base model."""

    repo_id: str
    arch: str | None
    dims: str | None
    base_model_sha256: str
    downloads: int | None
    likes: int | None
    last_modified: datetime | None
    private: bool | None
    match: str = "file"  # "file": made for this very file (sha256); "weights": for another file of the same weights


def search(model: str | os.PathLike | ModelSpec | None = None, *, sha256: str | None = None,
           token: str | None = None, endpoint: str | None = None, limit: int = 100) -> list[StateRecord]:
    """The states made for exactly one base model (a local file, hf://owner/repo/file.pth, a ModelSpec, or its
    sha256), through the Hub's own search on the hash tag; for a local model also on its weights tag, which
    finds the states made for any other file form of the same weights (`match` says which)."""
    endpoint = _endpoint(endpoint)
    if (model is None) == (sha256 is None):
        raise InvalidOptionError(f"search needs exactly one of {option('model')} and {option('sha256')}")
    digest = check_sha256(sha256) if sha256 is not None else model_identity(model, token=token,
                                                                            endpoint=endpoint).sha256
    tags = {hash_tag(digest): "file"}
    spec = model if isinstance(model, ModelSpec) else None
    if model is not None and spec is None and parse_hf_url(str(model)) is None:
        spec = read_spec(model)
    if spec is not None and spec.fingerprint:
        tags[weights_tag(spec.fingerprint)] = "weights"
    records: dict[str, StateRecord] = {}
    for tag, match in tags.items():
        with _hub_errors("search", token):
            found = list(HfApi(endpoint=endpoint).list_models(
                filter=tag, limit=limit, token=token,
                expand=["cardData", "downloads", "likes", "lastModified", "private", "tags"]))
        for info in found:
            if tag in (info.tags or []) and info.id not in records:  # the card, not only the Hub's index, says so
                records[info.id] = _record(info, digest, match)
    return list(records.values())


def _record(info, digest: str, match: str) -> StateRecord:
    card = info.card_data.to_dict() if info.card_data is not None else {}
    meta = card.get("rwkv_state") if isinstance(card.get("rwkv_state"), dict) else {}
    dims = None
    if all(isinstance(meta.get(k), int) for k in ("n_layer", "n_head", "head_size")):
        dims = f"{meta['n_layer']} layers x {meta['n_head']} heads x {meta['head_size']}"
    made_for = meta.get("base_model_sha256") if match == "weights" else digest
    made_for = made_for if isinstance(made_for, str) else digest
    return StateRecord(info.id, meta.get("arch"), dims, made_for, info.downloads, info.likes, info.last_modified,
                       info.private, match)

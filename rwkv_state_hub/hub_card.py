"""What a state repo on the Hub holds besides the state: the manifest (machine-readable, keyed to the base
model's sha256, every file's sha256) and the model card (for people, and for the Hub's own search).

The hash travels as a card tag, `base-sha256:<64 lower-case hex>`, so that `list_models(filter=tag)`
finds every state made for one exact checkpoint without an index service of ours.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from . import __version__
from .errors import InvalidOptionError, InvalidStateError, option
from .files import sha256_file
from .state import FORMAT_VERSION, State, check_types, json_type, load_json

MANIFEST = "rwkv-state.json"
MANIFEST_FORMAT = "rwkv-state-hub/state-repo"
# format name (as `pull --format` says it) -> file name in the repo, and the export format that writes it
# manifest role -> file name in the repo, and the format that writes it. The role of our own file is "native" in
# every manifest already on the Hub; users name that format "safetensors", as everywhere else.
REPO_FILES = {"native": "state.safetensors", "pth": "state.pth", "ai00": "state.st"}
EXPORT_FORMATS = {"native": "safetensors", "pth": "pth", "ai00": "ai00"}
ROLE_OF_FORMAT = {fmt: role for role, fmt in EXPORT_FORMATS.items()}
LOSS_PLOT = "loss.png"
HASH_TAG_PREFIX = "base-sha256:"
WEIGHTS_TAG_PREFIX = "base-weights:"  # + the fingerprint's hex: the same tag on every file form of the weights
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_FINGERPRINT = re.compile(r"^rwkvfp1:[0-9a-f]{64}$")
MAX_MANIFEST_BYTES = 1 << 20
MAX_MANIFEST_FILES = 16  # native, pth, ai00, plot today
MAX_NAME_BYTES = 255  # what a file system takes as one name
MANIFEST_TYPES: dict[str, type] = {
    "format": str, "format_version": int, "created_with": str, "arch": str, "n_layer": int, "n_embd": int,
    "n_head": int, "head_size": int, "token_shift": bool, "base_model_sha256": str, "base_model_fingerprint": str,
    "base_model": dict, "files": dict, "training": dict,
}
BASE_MODEL_TYPES: dict[str, type] = {"sha256": str, "name": str, "size": int, "repo": str, "file": str}
FILE_ENTRY_TYPES: dict[str, type] = {"path": str, "size": int, "sha256": str}


@dataclass(frozen=True)
class BaseModel:
    """The base checkpoint a state belongs to: its sha256 always; name, size, Hub repo and file when known."""

    sha256: str
    name: str | None = None
    size: int | None = None
    repo: str | None = None
    file: str | None = None

    @property
    def label(self) -> str:
        return self.name or (f"{self.repo}/{self.file}" if self.repo else f"sha256 {self.sha256[:12]}")

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in {"sha256": self.sha256, "name": self.name, "size": self.size, "repo": self.repo,
                                  "file": self.file}.items() if v is not None}


def check_sha256(text: str, what: str | None = None) -> str:
    """A sha256 as lower-case hex, or one clear line."""
    value = text.strip().lower()
    if not _HEX64.match(value):
        error = InvalidStateError if what else InvalidOptionError  # a file's field, or the caller's parameter
        raise error(f"{what or option('sha256')} {text!r}: expected 64 hexadecimal digits (the sha256 of the base "
                    "model file)")
    return value


def weights_tag(fingerprint: str) -> str:
    """The Hub tag that carries a base model's weights fingerprint (what search also filters on)."""
    return WEIGHTS_TAG_PREFIX + fingerprint.removeprefix("rwkvfp1:")


def fingerprint_of(value: object) -> str | None:
    """A recorded fingerprint, if it is one (a stranger's manifest may hold anything there)."""
    return value if isinstance(value, str) and _FINGERPRINT.match(value) else None


def hash_tag(sha256: str) -> str:
    """The Hub tag that carries a base model's hash (what search filters on)."""
    return HASH_TAG_PREFIX + check_sha256(sha256)


def arch_tag(arch: str) -> str:
    return "rwkv-" + arch.replace(".", "-").replace("v5-2", "v5")


def build_manifest(state: State, base: BaseModel, files: dict[str, Path]) -> dict[str, Any]:
    """The manifest for a folder about to be pushed: `files` maps a role (native/pth/ai00/plot) to its path."""
    return {
        "format": MANIFEST_FORMAT,
        "format_version": FORMAT_VERSION,
        "created_with": f"rwkv-state-hub {__version__}",
        "arch": state.arch,
        "n_layer": state.n_layer,
        "n_embd": state.n_embd,
        "n_head": state.n_head,
        "head_size": state.head_size,
        "token_shift": state.shift is not None,
        "base_model_sha256": base.sha256,
        "base_model_fingerprint": fingerprint_of(state.metadata.get("base_model_fingerprint")),
        "base_model": base.to_dict(),
        "files": {role: {"path": path.name, "sha256": sha256_file(path, use_cache=False), "size": path.stat().st_size}
                  for role, path in files.items()},
        "training": state.metadata.get("training") or {},
    }


def read_manifest(path: str | Path, where: str) -> dict[str, Any]:
    """Parse and check a downloaded manifest; `where` names it in messages (repo/file). Bounded in size, depth
    and number of files, every field we read type-checked: a stranger's repo gets one line, not a traceback."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as e:
        raise InvalidStateError(f"{where}: not a readable rwkv-state manifest ({e.strerror or e})") from None
    m = load_json(data, f"{where}: manifest", MAX_MANIFEST_BYTES)
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
        found = m.get("format") if isinstance(m, dict) else None
        raise InvalidStateError(f"{where}: not an rwkv-state manifest (format is {found!r:.80})")
    check_types(m, MANIFEST_TYPES, where)
    check_types(m.get("base_model") or {}, BASE_MODEL_TYPES, where, "base_model.")
    if m.get("format_version") is None:
        raise InvalidStateError(f"{where}: the manifest has no format_version")
    if m["format_version"] > FORMAT_VERSION:
        raise InvalidStateError(f"{where}: manifest format version {m['format_version']} is newer than this "
                                f"rwkv-state-hub understands ({FORMAT_VERSION}); upgrade rwkv-state-hub")
    check_sha256(str(m.get("base_model_sha256")), f"{where}: base_model_sha256")
    files = m.get("files")
    if not files or "native" not in files:
        raise InvalidStateError(f"{where}: the manifest lists no native state file")
    if len(files) > MAX_MANIFEST_FILES:
        raise InvalidStateError(f"{where}: the manifest lists {len(files)} files, over {MAX_MANIFEST_FILES}")
    for role, entry in files.items():
        _check_entry(role, entry, where)
    return m


def _plain_name(name: str) -> bool:
    """One file name in the repo's top folder: printable (no NUL, line breaks or lone surrogates), no separator,
    not hidden (so not . or ..), not the manifest, at most MAX_NAME_BYTES in UTF-8."""
    return (name.isprintable() and "/" not in name and "\\" not in name and not name.startswith(".")
            and name != MANIFEST and 0 < len(name.encode("utf-8")) <= MAX_NAME_BYTES)


def _check_entry(role: str, entry: Any, where: str) -> None:
    """One `files` entry of a manifest: a plain role and path, a size and a sha256; one line otherwise."""
    if not _plain_name(role):
        raise InvalidStateError(f"{where}: the manifest lists a file under {role!r:.60}, not a plain name")
    at = f"{where}: damaged entry for the {role} file"
    if not isinstance(entry, dict):
        raise InvalidStateError(f"{at}: expected an object, found {json_type(entry)}")
    missing = next((k for k in FILE_ENTRY_TYPES if entry.get(k) is None), None)
    if missing:
        raise InvalidStateError(f"{at}: it has no {missing}")
    check_types(entry, FILE_ENTRY_TYPES, at)
    if not _plain_name(entry["path"]):
        raise InvalidStateError(f"{at}: path {entry['path']!r:.80} is not a plain file name")
    if entry["size"] < 0 or not _HEX64.match(entry["sha256"]):
        raise InvalidStateError(f"{at}: needs a size of 0 or more and a sha256 of 64 lower-case hex digits")


# ---------------------------------------------------------------- the model card


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return str(value)


def _training_section(training: dict[str, Any], has_plot: bool) -> list[str]:
    if not training and not has_plot:
        return []
    lines = ["## Training", ""]
    rows = [(k, v) for k, v in training.items() if k != "hyperparameters" and not isinstance(v, dict)
            and not (isinstance(v, list) and v and isinstance(v[0], dict))]
    if rows:
        lines += ["| | |", "|---|---|"] + [f"| {k.replace('_', ' ')} | {_fmt(v)} |" for k, v in rows] + [""]
    hyper = training.get("hyperparameters")
    if isinstance(hyper, dict) and hyper:
        shown = ", ".join(f"`{k}={_fmt(v)}`" for k, v in hyper.items() if v is not None)
        lines += [f"Hyperparameters: {shown}", ""]
    parents = training.get("parents")
    if isinstance(parents, list) and parents:
        lines += ["Mixed from: " + ", ".join(f"{p.get('file')} x {p.get('weight')}" for p in parents
                                            if isinstance(p, dict)), ""]
    if has_plot:
        lines += [f"![training and validation loss]({LOSS_PLOT})", ""]
    return lines


def _usage_section(repo_id: str, arch: str, base: BaseModel, formats: list[str]) -> list[str]:
    model = f"hf://{base.repo}/{base.file}" if base.repo and base.file else f"path/to/{base.name or 'BASE'}.pth"
    local = f"{base.name or 'BASE'}.pth" if not base.file else Path(base.file).name
    name = repo_id.split("/")[-1]
    lines = [
        "## Usage", "",
        f"Every file here was made for exactly one base model file, sha256 `{base.sha256}`. "
        "`rwkv-state pull` checks that against the model you have and verifies every download:", "",
        "```bash", "pip install rwkv-state-hub",
        f"rwkv-state pull {repo_id} --model {model} -o {name}.safetensors",
        f"rwkv-state search --sha256 {base.sha256}   # other states for the same model", "```", "",
        "### `rwkv` pip package", "",
        "```python",
    ]
    if arch == "v7":
        lines += ["import os; os.environ[\"RWKV_V7_ON\"] = \"1\"   # before importing rwkv"]
    lines += [
        "from rwkv.model import RWKV",
        "from rwkv_state_hub import load_state, pip_state, pull",
        f"state = load_state(pull(\"{repo_id}\", \"{model}\"))",
        f"model = RWKV(\"{local.removesuffix('.pth')}\", \"cpu fp32\")",
        "out, s = model.forward(tokens, pip_state(state))   # every sequence starts from this state",
        "```", "",
    ]
    if arch == "v7":
        lines += ["(The pip package's RWKV-7 ignores `time_state` keys in a model file: pass the state list as "
                  "above.)", ""]
    else:
        lines += ["Or merge it into the model file, which pip then starts every `forward(tokens, None)` from: "
                  f"`rwkv-state export {name}.safetensors --format merged --model {local} -o merged.pth`.", ""]
    if "pth" in formats:
        lines += ["### RWKV Runner", "",
                  f"`rwkv-state pull {repo_id} --model {model} --format pth -o RWKV-Runner/state-models/{name}.pth`, "
                  "then pick it as the state in Runner's configuration (or `POST /update-config` with "
                  f"`\"state\": \"state-models/{name}.pth\"`).", ""]
    if "ai00" in formats:
        lines += ["### Ai00", "",
                  f"`rwkv-state pull {repo_id} --model {model} --format ai00 -o assets/models/{name}.st` "
                  "(beside the model), then in Ai00's config:", "",
                  "```toml", "[[state]]", f"path = \"{name}.st\"", f"name = \"{name}\"", "default = true", "```", ""]
    return lines


def render_card(repo_id: str, state: State, manifest: dict[str, Any], base: BaseModel) -> str:
    """README.md of a state repo: Hub metadata (base_model, tags incl. the hash tag) and a page worth reading."""
    arch = state.arch or "unknown"
    data = ModelCardData(
        base_model=base.repo,
        library_name="rwkv-state-hub",
        tags=["rwkv", "rwkv-state", arch_tag(arch), hash_tag(base.sha256)]
        + ([weights_tag(manifest["base_model_fingerprint"])] if manifest.get("base_model_fingerprint") else []),
        rwkv_state={"arch": arch, "n_layer": state.n_layer, "n_head": state.n_head, "head_size": state.head_size,
                    "base_model_sha256": base.sha256},
    )
    files = manifest["files"]
    formats = [role for role in files if role in REPO_FILES]
    size = f", {base.size:,} bytes" if base.size else ""
    where = f" from [{base.repo}](https://huggingface.co/{base.repo})" if base.repo else ""
    lines = [
        f"# {repo_id.split('/')[-1]}", "",
        f"An RWKV {arch} state-tuning state ({state.dims()}"
        f"{', with token shift' if state.shift is not None else ''}) for the base model "
        f"`{base.file or base.name or 'unknown'}`{where}{size}, sha256 `{base.sha256}`. "
        "It is the model's initial recurrent state, learned with every weight frozen: no extra inference cost.", "",
    ]
    lines += _training_section(state.metadata.get("training") or {}, "plot" in files)
    consumers = {"native": "rwkv-state-hub (fp32, full metadata)", "pth": "RWKV Runner, RWKV-PEFT, `rwkv` pip",
                 "ai00": "Ai00 / web-rwkv (F16, [H, K, V])", "plot": "loss curve"}
    lines += ["## Files", "", "| file | for | sha256 |", "|---|---|---|"]
    lines += [f"| `{e['path']}` | {consumers.get(role, role)} | `{e['sha256'][:16]}...` |" for role, e in files.items()]
    lines += [f"| `{MANIFEST}` | machine-readable: base model, dims, every file's sha256 | |", ""]
    lines += _usage_section(repo_id, arch, base, formats)
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)))

"""Ai00's rules for a state, `Config.toml` editing that keeps the user's file as it was, and a chat client.

What Ai00 (ai00_server 0.6, web-rwkv 0.10) does with a state:
- `[[state]]` tables in its Config.toml (default `assets/configs/Config.toml`, relative to the folder it runs in):
  `path` relative to `[model] path` (default "assets/models"), never containing "..", `id` a UUID (random when
  absent), `name` (optional), `default` (used when a request names no state);
- reads each file as safetensors whatever its extension, and `blocks.{i}.att.time_state` for every layer of the
  model, each F16 exactly (bf16/f32: "data type mismatch", state skipped) and shaped [H, N, N] read as
  [head, key, value] for v5, v6 and v7 alike; extra tensors are ignored;
- a listed file that is missing or not valid safetensors makes the whole model reload fail: so the file is
  validated before the entry that points at it is written;
- per request, `state` on the OpenAI-style endpoints (`/api/oai/v1/chat/completions`) picks a state by UUID.
"""

from __future__ import annotations

import os
import re
import tomllib
import uuid
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import tomlkit

from rwkv_state_hub.errors import ConsumerError, InvalidOptionError, ModelMismatchError, StateHubError, option
from rwkv_state_hub.files import atomic_path, atomic_write_bytes
from rwkv_state_hub.formats import export_state, format_notes, time_state_key

from .. import post_json, resolve_state, state_stem

if TYPE_CHECKING:
    import torch

    from rwkv_state_hub.checkpoint import ModelSpec
    from rwkv_state_hub.state import State

CONFIG = Path("assets/configs/Config.toml")
DEFAULT_MODEL_FOLDER = "assets/models"
DEFAULT_URL = "http://127.0.0.1:65530"
CHAT_PATH = "/api/oai/v1/chat/completions"
SERVER = "Ai00"

_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def ai00_problems(path: str | os.PathLike, n_layer: int, n_head: int, head_size: int) -> list[str]:
    """Why Ai00 would fail on (or skip) this file as a state for a model of these dims; [] when it loads it."""
    import torch
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - anything safetensors cannot read fails Ai00's whole reload
        return [f"not valid safetensors ({str(e).splitlines()[0][:160]}): Ai00 would fail to reload the model"]
    out = []
    for i in range(n_layer):
        t = tensors.get(time_state_key(i))
        if t is None:
            out.append(f"no {time_state_key(i)}")
        elif t.dtype != torch.float16:
            out.append(f"{time_state_key(i)} is {t.dtype}, Ai00 reads only F16 (\"data type mismatch\")")
        elif tuple(t.shape) != (n_head, head_size, head_size):
            want = [n_head, head_size, head_size]
            out.append(f"{time_state_key(i)} has shape {list(t.shape)}, the model needs {want}")
    return out


def wkv_as_ai00_reads_it(tensor: torch.Tensor) -> torch.Tensor:
    """One file tensor [H, K, V] F16 back into our [H, V, K] fp32 layout."""
    return tensor.float().transpose(1, 2).contiguous()


# ---------------------------------------------------------------- Config.toml


def config_path(ai00_dir: str | os.PathLike, config: str | os.PathLike | None = None) -> Path:
    path = Path(config) if config else Path(ai00_dir) / CONFIG
    if not path.is_file():
        raise ConsumerError(f"{path}: no such file; is {ai00_dir} Ai00's folder? (or pass {option('config')})")
    return path


def read_config(path: Path) -> tomlkit.TOMLDocument:
    try:
        return tomlkit.parse(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ConsumerError(f"{path}: cannot read ({e})") from None
    except tomlkit.exceptions.ParseError as e:
        raise ConsumerError(f"{path}: not valid TOML ({e})") from None
    except RecursionError:
        raise ConsumerError(f"{path}: not valid TOML (nested too deeply)") from None


def model_folder(ai00_dir: str | os.PathLike, doc: tomlkit.TOMLDocument) -> Path:
    """`[model] path`, relative to the folder Ai00 runs in."""
    model = doc.get("model") or {}
    folder = model.get("path", DEFAULT_MODEL_FOLDER) if isinstance(model, dict) else None
    if not isinstance(folder, str):
        raise ConsumerError(f"{ai00_dir}: Ai00's config has no [model] table with a path string")
    folder = Path(folder)
    return folder if folder.is_absolute() else Path(ai00_dir) / folder


def ai00_model_spec(model_file: Path) -> ModelSpec | None:
    """Ai00's safetensors model as a ModelSpec from its header alone: architecture and dims, no sha256 (the file is
    not the .pth a state records), vocab_size and n_ffn 0 (unknown); None if unreadable."""
    from safetensors import safe_open

    from rwkv_state_hub.checkpoint import ModelSpec

    try:
        with safe_open(str(model_file), framework="pt") as f:
            keys = set(f.keys())
            n_layer = 1 + max(int(m.group(1)) for k in keys if (m := _BLOCK.match(k)))
            head_key = next((k for k in ("blocks.0.att.r_k", "blocks.0.att.time_first", "blocks.0.att.time_faaaa")
                             if k in keys), None)
            if head_key is None:
                return None
            H, N = f.get_slice(head_key).get_shape()[:2]
    except Exception:  # noqa: BLE001 - a .prefab or foreign file: we just cannot check against it
        return None
    if head_key.endswith("r_k"):
        arch = "v7"
    elif keys & {"blocks.0.att.time_mix_w1", "blocks.0.att.time_maa_w1"}:
        arch = "v6"
    else:
        arch = "v5.2"
    return ModelSpec(arch, n_layer, n_embd=H * N, n_head=H, head_size=N, n_ffn=0, vocab_size=0)


def _same_file(folder: Path, listed: str, file_name: str) -> bool:
    """Does a `[[state]]` path (relative to the model folder, or absolute) name `file_name` in `folder`?"""
    path = Path(PurePosixPath(listed.replace("\\", "/")))
    return (folder / path).resolve() == (folder / file_name).resolve()


def state_entries(doc: tomlkit.TOMLDocument, path: Path) -> list[dict[str, Any]]:
    """The `[[state]]` tables, checked to be a list of tables."""
    entries = doc.get("state", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ConsumerError(f"{path}: `state` is not a list of [[state]] tables")
    return entries


def state_id(ai00_dir: str | os.PathLike, name_or_id: str, config: str | os.PathLike | None = None) -> str:
    """The UUID of a state named in Ai00's Config.toml (a UUID is returned as is)."""
    try:
        return str(uuid.UUID(name_or_id))
    except ValueError:
        pass
    path = config_path(ai00_dir, config)
    for e in state_entries(read_config(path), path):
        if name_or_id in (str(e.get("name", "")), Path(str(e.get("path", ""))).name) and e.get("id"):
            return str(e["id"])
    raise ConsumerError(f"{path}: no [[state]] named {name_or_id!r} with an id")


# ---------------------------------------------------------------- install


@dataclass
class Installed:
    """What `install` did, for the command to say."""

    path: Path
    config: Path
    id: str
    name: str
    notes: list[str] = field(default_factory=list)


def install(state_or_repo: str | os.PathLike, ai00_dir: str | os.PathLike, config: str | os.PathLike | None = None,
            model: str | os.PathLike | None = None, name: str | None = None, force: bool = False) -> Installed:
    """Write STATE as an F16 [H, K, V] safetensors file into Ai00's model folder and add its `[[state]]` entry.

    `model` (the base .pth, optional) checks the state's base-model sha256; the state's shape is always checked
    against the model Ai00 is configured with when its header can be read.
    """
    from rwkv_state_hub.checkpoint import read_spec

    cfg = config_path(ai00_dir, config)
    doc = read_config(cfg)
    folder = model_folder(ai00_dir, doc)
    if not folder.is_dir():
        raise ConsumerError(f"{cfg}: [model] path is {folder}, which is not a folder")
    spec = read_spec(model) if model else None
    state = resolve_state(state_or_repo, spec, force)
    notes = state.check(spec, force=force) if spec else []
    if spec:
        state = state.with_model(spec)
    model_name = str((doc.get("model") or {}).get("name", ""))
    notes += _check_against_ai00s_model(state, folder, model_name, force)
    stem = state_stem(state_or_repo)
    model_stem = Path(model_name).stem if model_name else state.metadata.get("base_model_name")
    file_name = f"{stem}--for-{model_stem}.st" if model_stem else f"{stem}.st"
    entry_name = name or stem
    _refuse_a_duplicate(doc, cfg, folder, file_name, entry_name)
    target = folder / file_name
    if target.exists():
        notes.append(f"replaced {target}, which no [[state]] entry named")
    with atomic_path(target) as tmp:
        export_state(state, tmp, "ai00")  # refuses non-finite values
        notes += format_notes(state, "ai00")  # a token shift left behind
        broken = ai00_problems(tmp, state.n_layer, state.n_head, state.head_size)
        if broken:
            raise ConsumerError(f"{target}: Ai00 would not load the file we wrote: {broken[0]}")
    new_id = str(uuid.uuid4())
    _add_entry(doc, {"path": file_name, "id": new_id, "name": entry_name, "default": False})
    text = tomlkit.dumps(doc)
    if not _reads_back(text, new_id):  # never leave Ai00 a config it cannot read
        target.unlink()
        raise RuntimeError(f"editing {cfg} produced TOML that does not read back; the file was left as it was")
    atomic_write_bytes(cfg, text.encode("utf-8"))
    return Installed(target, cfg, new_id, entry_name, notes)


def _check_against_ai00s_model(state: State, folder: Path, model_name: str, force: bool) -> list[str]:
    """State.check against the model Ai00 runs: by the weights fingerprint when the state records one (Ai00's
    .st holds the same weights as the .pth in another file), else by shape and architecture from its header;
    a note instead when that model cannot be read."""
    model_file = folder / model_name if model_name else None
    spec = _readable_model(model_file) if model_file and state.metadata.get("base_model_fingerprint") else None
    notes = []
    if spec is None:
        spec = ai00_model_spec(model_file) if model_file else None
        if spec is None:
            return [f"could not read the dims of Ai00's model {model_name or '(none configured)'}; "
                    "the state's shape was not checked against it"]
        notes.append(f"only the state's shape was checked against Ai00's model {model_name} (the state records "
                     "no weights fingerprint)")
    try:
        return state.check(spec, force=force) + notes
    except ModelMismatchError as e:
        raise ModelMismatchError(f"{e} (Ai00's model is {model_name})") from None


def _readable_model(model_file: Path):
    """Ai00's model read whole (a web-rwkv .st: see model_forms), or None when it cannot be (a .prefab)."""
    from rwkv_state_hub.checkpoint import read_spec

    try:
        return read_spec(model_file)
    except StateHubError:
        return None


def _refuse_a_duplicate(doc: tomlkit.TOMLDocument, cfg: Path, folder: Path, file_name: str, entry_name: str) -> None:
    entries = state_entries(doc, cfg)
    if entries and not isinstance(entries, tomlkit.items.AoT):
        raise ConsumerError(f"{cfg}: `state` is an inline array; write its entries as [[state]] tables to add one")
    for e in entries:
        if _same_file(folder, str(e.get("path", "")), file_name) or str(e.get("name", "")) == entry_name:
            raise ConsumerError(f"{cfg}: already has a [[state]] with path {e.get('path')!r} / name "
                                f"{e.get('name')!r} (id {e.get('id')}); remove it first, or pass another "
                                f"{option('name')}")


def _add_entry(doc: tomlkit.TOMLDocument, values: dict[str, Any]) -> None:
    """A `[[state]]` table at the end, formatted like the user's own entries."""
    entry = tomlkit.table()
    entry.update(values)
    entry.add(tomlkit.nl())  # a blank line before whatever table follows, as the user's own entries have
    if "state" in doc:
        doc["state"].append(entry)
    else:
        table_array = tomlkit.aot()
        table_array.append(entry)
        doc.append("state", table_array)


def _reads_back(text: str, new_id: str) -> bool:
    try:
        entries = tomllib.loads(text).get("state", [])
    except tomllib.TOMLDecodeError:
        return False
    return any(isinstance(e, dict) and e.get("id") == new_id for e in entries)


# ---------------------------------------------------------------- client


def chat(url: str, prompt: str | list[dict[str, str]], state: str | None = None, max_tokens: int = 256,
         timeout: float = 300.0, **options: Any) -> str:
    """One OpenAI-style chat completion from Ai00, starting from the state with UUID `state` (None: its default).

    `prompt` is the user's message, or a whole `messages` list; `options` go into the request as they are
    (temperature, top_p, stop, ...).
    """
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    body: dict[str, Any] = {"messages": messages, "max_tokens": max_tokens, "stream": False, **options}
    if state is not None:
        try:
            body["state"] = str(uuid.UUID(state))
        except ValueError:
            raise InvalidOptionError(f"{option('state', state)}: Ai00 picks a state by its UUID (the id in "
                                     "Config.toml)") from None
    reply = post_json(url.rstrip("/") + CHAT_PATH, body, SERVER, timeout)
    try:
        return reply["choices"][0]["message"]["content"]
    except (TypeError, KeyError, IndexError):
        raise ConsumerError(f"{SERVER} at {url} sent a reply without choices[0].message.content: "
                            f"{str(reply)[:160]}") from None

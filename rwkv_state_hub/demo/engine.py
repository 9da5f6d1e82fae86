"""What the demo page does, with no UI in it (and no gradio import anywhere below it).

`DemoEngine` holds what every visitor shares, read-only: the pip model, the tokenizer, and the states that fit
the model (from folders, training runs, files and Hub repos). Everything a visitor does (a conversation, an
upload, a baked state) lives in that visitor's session dict (`new_session()`), which the page keeps per
visitor, never in the engine. Text comes from generate's one sampler (through chat.PipRunner), so the same
seed and settings give the same text as `rwkv-state generate`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..chat import Conversation, PipRunner, side_by_side
from ..checkpoint import read_spec
from ..errors import FileAccessError, InvalidOptionError, InvalidStateError, ModelMismatchError, StateHubError
from ..files import os_reason
from ..formats import export_state, format_notes, load_state
from ..generate import DEFAULT_SAMPLING, Sampling
from ..pip_bridge import load_pip_model
from ..plot import NORM_SCALE, draw_heatmap, save_heatmap
from ..state import STATE_FILE, State
from ..tokenizer import get_tokenizer
from ..toolbox import bake, diff, diff_table
from ..training.checkpointing import CHECKPOINT
from ..training.config import EXPORT_NAMES
from .render import describe_state, one_line

MAX_UPLOAD_BYTES = 64 << 20
MAX_SCAN_BYTES = 512 << 20  # larger files in a --states folder are models, not states: not even opened
MAX_MERGED_BYTES = 512 << 20  # a merged export copies the whole model: written for small models only
MAX_PROMPT_CHARS = 32_000
MAX_OWN_STATES = 8  # uploaded and baked states a session keeps (up to 64 MB each): the oldest goes first
SCRATCH_TTL_S = 600  # a request's files, once Gradio has copied them to its own cache (when it answers)
STATE_SUFFIXES = (".safetensors", ".pth", ".pt", ".st", ".state")
NO_STATE = "(none)"
# what `rwkv-state train` writes into its run folder: one state (its final one), the state at the best validation
# loss, the final state again in other formats, and the resume file, which is no state at all
RUN_BEST = "best.safetensors"
RUN_FILES = frozenset({STATE_FILE, RUN_BEST, CHECKPOINT, *EXPORT_NAMES.values()})


@dataclass
class Offered:
    """A state the page offers: the state itself, where it came from, and its Hub model card if any."""

    state: State
    origin: str
    card: str | None = None
    notes: list[str] = field(default_factory=list)


def new_session() -> dict[str, Any]:
    """One visitor's own things: uploaded and baked states, and the conversation in progress."""
    return {"extra": {}, "chat": None}


def sampling(temperature: float, top_p: float, max_tokens: int, presence: float, frequency: float,
             seed: int | None) -> Sampling:
    """The page's sampling controls as the one sampler's settings (checked by Sampling itself)."""
    try:
        values = (float(temperature), float(top_p), int(max_tokens), float(presence), float(frequency),
                  int(seed or 0))
    except (TypeError, ValueError, OverflowError) as e:  # int() of nan, inf or text
        raise InvalidOptionError(f"bad sampling setting: {e}") from None
    return Sampling(*values)


def is_run(folder: Path) -> bool:
    """Whether `folder` is a training run's folder (what `rwkv-state train --out` writes)."""
    return any((folder / name).is_file() for name in (STATE_FILE, RUN_BEST, CHECKPOINT))


class DemoEngine:
    """The model, its tokenizer and the states that fit it: shared by every session, never written by one."""

    def __init__(self, model: str | os.PathLike, states: list[str] | tuple[str, ...] = (), *,
                 tokenizer: str | None = None, strategy: str = "cpu fp32",
                 max_upload_bytes: int = MAX_UPLOAD_BYTES, prompts: list[str] | None = None) -> None:
        from ..hub import resolve_model

        self.model_path = resolve_model(model)
        self.spec = read_spec(self.model_path)
        self.tokenizer = get_tokenizer(tokenizer, self.spec)
        self.strategy = strategy
        self.max_upload_bytes = max_upload_bytes
        self.prompts = prompts or ["W", "WE", "The"]
        self.states: dict[str, Offered] = {}
        self.skipped: list[str] = []
        for entry in states:
            self._add_entry(str(entry))
        self._runner: PipRunner | None = None
        self._runner_lock = threading.Lock()
        self._own_model = None
        self._lock = threading.Lock()
        self._workdir: tempfile.TemporaryDirectory | None = None  # made on first use, once signals are handled

    @property
    def runner(self) -> PipRunner:
        """The `rwkv` pip model that generates the page's text, loaded on first use (seconds: the registry alone
        needs none of it, and the page asks for it while it starts)."""
        with self._runner_lock:
            if self._runner is None:
                model = load_pip_model(self.model_path, self.strategy)
                self._runner = PipRunner(model, self.tokenizer, self.spec, self.strategy)
            return self._runner

    # ------------------------------------------------------------ states offered to everyone

    def _add_entry(self, entry: str) -> None:
        """One --states entry: a folder, a training run, a file or a Hub repo. Whatever in it cannot be offered
        (a file that does not fit, cannot be read or vanished; a repo that is missing, damaged or hostile) goes
        to `skipped` with its one-line reason, so that one bad third-party state never keeps the page from
        starting. Only an entry that is neither a path nor a repo id is refused: that is the caller's typo."""
        try:
            path = Path(entry).expanduser()
            if path.is_dir():
                self._add_folder(path, entry)
            elif path.is_file() and path.name == CHECKPOINT:
                self._skip(f"{entry}: a training checkpoint (resume file), not a state")
            elif path.is_file():
                self._add_file(path)
            else:
                self._add_hub(entry)
        except OSError as e:
            self._skip(f"{entry}: cannot be read ({_why(e)})")

    def _skip(self, reason: str) -> None:
        self.skipped.append(one_line(reason))

    def _add_folder(self, path: Path, entry: str) -> None:
        """A folder of states, a training run's folder, or a folder of runs (`runs/`, one level down)."""
        children = sorted(path.iterdir())
        run = is_run(path)
        runs = [p for p in children if p.is_dir() and is_run(p)]
        files = [p for p in children if p.suffix.lower() in STATE_SUFFIXES and p.is_file()
                 and not (run and p.name in RUN_FILES)]
        if not (run or runs or files):
            self._skip(f"{entry}: no state files ({', '.join(STATE_SUFFIXES)}) and no training runs in this folder")
        if run:
            self._add_run(path, entry)
        for folder in runs:
            self._add_run(folder, str(folder))
        for f in files:
            self._add_file(f)

    def _add_run(self, folder: Path, entry: str) -> None:
        """A training run: one entry named after its folder, for its final state (its best one while it has no
        final one). The exports are that same state again and checkpoint.pt is a resume file: not offered."""
        final, best = folder / STATE_FILE, folder / RUN_BEST
        name = Path(os.path.abspath(folder)).name or entry  # "." and "runs/x/" name their folder
        if final.is_file():
            notes = (f"the run folder also holds {RUN_BEST}, its state at the best validation loss",)
            self._add_file(final, label=name, origin=f"the training run {name}", notes=notes if best.is_file() else ())
        elif best.is_file():
            self._add_file(best, label=name, origin=f"the training run {name}",
                           notes=(f"{RUN_BEST}: the run has not written its final {STATE_FILE} yet",))
        else:
            self._skip(f"{entry}: a training run with no state yet (only {CHECKPOINT}, its resume file)")

    def _add_file(self, path: Path, label: str | None = None, origin: str = "a local file",
                  card: str | None = None, notes: tuple[str, ...] = ()) -> None:
        try:
            size = path.stat().st_size
            if size > MAX_SCAN_BYTES:
                self._skip(f"{path}: {size >> 20} MB, too big for a state (a model?)")
                return
            state = load_state(path)
            problems = state.problems(self.spec)
        except StateHubError as e:  # the readers' messages name the file
            self._skip(str(e))
            return
        except OSError as e:
            self._skip(f"{path}: cannot be read ({_why(e)})")
            return
        if problems:
            self._skip(problems[0])
            return
        label = one_line(label or path.name)
        if label in self.states:
            label = _unique(one_line(f"{path.parent.name}/{path.name}"), list(self.states))
        self.states[label] = Offered(state.with_model(self.spec), origin, card, [*self._notes(state), *notes])

    def _add_hub(self, entry: str) -> None:
        from .. import hub

        if not hub.is_repo_id(entry):
            raise InvalidOptionError(f"{entry}: no such file or folder, and not a Hub repo id (owner/name)")
        try:
            path = Path(hub.pull(entry, model=self.spec, max_bytes=MAX_SCAN_BYTES))
        except StateHubError as e:  # hub's messages name the repo, or its file
            self._skip(str(e))
            return
        try:
            card, notes = hub.model_card(entry), ()
        except StateHubError as e:  # the page then shows what the state's metadata says
            card, notes = None, (f"its model card is not shown: {e}",)
        self._add_file(path, label=f"hub: {entry}", origin=f"the Hub: {entry}", card=card, notes=notes)

    def _notes(self, state: State) -> list[str]:
        notes = []
        if not state.base_model_sha256:
            notes.append(f"{Path(state.source).name} does not record its base model; only its shape was checked")
        made_with = state.metadata.get("tokenizer")
        if made_with and made_with != self.tokenizer.name:
            notes.append(f"made with the {made_with} tokenizer; the page uses {self.tokenizer.name}")
        return notes

    # ------------------------------------------------------------ a session's view

    def labels(self, session: dict | None) -> list[str]:
        return list(self.states) + list((session or {}).get("extra", {}))

    def lookup(self, label: str | None, session: dict | None) -> Offered:
        """The state picked in the dropdown: one offered to all, or one of this session's own."""
        if not label or label == NO_STATE:
            raise InvalidOptionError("pick a state first (or upload one, or bake one)")
        found = self.states.get(label) or (session or {}).get("extra", {}).get(label)
        if found is None:
            raise InvalidOptionError(f"{label}: no such state here")
        return found

    def card(self, label: str | None, session: dict | None) -> str:
        """Markdown about a state: its Hub model card, or what its metadata says."""
        if not label or label == NO_STATE:
            return "No state picked."
        offered = self.lookup(label, session)
        return offered.card or describe_state(offered)

    def load_upload(self, path: str | os.PathLike, session: dict, name: str | None = None) -> tuple[str, list[str]]:
        """Validate an uploaded file (size, safe loading, shapes, base-model sha256) and keep it in the
        session: its label and notes. `name`: the file's own name (default: the path's), which every message
        uses: an upload's temporary path means nothing to the visitor."""
        path = Path(path)
        name = one_line(name or path.name)
        try:
            size = path.stat().st_size  # checked before a byte is read: the readers' cost is bounded by it
        except OSError as e:
            raise FileAccessError(f"{name}: the upload cannot be read ({_why(e)})") from None
        if size > self.max_upload_bytes:
            raise InvalidStateError(f"{name}: {size / 2**20:.1f} MB, over the {self.max_upload_bytes / 2**20:g} MB "
                                    "limit for uploads (a state is a few MB)")
        try:  # the reader names the file by `name`: an upload's temporary path means nothing to the visitor
            state = load_state(path, name=name)
        except OSError as e:
            raise FileAccessError(f"{name}: the upload cannot be read ({_why(e)})") from None
        problems = state.problems(self.spec)
        if problems:
            raise ModelMismatchError(problems[0])
        offered = Offered(state.with_model(self.spec), f"uploaded {name}", notes=self._notes(state))
        label = _unique(f"upload: {name}", self.labels(session))
        _keep(session, label, offered)
        return label, offered.notes

    # ------------------------------------------------------------ text: completion and chat

    def complete(self, prompt: str, label: str | None, settings: Sampling,
                 session: dict | None) -> Iterator[tuple[str, str]]:
        """`prompt` continued by the base model and from the picked state, side by side: both texts (prompt
        included) after each token, each column with its own sampler of the same settings and seed."""
        state = self.lookup(label, session).state
        _check_length(prompt, "prompt")
        for a, b in side_by_side(self.runner.complete(prompt, None, settings),
                                 self.runner.complete(prompt, state, settings)):
            yield prompt + a, prompt + b

    def preview(self) -> tuple[str, str]:
        """The first example prompt completed with the first state: what the page shows before any click."""
        labels = self.labels(None)
        if not labels:
            return "", ""
        *_, last = self.complete(self.prompts[0], labels[0], DEFAULT_SAMPLING, None)
        return last

    def chat(self, message: str, label: str | None, settings: Sampling,
             session: dict) -> Iterator[tuple[list[dict], list[dict]]]:
        """One chat turn in both columns, each continuing its own conversation's recurrent state: both
        histories ({"role", "content"} messages) after each token. Another state starts a new conversation."""
        state = self.lookup(label, session).state
        if not message or not message.strip():
            raise InvalidOptionError("the message is empty")
        _check_length(message, "message")
        conv = session.get("chat")
        if conv is None or conv["label"] != label:
            conv = session["chat"] = {"label": label, "base": Conversation(), "tuned": Conversation(),
                                      "history": ([], [])}
        hist_base, hist_tuned = conv["history"]
        user = {"role": "user", "content": message}
        a = b = ""
        for a, b in side_by_side(conv["base"].turn(self.runner, None, message, settings),
                                 conv["tuned"].turn(self.runner, state, message, settings)):
            yield hist_base + [user, _assistant(a)], hist_tuned + [user, _assistant(b)]
        hist_base += [user, _assistant(a)]
        hist_tuned += [user, _assistant(b)]
        yield hist_base, hist_tuned

    @staticmethod
    def clear_chat(session: dict) -> None:
        session["chat"] = None

    # ------------------------------------------------------------ bake, inspect

    def own_model(self):
        """Our own model, for baking (toolbox.bake): loaded on first use, memory-mapped."""
        with self._lock:
            if self._own_model is None:
                from ..model import load_model

                self._own_model = load_model(self.model_path)
            return self._own_model

    def bake(self, prompt: str, session: dict) -> tuple[str, list[Path], list[str]]:
        """Bake `prompt` into a state, keep it in the session, and write it in every export format:
        its label, the files, and notes (what a format cannot carry or why it was not written)."""
        if not prompt.strip():
            raise InvalidOptionError("the prompt is empty: nothing to bake")
        _check_length(prompt, "prompt")
        state = bake(self.own_model(), self.tokenizer, prompt)
        digest = state.metadata["training"]["prompt_sha256"][:10]
        state.source = f"baked-{digest}"
        out = self._scratch("bake-")
        files, notes = [], []
        for fmt, name in (("safetensors", f"baked-{digest}.safetensors"), ("pth", f"baked-{digest}.pth"),
                          ("ai00", f"baked-{digest}.st"), ("merged", f"{self.spec.name}-baked-{digest}.pth")):
            if fmt == "merged" and self.spec.arch != "v7" and (self.spec.file_size or 0) > MAX_MERGED_BYTES:
                notes.append(f"merged: not written here (it copies the {self.spec.file_size >> 20} MB model); "
                             "run rwkv-state export --format merged on your machine")
                continue
            try:
                files.append(export_state(state, out / name, fmt, base_model=self.model_path))
                notes += [f"{fmt}: {n}" for n in format_notes(state, fmt)]
            except StateHubError as e:
                notes.append(f"{fmt}: not written: {e}")
        preview = prompt if len(prompt) <= 60 else prompt[:57] + "..."
        label = _unique(f"baked: {preview!r}", self.labels(session))
        _keep(session, label, Offered(state, "baked on this page", notes=notes))
        return label, files, notes

    def inspect(self, a: str | None, b: str | None, session: dict) -> tuple[Any, str | None, str]:
        """Per-layer, per-head norms of state A as a heatmap; with B, the diff heatmap and its table."""
        sa = self.lookup(a, session).state
        image = draw_heatmap(sa.wkv.flatten(2).norm(dim=-1), f"norm of each head's state: {a}", NORM_SCALE)
        if not b or b == NO_STATE:
            return image, None, "Pick a second state to compare."
        d = diff(sa, self.lookup(b, session).state)
        path = self._scratch("diff-") / "diff.png"
        save_heatmap(d, path, "||A - B|| / max(||A||, ||B||) of each head's state")
        return image, str(path), f"A = {a}\nB = {b}\n||A - B|| / max(||A||, ||B||):\n\n{diff_table(d)}"

    def _scratch(self, prefix: str) -> Path:
        """A new folder for one request's files. Older ones are removed first: Gradio answered those requests
        with copies in its own cache, so on a long-running Space they would only fill the disk."""
        with self._lock:
            if self._workdir is None:
                self._workdir = tempfile.TemporaryDirectory(prefix="rwkv-state-demo-")
            workdir = Path(self._workdir.name)
        cutoff = time.time() - SCRATCH_TTL_S
        for old in workdir.iterdir():
            with contextlib.suppress(OSError):  # another request may be removing it at the same time
                if old.stat().st_mtime < cutoff:
                    shutil.rmtree(old)
        return Path(tempfile.mkdtemp(prefix=prefix, dir=workdir))

    def close(self) -> None:
        with self._lock:
            if self._workdir is not None:
                self._workdir.cleanup()
                self._workdir = None


def _check_length(text: str, what: str) -> None:
    if len(text) > MAX_PROMPT_CHARS:
        raise InvalidOptionError(f"the {what} has {len(text)} characters; the page takes up to {MAX_PROMPT_CHARS}")


def _assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def _unique(label: str, taken: list[str]) -> str:
    out, i = label, 2
    while out in taken:
        out, i = f"{label} ({i})", i + 1
    return out


def _keep(session: dict, label: str, offered: Offered) -> None:
    """Add a state to the session's own, dropping the oldest beyond MAX_OWN_STATES: memory stays bounded."""
    extra = session["extra"]
    extra[label] = offered
    while len(extra) > MAX_OWN_STATES:
        extra.pop(next(iter(extra)))


def _why(e: BaseException) -> str:
    return os_reason(e) or type(e).__name__

"""The demo page: the base model and a state side by side, in the `rwkv` pip package (what people run).

`DemoEngine` holds what every visitor shares, read-only: the pip model, the tokenizer, and the states that
fit the model (from folders, files and Hub repos). Everything a visitor does (a conversation, an upload, a
baked state) lives in that visitor's session (`gr.State`), never in the engine. `build_demo` lays out the page
over the engine; `app.py` and `rwkv-state demo` both start it through `create_demo` + `launch_demo`.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .chat import Conversation, PipRunner, side_by_side
from .checkpoint import read_spec
from .errors import StateHubError
from .examples import example_model, example_states
from .files import os_reason
from .formats import export_state, load_state
from .generate import DEFAULT_SAMPLING, Sampling
from .pip_bridge import load_pip_model
from .plot import NORM_SCALE, draw_heatmap, save_heatmap
from .state import State
from .tokenizer import get_tokenizer
from .toolbox import bake, diff, diff_table

MAX_UPLOAD_BYTES = 64 << 20
MAX_SCAN_BYTES = 512 << 20  # larger files in a --states folder are models, not states: not even opened
MAX_SHOWN_CHARS = 500  # one line of a stranger's text (a file name, a metadata value) on the page
MAX_MERGED_BYTES = 512 << 20  # a merged export copies the whole model: written for small models only
MAX_PROMPT_CHARS = 32_000
SESSION_TTL_S = 3600
MAX_OWN_STATES = 8  # uploaded and baked states a session keeps (up to 64 MB each): the oldest goes first
SCRATCH_TTL_S = 600  # a request's files, once Gradio has copied them to its own cache (when it answers)
STATE_SUFFIXES = (".safetensors", ".pth", ".pt", ".st", ".state")
EXAMPLE_MODEL = example_model()
EXAMPLE_STATES = example_states()
NO_STATE = "(none)"
# every Markdown component that shows text from files, the Hub or a visitor: Gradio's HTML sanitizer on (its
# default, said here so that it stays on), and no LaTeX, which a stranger's "$$...$$" would otherwise typeset
STRANGERS_TEXT = {"sanitize_html": True, "latex_delimiters": []}


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


class DemoEngine:
    """The model, its tokenizer and the states that fit it: shared by every session, never written by one."""

    def __init__(self, model: str | os.PathLike, states: list[str] | tuple[str, ...] = (), *,
                 tokenizer: str | None = None, strategy: str = "cpu fp32",
                 max_upload_bytes: int = MAX_UPLOAD_BYTES, prompts: list[str] | None = None) -> None:
        from .hub import resolve_model

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
        self.runner = PipRunner(load_pip_model(self.model_path, strategy), self.tokenizer, self.spec, strategy)
        self._own_model = None
        self._lock = threading.Lock()
        self._workdir: tempfile.TemporaryDirectory | None = None  # made on first use, once signals are handled

    # ------------------------------------------------------------ states offered to everyone

    def _add_entry(self, entry: str) -> None:
        """One --states entry: a folder, a file or a Hub repo. Whatever in it cannot be offered (a file that
        does not fit, cannot be read or vanished; a repo that is missing, damaged or hostile) goes to
        `skipped` with its one-line reason, so that one bad third-party state never keeps the page from
        starting. Only an entry that is neither a path nor a repo id is refused: that is the caller's typo."""
        try:
            path = Path(entry).expanduser()
            if path.is_dir():
                self._add_folder(path, entry)
            elif path.is_file():
                self._add_file(path)
            else:
                self._add_hub(entry)
        except OSError as e:
            self._skip(f"{entry}: cannot be read ({_why(e)})")

    def _skip(self, reason: str) -> None:
        self.skipped.append(_one_line(reason))

    def _add_folder(self, path: Path, entry: str) -> None:
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in STATE_SUFFIXES and p.is_file())
        if not files:
            self._skip(f"{entry}: no state files ({', '.join(STATE_SUFFIXES)}) in this folder")
        for f in files:
            self._add_file(f)

    def _add_file(self, path: Path, label: str | None = None, origin: str | None = None,
                  card: str | None = None, notes: tuple[str, ...] = ()) -> None:
        try:
            size = path.stat().st_size
            if size > MAX_SCAN_BYTES:
                raise StateHubError(f"{path}: {size >> 20} MB, too big for a state (a model?)")
            state = load_state(path)
            problems = state.problems(self.spec)
            if problems:
                raise StateHubError(problems[0])
        except StateHubError as e:
            self._skip(str(e))
            return
        except OSError as e:
            self._skip(f"{path}: cannot be read ({_why(e)})")
            return
        label = _one_line(label or path.name)
        if label in self.states:
            label = _unique(_one_line(f"{path.parent.name}/{path.name}"), list(self.states))
        self.states[label] = Offered(state.with_model(self.spec), origin or "a local file", card,
                                     [*_notes(state, self), *notes])

    def _add_hub(self, entry: str) -> None:
        from . import hub

        if not hub.is_repo_id(entry):
            raise StateHubError(f"{entry}: no such file or folder, and not a Hub repo id (owner/name)")
        try:
            path = Path(hub.pull(entry, model=self.spec, max_bytes=MAX_SCAN_BYTES))
        except StateHubError as e:
            self._skip(str(e) if entry in str(e) else f"{entry}: {e}")
            return
        try:
            card, notes = hub.model_card(entry), ()
        except StateHubError as e:  # the page then shows what the state's metadata says
            card, notes = None, (f"its model card is not shown: {e}",)
        self._add_file(path, label=f"hub: {entry}", origin=f"the Hub: {entry}", card=card, notes=notes)

    # ------------------------------------------------------------ a session's view

    def labels(self, session: dict | None) -> list[str]:
        return list(self.states) + list((session or {}).get("extra", {}))

    def lookup(self, label: str | None, session: dict | None) -> Offered:
        """The state picked in the dropdown: one offered to all, or one of this session's own."""
        if not label or label == NO_STATE:
            raise StateHubError("pick a state first (or upload one, or bake one)")
        found = self.states.get(label) or (session or {}).get("extra", {}).get(label)
        if found is None:
            raise StateHubError(f"{label}: no such state here")
        return found

    def card(self, label: str | None, session: dict | None) -> str:
        """Markdown about a state: its Hub model card, or what its metadata says."""
        if not label or label == NO_STATE:
            return "No state picked."
        offered = self.lookup(label, session)
        if offered.card:
            return offered.card
        return describe_state(offered)

    def load_upload(self, path: str | os.PathLike, session: dict) -> tuple[str, list[str]]:
        """Validate an uploaded file (size, safe loading, shapes, base-model sha256) and keep it in the
        session: its label and notes. Anything wrong raises StateHubError naming the file, not the temp path."""
        path = Path(path)
        name = path.name
        try:
            size = path.stat().st_size  # checked before a byte is read: the readers' cost is bounded by it
            if size > self.max_upload_bytes:
                raise StateHubError(f"{name}: {size / 2**20:.1f} MB, over the {self.max_upload_bytes / 2**20:g} MB "
                                    "limit for uploads (a state is a few MB)")
            state = load_state(path)
        except StateHubError as e:
            raise StateHubError(str(e).replace(str(path), name)) from None
        except OSError as e:
            raise StateHubError(f"{name}: the upload cannot be read ({_why(e)})") from None
        state.source = name
        problems = state.problems(self.spec)
        if problems:
            raise StateHubError(problems[0])
        offered = Offered(state.with_model(self.spec), f"uploaded {name}", notes=_notes(state, self))
        label = _unique(f"upload: {name}", self.labels(session))
        _keep(session, label, offered)
        return label, offered.notes

    # ------------------------------------------------------------ bake, inspect

    def own_model(self):
        """Our own model, for baking (toolbox.bake): loaded on first use, memory-mapped."""
        with self._lock:
            if self._own_model is None:
                from .model import load_model

                self._own_model = load_model(self.model_path)
            return self._own_model

    def bake(self, prompt: str, session: dict) -> tuple[str, list[Path], list[str]]:
        """Bake `prompt` into a state, keep it in the session, and write it in every export format:
        its label, the files, and notes (what a format cannot carry or why it was not written)."""
        if not prompt.strip():
            raise StateHubError("the prompt is empty: nothing to bake")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise StateHubError(f"the prompt has {len(prompt)} characters; the page bakes up to {MAX_PROMPT_CHARS}")
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
                notes += [f"{fmt}: {n}" for n in export_state(state, out / name, fmt, base_model=self.model_path)]
                files.append(out / name)
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


def _why(e: OSError) -> str:
    return os_reason(e) or type(e).__name__


def _one_line(text: object, limit: int = MAX_SHOWN_CHARS) -> str:
    """A stranger's text (a file name, a metadata value, an error naming them) as one printable line of at
    most `limit` characters: no line breaks to start a new Markdown block, no lone surrogates (a non-UTF-8
    file name) that would make the page's JSON unsendable."""
    line = " ".join(str(text).split()).encode("utf-8", "backslashreplace").decode("utf-8")
    return line if len(line) <= limit else line[: limit - 3] + "..."


_MARKUP = re.compile(r"([\\`*_~\[\]<>&$|])")


def _md(text: object, limit: int = MAX_SHOWN_CHARS) -> str:
    """Text for a Markdown component, shown as it is typed: every character that Markdown or HTML would read
    as markup (a tag, an entity, a link or image, emphasis, code, a table cell, LaTeX) is backslash-escaped,
    so that no HTML and no link from a file or the Hub reaches the page. Gradio also sanitizes what Markdown
    renders (DOMPurify in the browser), which is what keeps a Hub model card, shown as Markdown, safe."""
    return _MARKUP.sub(r"\\\1", _one_line(text, limit))


def _notes(state: State, engine: DemoEngine) -> list[str]:
    notes = []
    if not state.base_model_sha256:
        notes.append(f"{Path(state.source).name} does not record its base model; only its shape was checked")
    made_with = state.metadata.get("tokenizer")
    if made_with and made_with != engine.tokenizer.name:
        notes.append(f"made with the {made_with} tokenizer; the page uses {engine.tokenizer.name}")
    return notes


def describe_state(offered: Offered) -> str:
    """What a state's metadata says, as Markdown: base model, how it was made, figures. Every value comes from
    the file (a stranger's, for an upload or a Hub state), so each is shown as text, whatever its type."""
    s = offered.state
    meta = s.metadata
    training = meta.get("training") if isinstance(meta.get("training"), dict) else {}
    lines = [f"**{_md(Path(s.source).name)}** ({_md(offered.origin)})", "",
             f"- RWKV {_md(s.arch)}, {s.dims()}, token shift: {'yes' if s.shift is not None else 'no'}"]
    if meta.get("base_model_name"):
        lines.append(f"- base model: {_md(meta['base_model_name'])} "
                     f"(sha256 {_md(str(meta.get('base_model_sha256'))[:12])})")
    if training.get("method"):
        lines.append(f"- made by: {_md(training['method'])}")
    for key, what in (("steps", "steps"), ("tokens_seen", "tokens seen"), ("best_val_loss", "best validation loss"),
                      ("prompt_tokens", "prompt tokens")):
        value = training.get(key)
        if value is not None:
            lines.append(f"- {what}: {value:.4f}" if isinstance(value, float) else f"- {what}: {_md(value)}")
    files = training.get("data_files")
    if files:
        lines.append(f"- data: {_md(', '.join(map(str, files)) if isinstance(files, list) else files)}")
    lines += [f"- note: {_md(n)}" for n in offered.notes]
    return "\n".join(lines)


# ---------------------------------------------------------------- the page


def _sampling(temperature, top_p, max_tokens, presence, frequency, seed) -> Sampling:
    try:
        return Sampling(float(temperature), float(top_p), int(max_tokens), float(presence), float(frequency),
                        int(seed or 0))
    except (TypeError, ValueError, OverflowError) as e:  # int() of nan, inf or text
        raise StateHubError(f"bad sampling setting: {e}") from None


def build_demo(engine: DemoEngine, *, concurrency: int = 2, preview: bool = True):
    """The Gradio Blocks over `engine`, queued with `concurrency` requests at a time."""
    import gradio as gr

    spec = engine.spec
    labels = engine.labels(None)
    first = labels[0] if labels else None
    preview_texts = ("", "")
    if preview and first:
        prompt = engine.prompts[0]
        *_, last = side_by_side(engine.runner.complete(prompt, None, DEFAULT_SAMPLING),
                                engine.runner.complete(prompt, engine.states[first].state, DEFAULT_SAMPLING))
        preview_texts = (prompt + last[0], prompt + last[1])

    def fail(e: StateHubError):
        return gr.Error(str(e), print_exception=False)

    def choices(session: dict, value: str | None):
        names = engine.labels(session)
        return (gr.Dropdown(choices=names, value=value), gr.Dropdown(choices=names, value=value),
                gr.Dropdown(choices=[NO_STATE, *names]))

    def complete(prompt, label, temperature, top_p, max_tokens, presence, frequency, seed, session):
        try:
            s = _sampling(temperature, top_p, max_tokens, presence, frequency, seed)
            state = engine.lookup(label, session).state
            if len(prompt) > MAX_PROMPT_CHARS:
                raise StateHubError(f"the prompt has {len(prompt)} characters; the page takes up to {MAX_PROMPT_CHARS}")
            for a, b in side_by_side(engine.runner.complete(prompt, None, s), engine.runner.complete(prompt, state, s)):
                yield prompt + a, prompt + b
        except StateHubError as e:
            raise fail(e) from None

    def chat(message, label, temperature, top_p, max_tokens, presence, frequency, seed, session):
        try:
            s = _sampling(temperature, top_p, max_tokens, presence, frequency, seed)
            state = engine.lookup(label, session).state
            if not message or not message.strip():
                raise StateHubError("the message is empty")
            if len(message) > MAX_PROMPT_CHARS:
                raise StateHubError(f"the message has {len(message)} characters; the page takes up to "
                                    f"{MAX_PROMPT_CHARS}")
            conv = session.get("chat")
            if conv is None or conv["label"] != label:  # another state: a new conversation
                conv = session["chat"] = {"label": label, "base": Conversation(), "tuned": Conversation(),
                                          "history": ([], [])}
            hist_base, hist_tuned = conv["history"]
            user = {"role": "user", "content": message}
            a = b = ""
            for a, b in side_by_side(conv["base"].turn(engine.runner, None, message, s),
                                     conv["tuned"].turn(engine.runner, state, message, s)):
                yield (hist_base + [user, {"role": "assistant", "content": a}],
                       hist_tuned + [user, {"role": "assistant", "content": b}], "", session)
            hist_base += [user, {"role": "assistant", "content": a}]
            hist_tuned += [user, {"role": "assistant", "content": b}]
            yield hist_base, hist_tuned, "", session
        except StateHubError as e:
            raise fail(e) from None

    def clear_chat(session):
        session["chat"] = None
        return [], [], session

    def upload(path, session):
        if not path:
            return "No file.", gr.skip(), gr.skip(), gr.skip(), session
        try:
            label, notes = engine.load_upload(path, session)
        except StateHubError as e:
            return f"**Not loaded.** {_md(e)}", gr.skip(), gr.skip(), gr.skip(), session
        finally:
            _discard_upload(path)
        msg = f"**Loaded** {_md(label)}: fits {_md(spec.name)}." + "".join(f"\n\nNote: {_md(n)}" for n in notes)
        return (msg, *choices(session, label), session)

    def bake_prompt(prompt, session):
        try:
            label, files, notes = engine.bake(prompt, session)
        except StateHubError as e:
            raise fail(e) from None
        offered = session["extra"][label]
        quoted = "\n".join(f"> {_md(line, MAX_PROMPT_CHARS)}" for line in prompt.splitlines()) or ">"
        msg = (f"**{_md(label)}**, baked from:\n\n{quoted}\n\n{describe_state(offered)}\n\n"
               + "".join(f"- {_md(n)}\n" for n in notes))
        return (msg, [str(f) for f in files], *choices(session, label), session)

    def inspect(a, b, session):
        try:
            return engine.inspect(a, b, session)
        except StateHubError as e:
            raise fail(e) from None

    def card(label, session):
        try:
            return engine.card(label, session)
        except StateHubError as e:
            return _md(e)

    header = (f"# RWKV state hub: the base model and a state, side by side\n"
              f"**{_md(spec.name)}** · RWKV {spec.arch} · {spec.dims()} · sha256 `{(spec.sha256 or '')[:12]}` · "
              f"tokenizer {_md(engine.tokenizer.name)} · `rwkv` pip package, {_md(engine.strategy)} · "
              f"{len(engine.states)} state(s) that fit this model")
    # Gradio's own copies (uploads, images, baked files) are dropped when the session that made them would be
    with gr.Blocks(title="rwkv-state-hub demo", delete_cache=(SESSION_TTL_S, SESSION_TTL_S)) as demo:
        # a conversation holds two recurrent states (MBs each for big models): dropped an hour after last use
        session = gr.State(new_session(), time_to_live=SESSION_TTL_S)
        gr.Markdown(header)
        with gr.Row():
            with gr.Column(scale=3):
                with gr.Tabs():
                    with gr.Tab("Completion"):
                        prompt = gr.Textbox(engine.prompts[0], label="Prompt", lines=2)
                        gr.Examples([[p] for p in engine.prompts], inputs=[prompt])
                        go = gr.Button("Generate", variant="primary")
                        with gr.Row():
                            out_base = gr.Textbox(preview_texts[0], label="Base model", lines=8)
                            out_tuned = gr.Textbox(preview_texts[1], label="Base model + state", lines=8)
                    with gr.Tab("Chat"):
                        with gr.Row():
                            chat_base = gr.Chatbot(label="Base model", height=320)
                            chat_tuned = gr.Chatbot(label="Base model + state", height=320)
                        message = gr.Textbox(label="Message", placeholder="Say something; Enter sends")
                        with gr.Row():
                            send = gr.Button("Send", variant="primary")
                            clear = gr.Button("New conversation")
                    with gr.Tab("Upload a state"):
                        upload_file = gr.File(label=f"A state file (.safetensors, .pth, .st; up to "
                                                    f"{engine.max_upload_bytes / 2**20:g} MB)")
                        upload_msg = gr.Markdown(**STRANGERS_TEXT)
                    with gr.Tab("Inspect"):
                        with gr.Row():
                            insp_a = gr.Dropdown(labels, value=first, label="State A")
                            insp_b = gr.Dropdown([NO_STATE, *labels], value=NO_STATE, label="State B (to compare)")
                        insp_go = gr.Button("Inspect")
                        with gr.Row():
                            norms = gr.Image(label="Norm per layer and head (A)", format="png", type="pil")
                            diff_img = gr.Image(label="Difference A vs B", format="png", type="filepath")
                        diff_text = gr.Textbox(label="Difference table", lines=8)
                    with gr.Tab("Bake a state from a prompt"):
                        with gr.Row():
                            with gr.Column():
                                bake_text = gr.Textbox(label="System prompt", lines=10,
                                                       placeholder="Text to run through the model; the state it "
                                                                   "leaves is the new state")
                                bake_go = gr.Button("Bake", variant="primary")
                            with gr.Column():
                                bake_msg = gr.Markdown(**STRANGERS_TEXT)
                                bake_files = gr.File(label="The state in every format", file_count="multiple")
            with gr.Column(scale=1):
                picked = gr.Dropdown(labels, value=first, label="State")
                card_md = gr.Markdown(engine.card(first, None) if first else "No state offered: upload one.",
                                      **STRANGERS_TEXT)
                with gr.Accordion("Sampling", open=True):
                    temperature = gr.Slider(0, 2, DEFAULT_SAMPLING.temperature, step=0.05,
                                            label="Temperature (0 = greedy)")
                    top_p = gr.Slider(0, 1, DEFAULT_SAMPLING.top_p, step=0.01, label="Top-p")
                    max_tokens = gr.Slider(1, 1024, DEFAULT_SAMPLING.max_tokens, step=1, label="Max tokens")
                    presence = gr.Slider(0, 2, DEFAULT_SAMPLING.presence_penalty, step=0.05, label="Presence penalty")
                    frequency = gr.Slider(0, 2, DEFAULT_SAMPLING.frequency_penalty, step=0.05,
                                          label="Frequency penalty")
                    seed = gr.Number(0, precision=0, label="Seed")
                if engine.skipped:
                    with gr.Accordion(f"Not offered ({len(engine.skipped)})", open=False):
                        gr.Markdown("\n".join(f"- {_md(s)}" for s in engine.skipped), **STRANGERS_TEXT)
        knobs = [temperature, top_p, max_tokens, presence, frequency, seed]

        model = {"concurrency_id": "model", "concurrency_limit": concurrency}  # one queue for all model work
        # one event for the button and Enter: a second send while a reply streams is refused by the page, so
        # two turns never run at once on the same conversation
        gr.on([go.click, prompt.submit], complete, [prompt, picked, *knobs, session], [out_base, out_tuned],
              api_name="complete", **model)
        gr.on([send.click, message.submit], chat, [message, picked, *knobs, session],
              [chat_base, chat_tuned, message, session], api_name="chat", **model)
        clear.click(clear_chat, [session], [chat_base, chat_tuned, session], api_name="clear_chat")
        upload_file.upload(upload, [upload_file, session], [upload_msg, picked, insp_a, insp_b, session],
                           api_name="upload")
        bake_go.click(bake_prompt, [bake_text, session], [bake_msg, bake_files, picked, insp_a, insp_b, session],
                      api_name="bake", **model)
        insp_go.click(inspect, [insp_a, insp_b, session], [norms, diff_img, diff_text], api_name="inspect")
        picked.change(card, [picked, session], [card_md], api_name="card")
    demo.queue(default_concurrency_limit=concurrency)
    demo.engine, demo.session_state = engine, session
    return demo


def create_demo(model: str | os.PathLike, states: list[str] | tuple[str, ...] = (), *, tokenizer: str | None = None,
                strategy: str = "cpu fp32", concurrency: int = 2, max_upload_bytes: int = MAX_UPLOAD_BYTES,
                preview: bool = True, prompts: list[str] | None = None):
    """Load the model and states, and build the page."""
    engine = DemoEngine(model, states, tokenizer=tokenizer, strategy=strategy, max_upload_bytes=max_upload_bytes,
                        prompts=prompts)
    return build_demo(engine, concurrency=concurrency, preview=preview)


def launch_demo(demo, host: str | None = None, port: int | None = None, share: bool = False,
                prevent_thread_lock: bool = False):
    """Serve the page; returns Gradio's (app, local url, share url). Gradio itself refuses uploads over
    4x our limit, so that a huge file never fills the disk before our check sees it.

    Served in the foreground (`python app.py`, `rwkv-state demo`), SIGTERM (what a Space, docker stop or
    systemd send) ends it the way Ctrl-C does, and either way the page's work folder is removed on the way
    out; by default Python dies on SIGTERM without running any clean-up."""
    foreground = not prevent_thread_lock
    if foreground and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        return demo.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=prevent_thread_lock,
                           show_error=True, ssr_mode=False, max_file_size=4 * demo.engine.max_upload_bytes,
                           footer_links=["api"], quiet=prevent_thread_lock)
    except KeyboardInterrupt:  # a signal before Gradio's own wait loop (which handles it) began
        demo.close()
        return None
    finally:
        if foreground:
            demo.engine.close()


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _discard_upload(path: str | os.PathLike) -> None:
    """Delete an upload from Gradio's upload folder as soon as it has been read or refused: an accepted state
    lives on in the session's memory, and a refused file (up to 4x the limit) would otherwise stay on disk
    until Gradio's hourly sweep. Nothing outside that folder is ever touched."""
    from gradio.utils import get_upload_folder

    folder, file = Path(os.path.realpath(get_upload_folder())), Path(os.path.realpath(path))
    if folder not in file.parents:
        return
    with contextlib.suppress(OSError):  # already gone (the same bytes uploaded twice at once): nothing to do
        file.unlink()
        if file.parent != folder:
            file.parent.rmdir()  # Gradio's folder for this one upload, when it is now empty


def settings_from_env(env: dict[str, str] | None = None) -> dict[str, Any]:
    """create_demo's arguments from the environment (a Hugging Face Space is configured this way)."""
    env = dict(os.environ if env is None else env)
    states = env.get("RWKV_STATE_HUB_STATES")
    try:
        return {
            "model": env.get("RWKV_STATE_HUB_MODEL") or str(EXAMPLE_MODEL),
            "states": [s.strip() for s in states.split(",") if s.strip()] if states is not None
            else [str(EXAMPLE_STATES)],
            "tokenizer": env.get("RWKV_STATE_HUB_TOKENIZER") or None,
            "strategy": env.get("RWKV_STATE_HUB_STRATEGY") or "cpu fp32",
            "concurrency": int(env.get("RWKV_STATE_HUB_CONCURRENCY") or 2),
            "max_upload_bytes": int(float(env.get("RWKV_STATE_HUB_MAX_UPLOAD_MB") or 64) * 2**20),
            "preview": (env.get("RWKV_STATE_HUB_PREVIEW") or "1") not in ("0", "false", "no"),
        }
    except ValueError as e:
        raise StateHubError(f"bad RWKV_STATE_HUB_* setting: {e}") from None


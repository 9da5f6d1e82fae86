"""The Gradio page over a DemoEngine: widgets, and callbacks that only hand them to the engine's methods.

One function lays out each tab (and the side bar) and returns its widgets; one wires each tab's events. A
visitor's own things live in a `gr.State` session (engine.new_session()). `app.py` and `rwkv-state demo` both
start the page through `create_demo` + `launch_demo`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gradio as gr

from ..errors import InvalidOptionError, StateHubError, option
from ..examples import example_model, example_states
from ..generate import DEFAULT_SAMPLING
from . import render
from .engine import MAX_PROMPT_CHARS, MAX_UPLOAD_BYTES, NO_STATE, DemoEngine, new_session, sampling

SESSION_TTL_S = 3600
TITLE = "rwkv-state-hub demo"
# every Markdown component that shows text from files, the Hub or a visitor: Gradio's HTML sanitizer on (its
# default, said here so that it stays on), and no LaTeX, which a stranger's "$$...$$" would otherwise typeset
STRANGERS_TEXT = {"sanitize_html": True, "latex_delimiters": []}


def _shown(e: StateHubError) -> gr.Error:
    return gr.Error(str(e), print_exception=False)


def _choices(engine: DemoEngine, session: dict, value: str | None) -> tuple[gr.Dropdown, ...]:
    """The three state dropdowns (the side bar's, inspect's A and B) after the session gained a state."""
    names = engine.labels(session)
    return (gr.Dropdown(choices=names, value=value), gr.Dropdown(choices=names, value=value),
            gr.Dropdown(choices=[NO_STATE, *names]))


# ---------------------------------------------------------------- the layout, one function a tab


def _completion_tab(engine: DemoEngine, preview: bool) -> SimpleNamespace:
    base, tuned = engine.preview() if preview else ("", "")
    with gr.Tab("Completion"):
        prompt = gr.Textbox(engine.prompts[0], label="Prompt", lines=2)
        gr.Examples([[p] for p in engine.prompts], inputs=[prompt])
        go = gr.Button("Generate", variant="primary")
        with gr.Row():
            out_base = gr.Textbox(base, label="Base model", lines=8)
            out_tuned = gr.Textbox(tuned, label="Base model + state", lines=8)
    return SimpleNamespace(prompt=prompt, go=go, out_base=out_base, out_tuned=out_tuned)


def _chat_tab() -> SimpleNamespace:
    with gr.Tab("Chat"):
        with gr.Row():
            base = gr.Chatbot(label="Base model", height=320)
            tuned = gr.Chatbot(label="Base model + state", height=320)
        message = gr.Textbox(label="Message", placeholder="Say something; Enter sends")
        with gr.Row():
            send = gr.Button("Send", variant="primary")
            clear = gr.Button("New conversation")
    return SimpleNamespace(base=base, tuned=tuned, message=message, send=send, clear=clear)


def _upload_tab(engine: DemoEngine) -> SimpleNamespace:
    with gr.Tab("Upload a state"):
        file = gr.File(label=f"A state file (.safetensors, .pth, .st; up to {engine.max_upload_bytes / 2**20:g} MB)")
        answer = gr.Markdown(**STRANGERS_TEXT)
    return SimpleNamespace(file=file, answer=answer)


def _inspect_tab(engine: DemoEngine) -> SimpleNamespace:
    labels = engine.labels(None)
    with gr.Tab("Inspect"):
        with gr.Row():
            a = gr.Dropdown(labels, value=labels[0] if labels else None, label="State A")
            b = gr.Dropdown([NO_STATE, *labels], value=NO_STATE, label="State B (to compare)")
        go = gr.Button("Inspect")
        with gr.Row():
            norms = gr.Image(label="Norm per layer and head (A)", format="png", type="pil")
            diff = gr.Image(label="Difference A vs B", format="png", type="filepath")
        table = gr.Textbox(label="Difference table", lines=8)
    return SimpleNamespace(a=a, b=b, go=go, norms=norms, diff=diff, table=table)


def _bake_tab() -> SimpleNamespace:
    with gr.Tab("Bake a state from a prompt"), gr.Row():
        with gr.Column():
            text = gr.Textbox(label="System prompt", lines=10,
                              placeholder="Text to run through the model; the state it leaves is the new state")
            go = gr.Button("Bake", variant="primary")
        with gr.Column():
            answer = gr.Markdown(**STRANGERS_TEXT)
            files = gr.File(label="The state in every format", file_count="multiple")
    return SimpleNamespace(text=text, go=go, answer=answer, files=files)


def _side_bar(engine: DemoEngine) -> SimpleNamespace:
    """The state picked for every tab, its card, the sampling controls, and what could not be offered."""
    labels = engine.labels(None)
    first = labels[0] if labels else None
    picked = gr.Dropdown(labels, value=first, label="State")
    card = gr.Markdown(engine.card(first, None) if first else "No state offered: upload one.", **STRANGERS_TEXT)
    s = DEFAULT_SAMPLING
    with gr.Accordion("Sampling", open=True):
        knobs = [gr.Slider(0, 2, s.temperature, step=0.05, label="Temperature (0 = greedy)"),
                 gr.Slider(0, 1, s.top_p, step=0.01, label="Top-p"),
                 gr.Slider(1, 1024, s.max_tokens, step=1, label="Max tokens"),
                 gr.Slider(0, 2, s.presence_penalty, step=0.05, label="Presence penalty"),
                 gr.Slider(0, 2, s.frequency_penalty, step=0.05, label="Frequency penalty"),
                 gr.Number(s.seed, precision=0, label="Seed")]
    if engine.skipped:
        with gr.Accordion(f"Not offered ({len(engine.skipped)})", open=False):
            gr.Markdown(render.not_offered(engine.skipped), **STRANGERS_TEXT)
    return SimpleNamespace(picked=picked, card=card, knobs=knobs)


# ---------------------------------------------------------------- the events, one function a tab


def _wire_completion(engine: DemoEngine, tab: SimpleNamespace, side: SimpleNamespace, session: gr.State,
                     model: dict) -> None:
    def complete(prompt, label, temperature, top_p, max_tokens, presence, frequency, seed, own):
        try:
            settings = sampling(temperature, top_p, max_tokens, presence, frequency, seed)
            yield from engine.complete(prompt, label, settings, own)
        except StateHubError as e:
            raise _shown(e) from None

    # one event for the button and Enter
    gr.on([tab.go.click, tab.prompt.submit], complete, [tab.prompt, side.picked, *side.knobs, session],
          [tab.out_base, tab.out_tuned], api_name="complete", **model)


def _wire_chat(engine: DemoEngine, tab: SimpleNamespace, side: SimpleNamespace, session: gr.State,
               model: dict) -> None:
    def chat(message, label, temperature, top_p, max_tokens, presence, frequency, seed, own):
        try:
            settings = sampling(temperature, top_p, max_tokens, presence, frequency, seed)
            for base, tuned in engine.chat(message, label, settings, own):
                yield base, tuned, "", own
        except StateHubError as e:
            raise _shown(e) from None

    def clear(own):
        engine.clear_chat(own)
        return [], [], own

    # a second send while a reply streams is refused by the page: two turns never run at once on one conversation
    gr.on([tab.send.click, tab.message.submit], chat, [tab.message, side.picked, *side.knobs, session],
          [tab.base, tab.tuned, tab.message, session], api_name="chat", **model)
    tab.clear.click(clear, [session], [tab.base, tab.tuned, session], api_name="clear_chat")


def _wire_upload(engine: DemoEngine, tab: SimpleNamespace, dropdowns: list, session: gr.State) -> None:
    def upload(path, own):
        if not path:
            return "No file.", gr.skip(), gr.skip(), gr.skip(), own
        try:
            label, notes = engine.load_upload(path, own)
        except StateHubError as e:
            return render.refused(e), gr.skip(), gr.skip(), gr.skip(), own
        finally:
            _discard_upload(path)
        return render.loaded(label, engine.spec.name, notes), *_choices(engine, own, label), own

    tab.file.upload(upload, [tab.file, session], [tab.answer, *dropdowns, session], api_name="upload")


def _wire_bake(engine: DemoEngine, tab: SimpleNamespace, dropdowns: list, session: gr.State, model: dict) -> None:
    def bake(prompt, own):
        try:
            label, files, notes = engine.bake(prompt, own)
        except StateHubError as e:
            raise _shown(e) from None
        answer = render.baked(label, prompt, own["extra"][label], notes, MAX_PROMPT_CHARS)
        return answer, [str(f) for f in files], *_choices(engine, own, label), own

    tab.go.click(bake, [tab.text, session], [tab.answer, tab.files, *dropdowns, session], api_name="bake", **model)


def _wire_inspect(engine: DemoEngine, tab: SimpleNamespace, side: SimpleNamespace, session: gr.State) -> None:
    def inspect(a, b, own):
        try:
            return engine.inspect(a, b, own)
        except StateHubError as e:
            raise _shown(e) from None

    def card(label, own):
        try:
            return engine.card(label, own)
        except StateHubError as e:
            return render.md(e)

    tab.go.click(inspect, [tab.a, tab.b, session], [tab.norms, tab.diff, tab.table], api_name="inspect")
    side.picked.change(card, [side.picked, session], [side.card], api_name="card")


def build_demo(engine: DemoEngine, *, concurrency: int = 2, preview: bool = True) -> gr.Blocks:
    """The Gradio Blocks over `engine`, queued with `concurrency` requests at a time."""
    # Gradio's own copies (uploads, images, baked files) are dropped when the session that made them would be
    with gr.Blocks(title=TITLE, delete_cache=(SESSION_TTL_S, SESSION_TTL_S)) as demo:
        # a conversation holds two recurrent states (MBs each for big models): dropped an hour after last use
        session = gr.State(new_session(), time_to_live=SESSION_TTL_S)
        gr.Markdown(render.header(engine))
        with gr.Row():
            with gr.Column(scale=3), gr.Tabs():
                completion, chat = _completion_tab(engine, preview), _chat_tab()
                upload, inspect, bake = _upload_tab(engine), _inspect_tab(engine), _bake_tab()
            with gr.Column(scale=1):
                side = _side_bar(engine)
        model = {"concurrency_id": "model", "concurrency_limit": concurrency}  # one queue for all model work
        dropdowns = [side.picked, inspect.a, inspect.b]
        _wire_completion(engine, completion, side, session, model)
        _wire_chat(engine, chat, side, session, model)
        _wire_upload(engine, upload, dropdowns, session)
        _wire_bake(engine, bake, dropdowns, session, model)
        _wire_inspect(engine, inspect, side, session)
    demo.queue(default_concurrency_limit=concurrency)
    demo.engine, demo.session_state = engine, session
    return demo


# ---------------------------------------------------------------- start and stop


def create_demo(model: str | os.PathLike, states: list[str] | tuple[str, ...] = (), *, tokenizer: str | None = None,
                strategy: str = "cpu fp32", concurrency: int = 2, max_upload_bytes: int = MAX_UPLOAD_BYTES,
                preview: bool = True, prompts: list[str] | None = None) -> gr.Blocks:
    """Load the model and states, and build the page."""
    engine = DemoEngine(model, states, tokenizer=tokenizer, strategy=strategy, max_upload_bytes=max_upload_bytes,
                        prompts=prompts)
    engine.runner  # noqa: B018 - load the pip model now, not on the first visitor's request
    return build_demo(engine, concurrency=concurrency, preview=preview)


def launch_demo(demo: gr.Blocks, host: str | None = None, port: int | None = None, share: bool = False,
                prevent_thread_lock: bool = False) -> tuple | None:
    """Serve the page; returns Gradio's (app, local url, share url). Gradio itself refuses uploads over
    4x our limit, so that a huge file never fills the disk before our check sees it.

    Served in the foreground (`python app.py`, `rwkv-state demo`), it says where, in the caller's words
    (`--share` on the command line), and SIGTERM (what a Space, docker stop or systemd send) ends it the way
    Ctrl-C does; either way the page's work folder is removed on the way out (by default Python dies on
    SIGTERM without running any clean-up)."""
    foreground = not prevent_thread_lock
    if foreground and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        served = demo.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=True,
                             show_error=True, ssr_mode=False, max_file_size=4 * demo.engine.max_upload_bytes,
                             footer_links=["api"], quiet=True)
        if foreground:
            print(launch_message(demo.local_url, share or demo.space_id is not None), flush=True)
            demo.block_thread()
        return served
    except KeyboardInterrupt:  # a signal before Gradio's own wait loop (which handles it) began
        demo.close()
        return None
    finally:
        if foreground:
            demo.engine.close()


def launch_message(url: str, shared: bool) -> str:
    """Where the page is served; unless it is shared already, how to share it, said as the caller would
    (`--share` on the command line, `share=True` in Python)."""
    where = f"* Running on local URL:  {url}"
    return where if shared else f"{where}\n* To create a public link, pass {option('share', True)}"


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
            "model": env.get("RWKV_STATE_HUB_MODEL") or str(example_model()),
            "states": [s.strip() for s in states.split(",") if s.strip()] if states is not None
            else [str(example_states())],
            "tokenizer": env.get("RWKV_STATE_HUB_TOKENIZER") or None,
            "strategy": env.get("RWKV_STATE_HUB_STRATEGY") or "cpu fp32",
            "concurrency": int(env.get("RWKV_STATE_HUB_CONCURRENCY") or 2),
            "max_upload_bytes": int(float(env.get("RWKV_STATE_HUB_MAX_UPLOAD_MB") or 64) * 2**20),
            "preview": (env.get("RWKV_STATE_HUB_PREVIEW") or "1") not in ("0", "false", "no"),
        }
    except ValueError as e:
        raise InvalidOptionError(f"bad RWKV_STATE_HUB_* setting: {e}") from None

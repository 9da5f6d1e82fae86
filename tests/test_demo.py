"""The demo page, driven as its users drive it: launched, then called through gradio_client (and one real
headless browser). Every generated text is checked against the `rwkv` pip package run by hand."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import ALICE, REPO, random_state_like, real_model_path

from rwkv_state_hub import State, load_state, push, read_spec
from rwkv_state_hub.chat import Conversation, PipRunner, side_by_side
from rwkv_state_hub.errors import StateHubError
from rwkv_state_hub.formats import detect_format, save_native, save_pth
from rwkv_state_hub.generate import DEFAULT_SAMPLING, LIMITS, Sampler, Sampling, generate
from rwkv_state_hub.pip_bridge import load_pip_model, pip_state, state_from_pip
from rwkv_state_hub.random_model import random_checkpoint, save_checkpoint
from rwkv_state_hub.tokenizer import get_tokenizer

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402

pytestmark = [  # Gradio's queue still uses pandas options that pandas 3 deprecates: not ours to fix
    pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
]
MODEL = REPO / "rwkv_state_hub" / "examples" / "models" / "tiny-rwkv-5v2-730K.pth"
EXAMPLE_STATES = REPO / "tests" / "fixtures"  # weather-5v2: a state for MODEL
WEATHER = "weather-5v2.safetensors"
GREEDY = (0, 1, 40, 0, 0, 0)  # temperature, top-p, max tokens, presence, frequency, seed


def pip_greedy(pip, text: str, state: list | None, tok, n: int, stop: str | None = None) -> str:
    """Greedy text from the rwkv pip package, written out by hand: the reference for every column."""
    logits, state = pip.forward(tok.encode(text), state)
    out: list[int] = []
    for _ in range(n):
        token = int(logits.argmax())
        out.append(token)
        logits, state = pip.forward([token], state)
        if stop and stop in tok.decode(out):
            break
    return tok.decode(out)


def chat_text(message: dict) -> str:
    content = message["content"]
    return content if isinstance(content, str) else "".join(part.get("text", "") for part in content)


# ---------------------------------------------------------------- the pure logic


def test_sampler_penalties_and_greedy():
    logits = torch.tensor([0.0, 3.0, 2.5, 1.0])
    plain = dict(temperature=0, presence_penalty=0, frequency_penalty=0)
    greedy = Sampler(Sampling(**plain))
    assert [greedy(logits) for _ in range(3)] == [1, 1, 1]
    penalised = Sampler(Sampling(**{**plain, "presence_penalty": 1.0}))
    assert [penalised(logits) for _ in range(3)] == [1, 2, 1]  # 3-1 < 2.5; then 2.5-1 < 3-1
    by_count = Sampler(Sampling(**{**plain, "frequency_penalty": 0.3}))
    assert [by_count(logits) for _ in range(4)] == [1, 1, 2, 1]  # 3, 2.7, then 2.4 < 2.5: 2; then 2.4 > 2.2
    a, b = (Sampler(Sampling(temperature=1.0, top_p=1.0, seed=7)) for _ in range(2))
    assert [a(logits) for _ in range(20)] == [b(logits) for _ in range(20)]  # the seed decides


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=1.5), dict(max_tokens=0),
                                 dict(presence_penalty=9)])
def test_sampling_refuses_bad_settings(bad):
    with pytest.raises(StateHubError):
        Sampling(**bad)


def test_side_by_side():  # the chat format's helpers are tested in test_prompt_format.py
    assert list(side_by_side(iter(["a", "ab"]), iter(["x"]))) == [("a", "x"), ("ab", "x"), ("ab", "x")]


def test_one_set_of_sampling_defaults():
    """`rwkv-state generate`, generate() and the page start from DEFAULT_SAMPLING, within generate.LIMITS."""
    from rwkv_state_hub.cli import cli

    options = {p.name: p for p in cli.commands["generate"].params}
    for name, (low, high) in LIMITS.items():
        assert options[name].default == getattr(DEFAULT_SAMPLING, name)
        assert (options[name].type.min, options[name].type.max) == (low, high)
    assert Sampling() == DEFAULT_SAMPLING


def test_generate_and_the_page_give_the_same_text(pip_model):
    """Same seed and settings, same model and state: generate() (our model) and the page's completion (the pip
    package) draw the same tokens, with the default sampling (penalties included) and with another seed."""
    from rwkv_state_hub.model import load_model

    model, tok = load_model(MODEL), get_tokenizer("bytes")
    runner = PipRunner(pip_model, tok, read_spec(MODEL))
    weather = load_state(EXAMPLE_STATES / WEATHER)
    for state, sampling in ((weather, DEFAULT_SAMPLING.but(max_tokens=24)), (None, Sampling(max_tokens=24, seed=5)),
                            (weather, Sampling(max_tokens=24, seed=7, top_p=0.9))):
        *_, page = runner.complete("W", state, sampling)
        assert generate(model, tok, "W", state, sampling) == page
        assert len(page) == 24


# ---------------------------------------------------------------- the page, one shared app


@pytest.fixture(scope="module")
def state_folder(tmp_path_factory) -> Path:
    """A folder with a state that fits the bundled v5.2 model and three that do not."""
    folder = tmp_path_factory.mktemp("states")
    spec = read_spec(MODEL)
    save_native(random_state_like(spec, seed=1, scale=0.5), folder / "random-fit.safetensors")
    other = random_state_like(spec, seed=2)
    other.metadata.update(base_model_sha256="0" * 64, base_model_fingerprint=None)
    save_native(other, folder / "other-model.safetensors")
    save_pth(State(torch.zeros(12, 1, 64, 64)), folder / "wrong-shape.pth")
    (folder / "notes.pth").write_text("not a state")
    return folder


@pytest.fixture(scope="module")
def app(state_folder):
    from rwkv_state_hub.demo import create_demo, launch_demo

    demo = create_demo(MODEL, [str(EXAMPLE_STATES), str(state_folder)], max_upload_bytes=1 << 20)
    _, url, _ = launch_demo(demo, port=_free_port(), prevent_thread_lock=True)
    yield demo, url
    demo.close()
    demo.engine.close()


@pytest.fixture(scope="module")
def pip_model():
    return load_pip_model(MODEL)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_only_fitting_states_are_offered(app):
    demo, url = app
    engine = demo.engine
    assert sorted(engine.states) == ["random-fit.safetensors", WEATHER]
    skipped = "\n".join(engine.skipped)
    assert "other-model.safetensors: made for tiny-rwkv-5v2-730K (sha256 000000000000), but" in skipped
    assert "wrong-shape.pth: 12 layers x 1 heads x 64" in skipped
    assert "notes.pth: neither safetensors nor a PyTorch file" in skipped
    card = Client(url, verbose=False).predict(WEATHER, api_name="/card")
    assert "tiny-rwkv-5v2-730K" in card and "best validation loss: 2.63" in card


def test_completion_differs_from_base_and_equals_pip(app, pip_model):
    _, url = app
    base, tuned = Client(url, verbose=False).predict("W", WEATHER, *GREEDY, api_name="/complete")
    tok = get_tokenizer("bytes")
    state = load_state(EXAMPLE_STATES / WEATHER)
    assert tuned == "W" + pip_greedy(pip_model, "W", pip_state(state), tok, 40)
    assert base == "W" + pip_greedy(pip_model, "W", None, tok, 40)
    assert base != tuned
    assert tuned.startswith("WEAT")  # the house style of the training data


def test_completion_streams_both_columns(app):
    _, url = app
    job = Client(url, verbose=False).submit("The", WEATHER, 0, 1, 12, 0, 0, 0, api_name="/complete")
    steps = list(job)
    assert len(steps) >= 12  # one update per token, both columns at once
    assert all(len(a) <= len(b2) for (a, _), (b2, _) in zip(steps, steps[1:], strict=False))
    assert all(len(a) <= len(b2) for (_, a), (_, b2) in zip(steps, steps[1:], strict=False))
    final_base, final_tuned = steps[-1]
    # both columns grow together, not one after the other
    assert any(3 < len(a) < len(final_base) and 3 < len(b) < len(final_tuned) for a, b in steps)
    assert steps[-1] == tuple(job.outputs()[-1])


def test_bad_requests_get_a_message(app):
    _, url = app
    client = Client(url, verbose=False)
    with pytest.raises(Exception, match="the prompt is empty"):
        client.predict("", WEATHER, *GREEDY, api_name="/complete")
    with pytest.raises(Exception, match="greater than maximum value 1"):  # Gradio checks the slider's range
        client.predict("W", WEATHER, 0, 3, 10, 0, 0, 0, api_name="/complete")
    with pytest.raises(Exception, match="the prompt has 32001 characters"):
        client.predict("x" * 32_001, WEATHER, *GREEDY, api_name="/complete")
    with pytest.raises(Exception, match="the message has 32001 characters"):
        client.predict("x" * 32_001, WEATHER, *GREEDY, api_name="/chat")


def test_bad_uploads_get_a_message_on_the_page(app, tmp_path):
    _, url = app
    client = Client(url, verbose=False)
    spec = read_spec(MODEL)
    (tmp_path / "hello.txt").write_text("hello")
    save_pth(State(torch.zeros(12, 1, 64, 64)), tmp_path / "v7-shaped.pth")
    other = random_state_like(spec, seed=3)
    other.metadata.update(base_model_sha256="ab" * 32, base_model_name="RWKV-x060-World-1B6",
                          base_model_fingerprint=None)
    save_native(other, tmp_path / "for-another.safetensors")
    (tmp_path / "huge.pth").write_bytes(b"\x80" + bytes(2 << 20))

    marker = tmp_path / "code-ran"

    class Boom:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"blocks.0.att.time_state": Boom()}, tmp_path / "pickle-bomb.pth")
    expected = {
        "hello.txt": "hello.txt: neither safetensors nor a PyTorch file",
        "v7-shaped.pth": "v7-shaped.pth: 12 layers x 1 heads x 64, but tiny-rwkv-5v2-730K has 12 layers x 8 heads",
        "for-another.safetensors": "made for RWKV-x060-World-1B6 (sha256 abababababab), but tiny-rwkv-5v2-730K",
        "huge.pth": "huge.pth: 2.0 MB, over the 1 MB limit",
        "pickle-bomb.pth": "pickle-bomb.pth: not a readable PyTorch checkpoint (refused: loading it would call",
    }
    for name, reason in expected.items():
        msg, *_ = client.predict(handle_file(tmp_path / name), api_name="/upload")
        assert msg.startswith("**Not loaded.**") and reason in msg, (name, msg)
        assert "Traceback" not in msg and str(tmp_path) not in msg and "/gradio/" not in msg
    assert not marker.exists()  # the pickle was refused, not run
    # a good upload is offered to this visitor only
    save_native(random_state_like(spec, seed=4, scale=0.5), tmp_path / "mine.safetensors")
    msg, picked, *_ = client.predict(handle_file(tmp_path / "mine.safetensors"), api_name="/upload")
    picked = picked["value"]  # the dropdown's update: the new state, picked
    assert msg.startswith("**Loaded**") and picked == "upload: mine.safetensors"
    base, tuned = client.predict("W", picked, *GREEDY, api_name="/complete")
    assert base != tuned
    with pytest.raises(Exception, match="not in the list of choices"):  # another visitor: not offered
        Client(url, verbose=False).predict("W", picked, *GREEDY, api_name="/complete")


def test_a_session_keeps_bounded_files_and_states(app):
    """A long-running page does not fill the disk or the memory: a request's files go once Gradio has answered
    with its own copies, and a session keeps only its newest MAX_OWN_STATES states."""
    from rwkv_state_hub.demo import MAX_OWN_STATES, SCRATCH_TTL_S, new_session

    engine = app[0].engine
    old = engine._scratch("diff-")
    (old / "diff.png").write_bytes(b"png")
    recent = engine._scratch("diff-")
    os.utime(old, (time.time() - SCRATCH_TTL_S - 1,) * 2)
    engine._scratch("bake-")
    assert not old.exists() and recent.is_dir()
    session = new_session()
    state = load_state(EXAMPLE_STATES / WEATHER)
    path = Path(state.source)
    labels = [engine.load_upload(path, session)[0] for _ in range(MAX_OWN_STATES + 2)]
    assert list(session["extra"]) == labels[2:]
    with pytest.raises(StateHubError, match="no such state here"):
        engine.lookup(labels[1], session)


def test_two_clients_keep_separate_conversations(app, pip_model):
    """Each chat continues its own recurrent state: its second reply equals the pip package reading the
    whole transcript from scratch, and the two visitors never see each other's turns (also server-side:
    each session's recurrent state is the state of its own transcript)."""
    demo, url = app
    clients = [Client(url, verbose=False), Client(url, verbose=False)]
    turns = [["Hello", "What is the weather?"], ["Tell me a story", "And then?"]]
    settings = (0, 1, 24, 0, 0, 0)
    with ThreadPoolExecutor(2) as pool:
        for t in range(2):  # both visitors' turns at the same time
            jobs = [c.submit(turns[i][t], WEATHER, *settings, api_name="/chat") for i, c in enumerate(clients)]
            results = list(pool.map(lambda j: j.result(), jobs))
    tok = get_tokenizer("bytes")
    weather = load_state(EXAMPLE_STATES / WEATHER)
    for (hist_base, hist_tuned, box), (m1, m2) in zip(results, turns, strict=True):
        assert box == ""
        assert [chat_text(m) for m in hist_base[0::2]] == [m1, m2]  # only this visitor's messages
        for hist, initial in ((hist_base, None), (hist_tuned, weather)):
            start = pip_state(initial) if initial else None
            p1 = f"User: {m1}\n\nAssistant:"
            raw1 = pip_greedy(pip_model, p1, start and [t.clone() for t in start], tok, 24, stop="\n\n")
            sep = "" if raw1.endswith("\n\n") else "\n\n"
            whole = p1 + raw1 + sep + f"User: {m2}\n\nAssistant:"
            raw2 = pip_greedy(pip_model, whole, start and [t.clone() for t in start], tok, 24, stop="\n\n")
            assert chat_text(hist[1]).strip() == raw1.split("\n\n")[0].strip()
            assert chat_text(hist[3]).strip() == raw2.split("\n\n")[0].strip()
    for client, (m1, m2) in zip(clients, turns, strict=True):
        session = demo.state_holder[client.session_hash].state_data[demo.session_state._id]
        for column in ("base", "tuned"):
            conv = session["chat"][column]
            assert conv.transcript.startswith(f"User: {m1}\n\nAssistant:") and f"User: {m2}\n\n" in conv.transcript
            assert conv.transcript.count("User: ") == 2  # nothing of the other visitor's chat
            start = pip_state(weather) if column == "tuned" else None
            _, whole = pip_model.forward(tok.encode(conv.transcript), start)
            assert max(float((a - b).abs().max()) for a, b in zip(conv.state, whole, strict=True)) < 1e-4


def test_conversation_state_equals_the_transcript(pip_model):
    """The Conversation's recurrent state after two turns equals pip's state after reading its transcript."""
    tok = get_tokenizer("bytes")
    runner = PipRunner(pip_model, tok, read_spec(MODEL))
    conv = Conversation()
    for message in ("Hi", "Bye"):
        list(conv.turn(runner, None, message, Sampling(temperature=0, max_tokens=10)))
    _, whole = pip_model.forward(tok.encode(conv.transcript), None)
    assert conv.transcript.count("User: ") == 2
    assert max(float((a - b).abs().max()) for a, b in zip(conv.state, whole, strict=True)) < 1e-4


def test_bake_then_generate_equals_generating_after_the_prompt(app, pip_model):
    _, url = app
    client = Client(url, verbose=False)
    prompt = "WEATHER. Oslo: snowy, -3 C, calm. Wear boots. END.\nWEATHER. Lima:"
    msg, files, picked, *_ = client.predict(prompt, api_name="/bake")
    picked = picked["value"]
    assert picked.startswith("baked: ") and "> WEATHER. Oslo" in msg and f"prompt tokens: {len(prompt)}" in msg
    assert len(files) == 4
    formats = {detect_format(f): load_state(f) for f in files}
    assert set(formats) == {"safetensors", "pth", "ai00", "merged"}
    assert formats["safetensors"].shift is not None  # the native file keeps the token shift
    base, tuned = client.predict(" s", picked, *GREEDY, api_name="/complete")
    tok = get_tokenizer("bytes")
    assert tuned == " s" + pip_greedy(pip_model, prompt + " s", None, tok, 40)
    assert base != tuned


def test_state_inspector_draws_heatmaps(app):
    from PIL import Image

    _, url = app
    norms, diff_png, table = Client(url, verbose=False).predict(WEATHER, "random-fit.safetensors",
                                                                api_name="/inspect")
    for path in (norms, diff_png):
        img = Image.open(path).convert("RGB")
        assert img.width >= 200 and img.height >= 200
        assert len(img.getcolors(1 << 16) or []) > 10  # cells of many shades, not a blank picture
    rows = table.splitlines()
    assert rows[0] == f"A = {WEATHER}" and any(r.startswith("layer h0") for r in rows)
    assert sum(r.split()[0].isdigit() for r in rows if r.strip()) == 12  # one row a layer


@pytest.mark.slow
@pytest.mark.parametrize("name,tokenizer", [("tiny-rwkv-7v0-834K", "bytes"), ("tiny-rwkv-6v0-1m", "utf-16-le")])
def test_v7_and_v6_states_through_pip_state(name, tokenizer, tmp_path):
    """Real v7 and v6 checkpoints, each with a baked state (v7's goes through pip_state: pip's v7 ignores
    time_state): the page's greedy column equals the pip package run by hand, and the state changes the text.
    The tiny v7 barely responds to any state (../shared/models/README.md), so its difference shows in
    sampled text (same seed in both columns) rather than greedy text."""
    from rwkv_state_hub.demo import create_demo, launch_demo

    path = real_model_path(name)
    tok = get_tokenizer(tokenizer)
    pip = load_pip_model(path)
    _, after = pip.forward(tok.encode("Once upon a time, in a quiet village"), None)
    save_native(state_from_pip(after, read_spec(path)), tmp_path / "baked.safetensors")
    demo = create_demo(path, [str(tmp_path)], tokenizer=tokenizer, preview=False)
    then = " w"
    try:
        _, url, _ = launch_demo(demo, port=_free_port(), prevent_thread_lock=True)
        client = Client(url, verbose=False)
        base, tuned = client.predict(then, "baked.safetensors", 0, 1, 16, 0, 0, 0, api_name="/complete")
        sampled = client.predict(then, "baked.safetensors", 1.0, 1.0, 48, 0, 0, 3, api_name="/complete")
    finally:
        demo.close()
        demo.engine.close()
    state = pip_state(load_state(tmp_path / "baked.safetensors"))
    assert tuned == then + pip_greedy(pip, then, state, tok, 16)
    assert base == then + pip_greedy(pip, then, None, tok, 16)
    assert sampled[0] != sampled[1]
    if name.startswith("tiny-rwkv-6"):
        assert base != tuned


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")  # huggingface_hub's LFS upload
def test_hub_states_are_pulled_and_carded(hub_server, tmp_path):
    """--states entries that are Hub repo ids, pushed to the loopback Hub (tests/hub_server.py) and pulled
    through the real huggingface_hub client: the state for this model is offered with its pushed model card
    and generates exactly what the same local file does; a state pushed for another model of the same shape,
    and a repo that does not exist, are listed as not offered, with the reason, not a crash."""
    from rwkv_state_hub.demo import create_demo, launch_demo

    spec = read_spec(MODEL)
    weather = EXAMPLE_STATES / WEATHER
    push(weather, "alice/weather-5v2", token=ALICE)
    other_model = tmp_path / "other-5v2.pth"  # the bundled model's dims, other weights: only sha256 tells them apart
    save_checkpoint(random_checkpoint("v5.2", n_layer=spec.n_layer, n_embd=spec.n_embd, head_size=spec.head_size,
                                      vocab_size=spec.vocab_size, seed=11), other_model)
    other_spec = read_spec(other_model)
    assert other_spec.state_shape() == spec.state_shape() and other_spec.sha256 != spec.sha256
    push(random_state_like(other_spec, seed=6, scale=0.5), "alice/other-5v2", token=ALICE)

    demo = create_demo(MODEL, [str(weather), "alice/weather-5v2", "alice/other-5v2", "alice/no-such-state"],
                       preview=False)
    try:
        engine = demo.engine
        assert list(engine.states) == [WEATHER, "hub: alice/weather-5v2"]
        assert engine.states["hub: alice/weather-5v2"].origin == "the Hub: alice/weather-5v2"
        assert len(engine.skipped) == 2, engine.skipped
        refused, missing = engine.skipped
        assert refused.startswith(f"alice/other-5v2: made for other-5v2 (sha256 {other_spec.sha256[:12]}), but "
                                  f"tiny-rwkv-5v2-730K") and spec.sha256[:12] in refused, refused
        assert missing.startswith("alice/no-such-state: no such repo on the Hub"), missing
        assert "Traceback" not in refused + missing and ALICE not in refused + missing
        _, url, _ = launch_demo(demo, port=_free_port(), prevent_thread_lock=True)
        client = Client(url, verbose=False)
        readme = hub_server.files("alice/weather-5v2")["README.md"].decode()
        assert "alice/weather-5v2" in readme and "tiny-rwkv-5v2-730K" in readme
        # the pushed model card, as Gradio's Markdown shows it (its ends trimmed)
        assert client.predict("hub: alice/weather-5v2", api_name="/card") == readme.strip()
        assert client.predict(WEATHER, api_name="/card").startswith(f"**{WEATHER}** (a local file)")  # its metadata
        with urllib.request.urlopen(url.rstrip("/") + "/config", timeout=10) as r:
            page = r.read().decode()
        assert "Not offered (2)" in page and "- alice/other-5v2: made for other-5v2 (sha256" in page
        base, from_hub = client.predict("W", "hub: alice/weather-5v2", *GREEDY, api_name="/complete")
        base_again, from_file = client.predict("W", WEATHER, *GREEDY, api_name="/complete")
        assert from_hub == from_file and base == base_again and from_hub != base
        with pytest.raises(Exception, match="not in the list of choices"):
            client.predict("W", "hub: alice/other-5v2", *GREEDY, api_name="/complete")
    finally:
        demo.close()
        demo.engine.close()
    # nothing of the refused state was downloaded: its manifest named another model
    assert not [p for p in hub_server.requests("GET", "/alice/other-5v2/resolve/") if p.endswith(".safetensors")]
    with pytest.raises(StateHubError, match="no such file or folder"):
        create_demo(MODEL, [str(tmp_path / "missing.pth")], preview=False)


# ---------------------------------------------------------------- the two start commands, and a real browser


def _wait_for(url: str, procs: list[subprocess.Popen], timeout: float) -> str:
    end = time.time() + timeout
    while time.time() < end:
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"exited with {p.returncode}: {p.stdout.read() if p.stdout else ''}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.read().decode()
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout} s")


@pytest.mark.slow
def test_app_py_and_the_cli_serve_the_same_page(tmp_path):
    ports = [_free_port(), _free_port()]
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "RWKV_STATE_HUB_PREVIEW": "0", "OMP_NUM_THREADS": "1",
           "GRADIO_SERVER_PORT": str(ports[0])}
    env.pop("RWKV_STATE_HUB_STATES", None)
    env.pop("RWKV_STATE_HUB_MODEL", None)
    cli = [sys.executable, "-m", "rwkv_state_hub.cli", "demo", "--port", str(ports[1])]  # the defaults, as app.py
    procs = [subprocess.Popen([sys.executable, str(REPO / "app.py")], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
             subprocess.Popen(cli, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)]
    said: list[list[str]] = [[], []]
    readers = [threading.Thread(target=lambda p=p, lines=lines: lines.extend(p.stdout), daemon=True)
               for p, lines in zip(procs, said, strict=True)]
    for r in readers:
        r.start()
    try:
        for port in ports:
            page = _wait_for(f"http://127.0.0.1:{port}/config", procs, 180)
            assert "rwkv7-example-L4-D256" in page and "weather.safetensors" in page
        # the page answers while Gradio's launch() is still finishing: the message comes once it returns
        end = time.time() + 60
        while time.time() < end and not all(any("public link" in line for line in lines) for lines in said):
            time.sleep(0.2)
    finally:
        for p in procs:
            p.terminate()
    for p, r in zip(procs, readers, strict=True):
        p.wait(timeout=30)
        r.join(timeout=30)
    app_says, cli_says = ("".join(lines) for lines in said)
    # each says how to share the page in its own words: Python's for app.py, the flag for the command line
    assert "pass share=True" in app_says and "--share" not in app_says, app_says
    assert "pass --share" in cli_says and "share=True" not in cli_says, cli_says


def test_launch_message_speaks_the_callers_words():
    """Gradio would tell a command-line user to "set share=True in launch()": the page says it as the caller
    types it, `--share` once the command line asked for flags (errors.speak_cli), `share=True` otherwise."""
    from rwkv_state_hub.demo.page import launch_message
    from rwkv_state_hub.errors import speak_cli

    url = "http://127.0.0.1:7860/"
    assert launch_message(url, shared=False).splitlines() == [f"* Running on local URL:  {url}",
                                                              "* To create a public link, pass share=True"]
    assert launch_message(url, shared=True) == f"* Running on local URL:  {url}"
    speak_cli()
    try:
        assert launch_message(url, shared=False).endswith("pass --share")
    finally:
        speak_cli(False)


def test_cli_demo_refuses_a_missing_state_folder(tmp_path):
    from click.testing import CliRunner

    from rwkv_state_hub.cli import cli

    r = CliRunner().invoke(cli, ["demo", "--model", str(MODEL), "--states", str(tmp_path / "nope")])
    assert r.exit_code == 1 and "nope: no such file or folder" in r.output
    assert "Traceback" not in r.output


def test_headless_chromium_screenshot(app, tmp_path):
    from PIL import Image, ImageStat

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    _, url = app
    shot = tmp_path / "demo.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--no-first-run", "--hide-scrollbars",
                    f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=15000",
                    f"--screenshot={shot}", "--window-size=1280,900", url],
                   check=True, capture_output=True, timeout=120)
    img = Image.open(shot).convert("RGB")
    assert img.size == (1280, 900)
    assert max(ImageStat.Stat(img).stddev) > 20  # text and widgets, not a blank page
    assert len(img.getcolors(1 << 20) or []) > 50

"""The demo page against hostile input (issue 16): malformed third-party repos and files are listed under
"Not offered" instead of taking the page down, a stranger's text never reaches the page as HTML (checked in
headless Chromium), a refused upload leaves nothing on disk, and SIGTERM/SIGINT remove the work folder."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from conftest import ALICE, REPO, random_state_like
from hub_server import copy_repo

from rwkv_state_hub import State, push, read_spec
from rwkv_state_hub.formats import save_native, save_pth

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
pytestmark = [  # Gradio's queue still uses pandas options that pandas 3 deprecates: not ours to fix
    pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
    pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning"),  # huggingface_hub's LFS upload
]
MODEL = REPO / "rwkv_state_hub" / "examples" / "models" / "tiny-rwkv-5v2-730K.pth"
WEATHER = REPO / "tests" / "fixtures" / "weather-5v2.safetensors"
TITLE = "rwkv-state-hub demo"
# each payload, if it ran, would set the page title to "pwned-..."
PAYLOADS = [
    "<script>document.title='pwned-script'</script>",
    "<img src=x onerror=\"document.title='pwned-img'\">",
    "<svg onload=\"document.title='pwned-svg'\"></svg>",
    "<a href=\"javascript:document.title='pwned-a'\">raw link</a>",
    "[md link](javascript:document.title='pwned-md')",
    "<iframe src=\"javascript:document.title='pwned-iframe'\"></iframe>",
    "$$\\href{javascript:document.title='pwned-tex'}{tex}$$",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- one bad entry never takes the page down


def _variant(hub, name: str, manifest_changes: dict | None = None, files: dict | None = None) -> str:
    """alice/<name>: alice/good with its manifest and files changed."""
    manifest = json.loads(hub.files("alice/good")["rwkv-state.json"])
    changes = dict(files or {})
    if manifest_changes is not None:
        changes["rwkv-state.json"] = json.dumps({**manifest, **manifest_changes}).encode()
    copy_repo(hub, "alice/good", f"alice/{name}", changes)
    return f"alice/{name}"


@pytest.mark.slow
def test_hostile_hub_repos_are_listed_not_offered(hub_server):
    """The issue's examples (a manifest whose base_model is a string, 200k-deep JSON, a 300-character file
    name) and their kind: each such repo is one line under "Not offered" naming it; the page starts, and
    the good repo, and states whose card is unreadable or too big (shown by their metadata instead), are
    offered."""
    from rwkv_state_hub.demo import MAX_SCAN_BYTES, create_demo
    from rwkv_state_hub.hub import MAX_CARD_BYTES

    push(WEATHER, "alice/good", token=ALICE)
    good = json.loads(hub_server.files("alice/good")["rwkv-state.json"])
    native = good["files"]["native"]
    long_name = "a" * 300 + ".safetensors"
    bad = [
        _variant(hub_server, "str-base", {"base_model": "str", "base_model_sha256": "0" * 64}),
        _variant(hub_server, "deep", files={"rwkv-state.json": b"[" * 200_000 + b"]" * 200_000}),
        _variant(hub_server, "long-name", {"files": {"native": {**native, "path": long_name}}},
                 {long_name: hub_server.files("alice/good")[native["path"]]}),
        _variant(hub_server, "huge-state", {"files": {"native": {**native, "size": MAX_SCAN_BYTES + 1}}}),
        _variant(hub_server, "files-a-list", {"files": ["state.safetensors"]}),
    ]
    unreadable_card = _variant(hub_server, "bad-card", files={"README.md": b"\xff\xfe not UTF-8"})
    big_card = _variant(hub_server, "big-card", files={"README.md": b"x" * (MAX_CARD_BYTES + 1)})

    demo = create_demo(MODEL, ["alice/good", *bad, unreadable_card, big_card], preview=False)
    engine = demo.engine
    assert sorted(engine.states) == ["hub: alice/bad-card", "hub: alice/big-card", "hub: alice/good"]
    assert len(engine.skipped) == len(bad), engine.skipped
    for repo, line in zip(bad, engine.skipped, strict=True):
        assert line.startswith(f"{repo}") and "\n" not in line and "Traceback" not in line, line
        assert len(line) <= 500
    assert "not downloaded" in engine.skipped[3]
    assert not hub_server.requests("GET", "/alice/huge-state/resolve/main/state.safetensors")
    for repo, why in ((unreadable_card, "not UTF-8"), (big_card, "KB, over the 1024 KB shown")):
        card = engine.card(f"hub: {repo}", None)
        assert card.startswith("**state.safetensors** (the Hub: alice/") and "its model card is not shown" in card
        assert why in card
    assert engine.card("hub: alice/good", None) == hub_server.files("alice/good")["README.md"].decode()


def test_local_entries_that_cannot_be_read_are_listed(tmp_path):
    """A file that fails to read (an OSError, not a format problem), a name that Markdown would read as
    HTML, a non-UTF-8 name, an entry whose name the OS refuses: each is a line, the good state is offered,
    and every label and line can be sent to the browser (JSON has no lone surrogates)."""
    from rwkv_state_hub.demo import create_demo, launch_demo

    spec = read_spec(MODEL)
    folder = tmp_path / "states"
    folder.mkdir()
    save_native(random_state_like(spec, seed=1, scale=0.5), folder / "good.safetensors")
    os.symlink("/proc/self/mem", folder / "mem.pth")  # a regular file to stat, an I/O error to read
    (folder / "<img src=x onerror=alert(1)>.pth").write_bytes(b"junk")
    save_native(random_state_like(spec, seed=2, scale=0.5), folder / "latin1.safetensors")
    os.rename(folder / "latin1.safetensors", os.fsencode(folder) + b"/caf\xe9.safetensors")
    too_long = str(tmp_path / ("x" * 300))

    demo = create_demo(MODEL, [str(folder), too_long], preview=False)
    try:
        engine = demo.engine
        assert "good.safetensors" in engine.states
        skipped = "\n".join(engine.skipped)
        assert "mem.pth: cannot" in skipped and "(Input/output error)" in skipped
        assert "<img src=x onerror=alert(1)>.pth: neither safetensors nor a PyTorch file" in skipped
        assert f"{too_long[:100]}" in skipped and "File name too long" in skipped
        for text in [*engine.states, *engine.skipped]:
            text.encode("utf-8")  # no lone surrogate: the page's JSON can carry it
            assert "\n" not in text
        _, url, _ = launch_demo(demo, port=_free_port(), prevent_thread_lock=True)
        with urllib.request.urlopen(url + "config", timeout=30) as r:  # the page's configuration, as sent
            config = r.read().decode()
        assert "good.safetensors" in config and "caf" in config
    finally:
        demo.close()
        demo.engine.close()


def _rendered(markdown: str) -> str:
    markdown_it = pytest.importorskip("markdown_it")
    return markdown_it.MarkdownIt("commonmark").render(markdown)


def test_describe_state_shows_a_strangers_metadata_as_text():
    """Metadata is shown as the text it is: no tag, link, image or LaTeX from a file becomes markup, and
    values of any JSON type are shown, never a crash."""
    from rwkv_state_hub.demo import Offered, describe_state
    from rwkv_state_hub.demo.render import md

    payload = " ".join(PAYLOADS)
    meta = {"arch": ["v5.2"], "base_model_name": payload, "base_model_sha256": "<b>sha</b>",
            "training": {"method": payload, "steps": {"a": 1}, "tokens_seen": [1, 2], "best_val_loss": payload,
                         "data_files": "x\n# heading <img src=x onerror=alert(1)>"}}
    offered = Offered(State(torch.zeros(2, 1, 4, 4), None, meta, source="/x/<script>x</script>.pth"),
                      "uploaded <i>me</i>", notes=["`code` *bold* [a](javascript:alert(1))"])
    html = _rendered(describe_state(offered))
    for tag in ("<script", "<img", "<svg", "<a ", "<iframe", "<code", "<em", "<h1", "<i>", "<b>"):
        assert tag not in html, (tag, html)
    assert "$$" not in describe_state(offered)  # LaTeX delimiters are escaped (and LaTeX is off on the page)
    assert "&lt;img src=x onerror=&quot;document.title='pwned-img'&quot;&gt;" in html  # shown, as text
    assert _rendered(md("a < b & [c](d) *e*")) == "<p>a &lt; b &amp; [c](d) *e*</p>\n"
    for odd in ({"training": ["not", "a", "dict"]}, {"training": {"data_files": 3, "steps": None}}, {}):
        describe_state(Offered(State(torch.zeros(2, 1, 4, 4), None, odd), "a local file"))


# ---------------------------------------------------------------- in a real browser


class _Dom(HTMLParser):
    """Every tag and attribute of a dumped DOM, its text, its inline scripts and the page title."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.text: list[str] = []
        self.scripts: list[str] = []
        self.title, self._tag = "", ""

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, {k: v or "" for k, v in attrs}))
        self._tag = tag

    def handle_endtag(self, tag):
        self._tag = ""

    def handle_data(self, data):
        self.text.append(data)
        if self._tag == "title":
            self.title += data
        elif self._tag == "script":
            self.scripts.append(data)


def _dump_dom(url: str, tmp_path: Path) -> _Dom:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    out = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                          "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
                          "--virtual-time-budget=15000", "--dump-dom", url],
                         check=True, capture_output=True, text=True, timeout=120)
    dom = _Dom()
    dom.feed(out.stdout)
    return dom


@pytest.mark.slow
@pytest.mark.parametrize("where", ["hub model card", "state metadata and file names"])
def test_strangers_text_runs_no_script_in_chromium(where, hub_server, tmp_path):
    """The page opens on the only offered state, whose card (a Hub README, or the Markdown made from the
    state's metadata) holds script tags, event handlers, javascript: links and LaTeX; headless Chromium
    loads it: the card's text is on the page, the title is untouched, and no element carries an event
    handler, a javascript: URL, an iframe or a script of the payload."""
    from rwkv_state_hub.demo import create_demo, launch_demo

    marker = "CARD-MARKER-1729"
    payload = "\n\n".join(PAYLOADS)
    spec = read_spec(MODEL)
    if where == "hub model card":
        push(WEATHER, "alice/hostile", token=ALICE)
        hub_server.add_file("alice/hostile", "README.md", f"# {marker}\n\n{payload}\n".encode())
        states = ["alice/hostile"]
    else:
        folder = tmp_path / "states"
        folder.mkdir()
        state = random_state_like(spec, seed=1, scale=0.5)
        state.metadata["training"] = {"method": f"{marker} {' '.join(PAYLOADS)}", "data_files": PAYLOADS}
        save_native(state, folder / "<img src=x onerror=document.title='pwned-name'>.safetensors")
        (folder / "<svg onload=document.title='pwned-skip'>.pth").write_bytes(b"junk")
        states = [str(folder)]
    demo = create_demo(MODEL, states, preview=False)
    try:
        assert len(demo.engine.states) == 1
        _, url, _ = launch_demo(demo, port=_free_port(), prevent_thread_lock=True)
        dom = _dump_dom(url, tmp_path)
    finally:
        demo.close()
        demo.engine.close()
    assert marker in "".join(dom.text), "the card did not render: the test would prove nothing"
    assert dom.title == TITLE
    for tag, attrs in dom.tags:
        assert tag != "iframe", attrs
        assert not [k for k in attrs if k.startswith("on")], (tag, attrs)
        assert not [v for v in attrs.values() if "javascript:" in v.replace(" ", "").lower()], (tag, attrs)
    # the payload travels only as data: JSON that Gradio assigns in a script, with every "<" written \u003c
    # so that it cannot end the script; never as a script of its own
    for script in (s for s in dom.scripts if "pwned" in s):
        assert script.startswith("window.gradio_") and "<" not in script, script[:300]


# ---------------------------------------------------------------- leftovers: uploads and the work folder


def _files_named(folder: Path, name: str) -> list[Path]:
    return [Path(root) / f for root, _, files in os.walk(folder) for f in files if f == name]


def test_uploads_are_deleted_once_read_or_refused(tmp_path):
    """An upload refused for its size or its content, and one accepted (its state is kept in memory), are
    gone from Gradio's upload folder when the answer arrives; a file outside that folder is never deleted."""
    from gradio.utils import get_upload_folder
    from gradio_client import Client, handle_file

    from rwkv_state_hub.demo import create_demo, launch_demo
    from rwkv_state_hub.demo.page import _discard_upload

    tag = os.urandom(4).hex()
    too_big, junk, good = (tmp_path / f"{kind}-{tag}.pth" for kind in ("too-big", "junk", "good"))
    too_big.write_bytes(b"\x80" + bytes(2 << 20))
    junk.write_bytes(b"not a state")
    save_pth(random_state_like(read_spec(MODEL), seed=4, scale=0.5), good)
    demo = create_demo(MODEL, [], max_upload_bytes=1 << 20, preview=False)
    try:
        _, url, _ = launch_demo(demo, port=_free_port(), prevent_thread_lock=True)
        client = Client(url, verbose=False)
        for path, answer in ((too_big, "**Not loaded.**"), (junk, "**Not loaded.**"), (good, "**Loaded**")):
            msg, *_ = client.predict(handle_file(path), api_name="/upload")
            assert msg.startswith(answer), msg
            assert _files_named(Path(get_upload_folder()), path.name) == []
    finally:
        demo.close()
        demo.engine.close()
    _discard_upload(good)  # not in the upload folder: left alone
    assert good.exists()


def _wait_for(url: str, proc: subprocess.Popen, timeout: float) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise AssertionError(f"exited with {proc.returncode}: {proc.stdout.read() if proc.stdout else ''}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"{url} did not answer within {timeout} s")


@pytest.mark.slow
def test_sigterm_and_sigint_remove_the_work_folder(tmp_path):
    """`python app.py` stopped with SIGTERM (what a Space or docker stop sends) and `rwkv-state demo`
    stopped with Ctrl-C both exit and leave no work folder behind, after a bake wrote files into it."""
    from gradio_client import Client

    procs = []
    for i, (command, sig) in enumerate(((["app.py"], signal.SIGTERM),
                                        (["-m", "rwkv_state_hub.cli", "demo", "--model", str(MODEL)], signal.SIGINT))):
        tmp = tmp_path / f"tmp{i}"
        tmp.mkdir()
        port = _free_port()
        env = {**os.environ, "TMPDIR": str(tmp), "GRADIO_SERVER_PORT": str(port), "RWKV_STATE_HUB_PREVIEW": "0",
               "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1"}
        args = [*command, "--port", str(port)] if sig == signal.SIGINT else command
        procs.append((subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True), sig, tmp, port))
    try:
        for proc, sig, tmp, port in procs:
            url = f"http://127.0.0.1:{port}/"
            _wait_for(url + "config", proc, 180)
            Client(url, verbose=False).predict("WEATHER. Oslo:", api_name="/bake")
            assert list(tmp.glob("rwkv-state-demo-*/bake-*/*.safetensors")), list(tmp.iterdir())
            proc.send_signal(sig)
        for proc, sig, tmp, _ in procs:
            output = proc.communicate(timeout=60)[0]
            assert proc.returncode is not None and proc.returncode != -sig, (sig, proc.returncode, output)
            assert not list(tmp.glob("rwkv-state-demo-*")), (sig, output)
    finally:
        for proc, *_ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

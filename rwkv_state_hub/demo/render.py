"""The demo's text, as Markdown: state cards, the page header, the answers to an upload or a bake.

No gradio here. Every value that comes from a file, the Hub or a visitor goes through `md()` (shown as it is
typed, never as markup) and `one_line()` (one printable line of bounded length), so that no HTML and no link
of a stranger's reaches the page as markup.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .engine import DemoEngine, Offered

MAX_SHOWN_CHARS = 500  # one line of a stranger's text (a file name, a metadata value) on the page
_MARKUP = re.compile(r"([\\`*_~\[\]<>&$|])")


def one_line(text: object, limit: int = MAX_SHOWN_CHARS) -> str:
    """A stranger's text (a file name, a metadata value, an error naming them) as one printable line of at
    most `limit` characters: no line breaks to start a new Markdown block, no lone surrogates (a non-UTF-8
    file name) that would make the page's JSON unsendable."""
    line = " ".join(str(text).split()).encode("utf-8", "backslashreplace").decode("utf-8")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def md(text: object, limit: int = MAX_SHOWN_CHARS) -> str:
    """Text for a Markdown component, shown as it is typed: every character that Markdown or HTML would read
    as markup (a tag, an entity, a link or image, emphasis, code, a table cell, LaTeX) is backslash-escaped,
    so that no HTML and no link from a file or the Hub reaches the page. Gradio also sanitizes what Markdown
    renders (DOMPurify in the browser), which is what keeps a Hub model card, shown as Markdown, safe."""
    return _MARKUP.sub(r"\\\1", one_line(text, limit))


def describe_state(offered: Offered) -> str:
    """What a state's metadata says, as Markdown: base model, how it was made, figures. Every value comes from
    the file (a stranger's, for an upload or a Hub state), so each is shown as text, whatever its type."""
    s = offered.state
    meta = s.metadata
    training = meta.get("training") if isinstance(meta.get("training"), dict) else {}
    lines = [f"**{md(Path(s.source).name)}** ({md(offered.origin)})", "",
             f"- RWKV {md(s.arch)}, {s.dims()}, token shift: {'yes' if s.shift is not None else 'no'}"]
    if meta.get("base_model_name"):
        lines.append(f"- base model: {md(meta['base_model_name'])} "
                     f"(sha256 {md(str(meta.get('base_model_sha256'))[:12])})")
    if training.get("method"):
        lines.append(f"- made by: {md(training['method'])}")
    for key, what in (("steps", "steps"), ("tokens_seen", "tokens seen"), ("best_val_loss", "best validation loss"),
                      ("prompt_tokens", "prompt tokens")):
        value = training.get(key)
        if value is not None:
            lines.append(f"- {what}: {value:.4f}" if isinstance(value, float) else f"- {what}: {md(value)}")
    files = training.get("data_files")
    if files:
        lines.append(f"- data: {md(', '.join(map(str, files)) if isinstance(files, list) else files)}")
    lines += [f"- note: {md(n)}" for n in offered.notes]
    return "\n".join(lines)


def header(engine: DemoEngine) -> str:
    """The page's title line: the model, its tokenizer, the runtime, and how many states fit it."""
    spec = engine.spec
    return (f"# RWKV state hub: the base model and a state, side by side\n"
            f"**{md(spec.name)}** · RWKV {spec.arch} · {spec.dims()} · sha256 `{(spec.sha256 or '')[:12]}` · "
            f"tokenizer {md(engine.tokenizer.name)} · `rwkv` pip package, {md(engine.strategy)} · "
            f"{len(engine.states)} state(s) that fit this model")


def not_offered(skipped: list[str]) -> str:
    """The entries the page could not offer, one line each with its reason."""
    return "\n".join(f"- {md(s)}" for s in skipped)


def loaded(label: str, model_name: str, notes: list[str]) -> str:
    """The answer to an accepted upload."""
    return f"**Loaded** {md(label)}: fits {md(model_name)}." + "".join(f"\n\nNote: {md(n)}" for n in notes)


def refused(error: Exception) -> str:
    """The answer to a refused upload: the reason, as text."""
    return f"**Not loaded.** {md(error)}"


def baked(label: str, prompt: str, offered: Offered, notes: list[str], limit: int) -> str:
    """The answer to a bake: the prompt quoted, the new state's card, and what each export format said."""
    quoted = "\n".join(f"> {md(line, limit)}" for line in prompt.splitlines()) or ">"
    return (f"**{md(label)}**, baked from:\n\n{quoted}\n\n{describe_state(offered)}\n\n"
            + "".join(f"- {md(n)}\n" for n in notes))

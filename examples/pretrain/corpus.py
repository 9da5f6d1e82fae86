"""The example model's text: styles extracted from installed Debian packages, split into train and held-out text.

A style is a folder holding train.txt and val.txt (the bytes the package ships, UTF-8). `build_data` makes
them from the files that sources.toml (beside this file) names, split into documents (files, dictionary
entries, chapters) of which every VAL_EVERY-th is held out. `Mixture` samples pretraining windows from them.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import re
import subprocess
import tomllib
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from rwkv_state_hub.errors import StateHubError

SOURCES = Path(__file__).with_name("sources.toml")
VAL_EVERY = 20  # document i is held out when i % VAL_EVERY == VAL_EVERY // 2: 5% of each style
ROLES = ("pretrain", "states")  # the two sub-folders of a data dir: styles pretrained on, styles kept out
_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _dictd_number(text: str) -> int:
    """dictd's index writes offsets and lengths as base-64 numbers (most significant digit first)."""
    value = 0
    for ch in text:
        value = value * 64 + _B64.index(ch)
    return value


def _dictd_entries(prefix: str) -> list[bytes]:
    """The entries of a dictd dictionary (prefix.index + prefix.dict.dz), in file order, without dictfmt's
    own 00-database-* header entries; headwords that share an entry yield it once."""
    index, data = Path(prefix + ".index"), Path(prefix + ".dict.dz")
    text = gzip.decompress(_read(data))
    spans = set()
    for line in _read(index).decode("utf-8").splitlines():
        word, offset, length = line.split("\t")[:3]
        if not word.replace("-", "").startswith("00database"):
            spans.add((_dictd_number(offset), _dictd_number(length)))
    return [text[start : start + size] for start, size in sorted(spans)]


def _files(pattern: str) -> list[bytes]:
    """Every file the glob matches (recursively with **), in sorted order: one document each."""
    paths = sorted(glob.glob(pattern, recursive=True))
    if not paths:
        raise StateHubError(f"no file matches {pattern}")
    return [_read(Path(p)) for p in paths]


def _command(argv: list[str], split: str) -> list[bytes]:
    """A program's output, cut into documents before every match of the regular expression `split`."""
    try:
        out = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, check=True, timeout=300).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise StateHubError(f"running {' '.join(argv)} failed: {e}") from None
    return [doc for doc in re.split(split.encode(), out) if doc.strip()]


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise StateHubError(f"{path}: {e.strerror or e}") from None


READERS: dict[str, Callable[[dict], list[bytes]]] = {
    "dictd": lambda s: _dictd_entries(s["dictd"]),
    "files": lambda s: _files(s["files"]),
    "command": lambda s: _command(s["command"], s["split"]),
}


def read_sources(path: Path = SOURCES) -> list[dict]:
    """The [[style]] tables of sources.toml, each with exactly one way to read it."""
    styles = tomllib.loads(path.read_text())["style"]
    for s in styles:
        kinds = [k for k in READERS if k in s]
        if len(kinds) != 1 or s.get("role") not in ROLES:
            raise StateHubError(f"{path}: style {s.get('name')!r} needs one of {', '.join(READERS)} and a role "
                                f"in {ROLES}")
        s["kind"] = kinds[0]
    return styles


def _package_versions(packages: list[str]) -> dict[str, str]:
    """What dpkg says is installed, so that the data list records the exact versions used."""
    versions = {}
    for name in packages:
        try:
            out = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", name], capture_output=True, text=True)
            versions[name] = out.stdout.strip() if out.returncode == 0 else "not installed"
        except OSError:
            versions[name] = "unknown (no dpkg-query)"
    return versions


def build_data(out: Path, sources: Path = SOURCES) -> None:
    """Extract every style of sources.toml into out/<role>/<name>/{train,val}.txt (and train/val.jsonl of
    whole documents for the styles kept for states), and record what was used in out/sources.json."""
    record = []
    for s in read_sources(sources):
        try:
            docs = READERS[s["kind"]](s)
        except StateHubError as e:
            raise StateHubError(f"style {s['name']}: {e}; install it with apt-get install "
                                f"{' '.join(s['packages'])}") from None
        held = [i % VAL_EVERY == VAL_EVERY // 2 for i in range(len(docs))]
        folder = out / s["role"] / s["name"]
        folder.mkdir(parents=True, exist_ok=True)
        for split, keep in (("train", False), ("val", True)):
            part = [d for d, h in zip(docs, held, strict=True) if h == keep]
            (folder / f"{split}.txt").write_bytes(b"\n".join(d.rstrip(b"\n") + b"\n" for d in part))
            if s["role"] == "states":
                lines = (json.dumps({"text": d.decode("utf-8", errors="replace").strip()}) for d in part)
                (folder / f"{split}.jsonl").write_text("".join(line + "\n" for line in lines))
        record.append({"name": s["name"], "role": s["role"], "licence": s["licence"], "about": s["about"],
                       "packages": _package_versions(s["packages"]), "documents": len(docs),
                       "train_bytes": (folder / "train.txt").stat().st_size,
                       "val_bytes": (folder / "val.txt").stat().st_size,
                       "sha256": style_sha256(folder)})
    (out / "sources.json").write_text(json.dumps(record, indent=1) + "\n")


def style_sha256(folder: Path) -> str:
    """One digest of a style's train and val text: a checkpoint records it, so a resume on other data stops."""
    h = hashlib.sha256()
    for split in ("train", "val"):
        h.update(_read(folder / f"{split}.txt"))
    return h.hexdigest()


def load_styles(data_dir: Path, role: str) -> dict[str, dict[str, bytes]]:
    """{style: {"train": bytes, "val": bytes}} for every style folder under data_dir/role (sorted by name)."""
    styles = {}
    for folder in sorted((data_dir / role).glob("*/train.txt")):
        folder = folder.parent
        styles[folder.name] = {split: _read(folder / f"{split}.txt") for split in ("train", "val")}
    return styles


class Mixture:
    """Pretraining windows of ctx + 1 bytes: row i of step s comes from style (s * batch + i) mod n_styles
    (each style equally often, whatever its size), at a position drawn from a generator seeded by (seed, s).
    A step's batch depends only on (seed, step), so a resumed run sees exactly the batches it would have."""

    def __init__(self, texts: dict[str, bytes], ctx: int, seed: int):
        short = [name for name, t in texts.items() if len(t) <= ctx + 1]
        if not texts or short:
            raise StateHubError(f"every style needs more than {ctx + 1} bytes of training text; "
                                f"too short: {', '.join(short) or 'no style found'}")
        self.names = list(texts)
        self.texts = [torch.frombuffer(bytearray(t), dtype=torch.uint8) for t in texts.values()]
        self.ctx, self.seed = ctx, seed

    def batch(self, step: int, batch: int) -> Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        rows = []
        for i in range(batch):
            text = self.texts[(step * batch + i) % len(self.texts)]
            start = int(torch.randint(0, len(text) - self.ctx, (1,), generator=g))
            rows.append(text[start : start + self.ctx + 1])
        return torch.stack(rows).long()


def eval_windows(text: bytes, ctx: int, n: int) -> Tensor:
    """Up to n windows of ctx + 1 bytes, evenly spaced over a held-out text: the same windows on every call."""
    if len(text) <= ctx + 1:
        raise StateHubError(f"held-out text of {len(text)} bytes is shorter than one window of {ctx + 1}")
    t = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    last = len(text) - ctx - 1
    starts = sorted({round(i * last / max(1, n - 1)) for i in range(n)})
    return torch.stack([t[s : s + ctx + 1] for s in starts]).long()

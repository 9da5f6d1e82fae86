"""File plumbing shared by every writer and reader: atomic writes and cached sha256."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from tqdm.auto import tqdm

from .errors import StateHubError

_CHUNK = 8 << 20
_PROGRESS_FROM = 512 << 20  # show a progress bar when hashing files larger than this


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds.

    A reader never sees a half-written file, and an interrupted write leaves the old file intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, _mode_for(path))
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _mode_for(path: Path) -> int:
    """Keep an existing file's permissions; a new file gets the usual 0666 minus the umask (mkstemp gives 0600)."""
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Run `write(tmp_path)` and atomically move the result to `path`."""
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda p: p.write_bytes(data))


def cache_dir() -> Path:
    """Where hashes (and later, downloads) are cached: $RWKV_STATE_HUB_CACHE or ~/.cache/rwkv-state-hub."""
    env = os.environ.get("RWKV_STATE_HUB_CACHE")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rwkv-state-hub"
    return base


def _hash_stream(path: Path, size: int) -> str:
    h = hashlib.sha256()
    bar = tqdm(total=size, unit="B", unit_scale=True, desc=f"sha256 {path.name}", disable=size < _PROGRESS_FROM)
    with open(path, "rb") as f, bar:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def sha256_file(path: str | os.PathLike, use_cache: bool = True) -> str:
    """sha256 of a whole file, streamed; cached by (absolute path, size, mtime) so a 15 GB
    checkpoint is hashed once, not on every run."""
    path = Path(path).resolve()
    try:
        st = path.stat()
    except OSError as e:
        raise StateHubError(f"{path}: cannot read ({e.strerror})") from None
    key = str(path)
    stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    cache_file = cache_dir() / "sha256.json"
    cache: dict = {}
    if use_cache:
        try:
            cache = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            cache = {}
        if not isinstance(cache, dict):
            cache = {}
        hit = cache.get(key)
        if isinstance(hit, dict) and {k: hit.get(k) for k in stamp} == stamp and isinstance(hit.get("sha256"), str):
            return hit["sha256"]
    digest = _hash_stream(path, st.st_size)
    if use_cache:
        cache[key] = {**stamp, "sha256": digest}
        try:
            atomic_write_bytes(cache_file, json.dumps(cache, indent=0, sort_keys=True).encode())
        except OSError:
            pass  # a read-only cache is not worth failing the user's command over
    return digest


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()

"""File plumbing shared by every writer and reader: atomic writes and values cached per file version."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import json
import mmap
import os
import re
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import FileAccessError, StateHubError

if TYPE_CHECKING:
    import torch

_CHUNK = 8 << 20
_PROGRESS_FROM = 512 << 20  # show a progress bar when hashing files larger than this


_TEMP_SUFFIX = ".tmp"
# .NAME.HOST-PID.XXXXXXXX.tmp: the writer's host and process id, so the next write into the folder can tell
# a temp file whose writer died (SIGKILL, power loss) from one that is still being written
_OURS = re.compile(r"^\.(?P<name>.*)\.(?P<host>[A-Za-z0-9-]*)-(?P<pid>\d+)\.[a-z0-9_]{8}\.tmp$")
_OLD_STYLE = re.compile(r"^\..*\.[a-z0-9_]{8}\.tmp$")  # before the writer was named: removed once old
_STALE_AFTER_S = 24 * 3600  # any temp file of ours this old is abandoned (another host, a reused pid)
_OLD_STYLE_AFTER_S = 3600


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:32]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # it exists, under another user
    return True


def _is_stale(entry: os.DirEntry, now: float) -> bool:
    ours = _OURS.match(entry.name)
    if ours is None and not _OLD_STYLE.match(entry.name):
        return False
    try:
        age = now - entry.stat(follow_symlinks=False).st_mtime
    except OSError:
        return False
    if ours is None:
        return age > _OLD_STYLE_AFTER_S
    if ours["host"] == _host() and int(ours["pid"]) != os.getpid() and not _alive(int(ours["pid"])):
        return True
    return age > _STALE_AFTER_S


def remove_stale_temps(folder: Path) -> None:
    """Delete the temp files that interrupted atomic writes left in `folder` (a kill mid-write of a
    multi-GB export would otherwise stay there for ever). Files of live writers are left alone."""
    now = time.time()
    try:
        with os.scandir(folder) as entries:
            stale = [e.path for e in entries if e.name.endswith(_TEMP_SUFFIX) and e.name.startswith(".")
                     and _is_stale(e, now)]
    except OSError:
        return
    for path in stale:
        with contextlib.suppress(OSError):
            os.unlink(path)


def os_reason(e: BaseException) -> str | None:
    """The operating system's reason behind a failed read or write ("No space left on device"), also when a
    library wrapped it (torch.save raises RuntimeError with the OSError as its context; safetensors says
    "os error 28"); None when the failure was not the operating system's."""
    seen = 0
    cause: BaseException | None = e
    while cause is not None and seen < 8:
        if isinstance(cause, OSError) and (cause.strerror or cause.errno):
            return cause.strerror or os.strerror(cause.errno)
        found = re.search(r"os error (\d+)", str(cause))
        if found:
            return os.strerror(int(found.group(1)))
        cause, seen = cause.__cause__ or cause.__context__, seen + 1
    return None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds.

    A reader never sees a half-written file, and an interrupted write leaves the old file intact. A failure
    of the operating system (a full disk, no permission, a read-only folder) becomes one line naming `path`.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # some folder on the way is a file
        raise FileAccessError(f"{path}: cannot write (a part of {path.parent} is not a folder)") from None
    except OSError as e:
        raise FileAccessError(f"{path}: cannot write ({os_reason(e)})") from None
    try:
        remove_stale_temps(path.parent)
        # the target's name is cut short in the temp name, so a 255-byte name still gets a valid temp file
        prefix = f".{path.name[:80]}.{_host()}-{os.getpid()}."
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=_TEMP_SUFFIX, dir=path.parent)
    except OSError as e:
        raise FileAccessError(f"{path}: cannot write ({os_reason(e)})") from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, _mode_for(path))
        os.replace(tmp_path, path)
    except Exception as e:
        reason = None if isinstance(e, StateHubError) else os_reason(e)
        if reason is None:
            raise
        raise FileAccessError(f"{path}: cannot write ({reason})") from None
    finally:
        with contextlib.suppress(OSError):
            tmp_path.unlink(missing_ok=True)


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


def atomic_torch_save(path: str | os.PathLike, obj: object) -> Path:
    """torch.save, atomically. Through a Python file object, so that a failed write keeps its OSError
    (torch.save on a path reports only "unexpected pos")."""
    import torch

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)

    return atomic_write(path, write)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda p: p.write_bytes(data))


def cache_dir() -> Path:
    """Where hashes (and later, downloads) are cached: $RWKV_STATE_HUB_CACHE or ~/.cache/rwkv-state-hub."""
    env = os.environ.get("RWKV_STATE_HUB_CACHE")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rwkv-state-hub"
    return base


def cached_by_stamp(path: str | os.PathLike, name: str, keys: tuple[str, ...],
                    compute: Callable[[], dict[str, str]], use_cache: bool = True) -> dict[str, str]:
    """compute() for a file, remembered in cache_dir()/<name>.json by (absolute path, size, mtime): values that
    take reading the whole file (its hashes, a fingerprint) are computed once per file version. The entry is
    the stamp plus the strings `keys` names; a stale, partial or corrupt entry, or an unreadable or read-only
    cache, only costs the computation."""
    path = Path(path).resolve()
    try:
        st = path.stat()
    except OSError as e:
        raise FileAccessError(f"{path}: cannot read ({e.strerror})") from None
    if not use_cache:
        return compute()
    stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    cache_file = cache_dir() / f"{name}.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    cache = cache if isinstance(cache, dict) else {}
    hit = cache.get(str(path))
    if isinstance(hit, dict) and {k: hit.get(k) for k in stamp} == stamp and \
            all(isinstance(hit.get(k), str) for k in keys):
        return {k: hit[k] for k in keys}
    values = compute()
    cache[str(path)] = {**stamp, **values}
    try:
        atomic_write_bytes(cache_file, json.dumps(cache, indent=0, sort_keys=True).encode())
    except (OSError, StateHubError):
        pass  # a read-only cache is not worth failing the user's command over
    return values


def _hash_stream(path: Path, size: int) -> dict[str, str]:
    """sha256 and sha1 of a file in one read (sha1: what web-rwkv's converter records of its source .pth)."""
    hashes = {"sha256": hashlib.sha256(), "sha1": hashlib.sha1()}  # noqa: S324 - an identity others record, not security
    from tqdm.auto import tqdm  # here, not at the top: the CLI's --help imports this module

    bar = tqdm(total=size, unit="B", unit_scale=True, desc=f"sha256 {path.name}", disable=size < _PROGRESS_FROM)
    try:
        with open(path, "rb") as f, bar:
            while chunk := f.read(_CHUNK):
                for h in hashes.values():
                    h.update(chunk)
                bar.update(len(chunk))
    except OSError as e:
        raise FileAccessError(f"{path}: cannot read ({e.strerror})") from None
    return {name: h.hexdigest() for name, h in hashes.items()}


def sha256_file(path: str | os.PathLike, use_cache: bool = True) -> str:
    """sha256 of a whole file, streamed; cached by (absolute path, size, mtime) so a 15 GB
    checkpoint is hashed once, not on every run."""
    return file_digests(path, use_cache)["sha256"]


def sha1_file(path: str | os.PathLike, use_cache: bool = True) -> str:
    """sha1 of a whole file (computed and cached with its sha256)."""
    return file_digests(path, use_cache)["sha1"]


def file_digests(path: str | os.PathLike, use_cache: bool = True) -> dict[str, str]:
    """{"sha256": ..., "sha1": ...} of a whole file, streamed once; cached by (absolute path, size, mtime)."""
    resolved = Path(path).resolve()
    return cached_by_stamp(resolved, "sha256", ("sha256", "sha1"),
                           lambda: _hash_stream(resolved, resolved.stat().st_size), use_cache)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def page_out_file_pages(t: torch.Tensor) -> None:
    """Let the kernel drop the pages of a tensor memory-mapped from a checkpoint once quantized or copied: else each
    page read counts in RSS until the whole file is unmapped (3 GB for a bf16 1.5B model, all at the peak).
    MADV_PAGEOUT loses nothing (a clean file page is read again if touched); only Linux 5.4+ has it."""
    advice = getattr(mmap, "MADV_PAGEOUT", 21 if sys.platform == "linux" else None)  # Python 3.11 lacks the name
    if advice is None or t.device.type != "cpu" or not t.is_contiguous():
        return
    start = t.data_ptr()
    lo = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE  # whole pages only: a neighbour's tensor may share the others
    hi = (start + t.numel() * t.element_size()) // mmap.PAGESIZE * mmap.PAGESIZE
    if hi > lo and _file_mapped(lo, hi):
        ctypes.CDLL(None, use_errno=True).madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), advice)


def release_free_heap() -> None:
    """Hand the C heap's free pages back to the system (glibc's malloc_trim). Freed temporaries (quantizing a
    model, the probe's pass, each time chunk of a step) otherwise stay resident for the whole run: 0.2-0.3 GiB at
    0.1B with int8/nf4. Nothing where there is no glibc."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, looked up once (release_free_heap runs twice per time chunk of a step)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def _file_mapped(lo: int, hi: int) -> bool:
    """Whether [lo, hi) lies in one mapping of a file (/proc/self/maps: a pathname and an inode)."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split()
                a, b = (int(x, 16) for x in fields[0].split("-"))
                if a <= lo and hi <= b:
                    return len(fields) >= 6 and fields[4] != "0" and fields[5].startswith("/")
    except (OSError, ValueError):
        pass
    return False

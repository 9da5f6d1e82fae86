"""File plumbing: atomic writes and the cached sha256."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

import rwkv_state_hub.files as files
from rwkv_state_hub.errors import StateHubError
from rwkv_state_hub.files import atomic_write, atomic_write_bytes, cache_dir, sha256_file


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A private hash cache folder (never the user's); returns the cache file path."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("RWKV_STATE_HUB_CACHE", str(folder))
    return folder / "sha256.json"


@pytest.fixture
def data_file(tmp_path) -> Path:
    path = tmp_path / "data" / "model.bin"
    path.parent.mkdir()
    path.write_bytes(os.urandom(100_000))
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _count_hashes(monkeypatch) -> list[Path]:
    """Record every real hashing pass."""
    calls: list[Path] = []
    real = files._hash_stream

    def counting(path, size):
        calls.append(path)
        return real(path, size)

    monkeypatch.setattr(files, "_hash_stream", counting)
    return calls


# --- atomic_write -----------------------------------------------------------------------------------------


def test_atomic_write_destination_appears_only_on_success(tmp_path):
    dest = tmp_path / "out" / "state.pth"  # the parent folder is created too
    seen: list[Path] = []

    def writer(tmp: Path):
        seen.append(tmp)
        assert tmp != dest
        assert tmp.parent == dest.parent  # same folder, so the final rename is atomic
        tmp.write_bytes(b"first half")
        assert not dest.exists()  # nobody sees a half-written destination
        with open(tmp, "ab") as f:
            f.write(b" and second half")

    assert atomic_write(dest, writer) == dest
    assert dest.read_bytes() == b"first half and second half"
    assert len(seen) == 1 and not seen[0].exists()
    assert os.listdir(dest.parent) == [dest.name]


def test_atomic_write_replaces_existing(tmp_path):
    dest = tmp_path / "state.pth"
    dest.write_bytes(b"old")
    atomic_write(dest, lambda p: p.write_bytes(b"new content"))
    assert dest.read_bytes() == b"new content"
    assert os.listdir(tmp_path) == [dest.name]


def test_atomic_write_failure_keeps_old_content(tmp_path):
    dest = tmp_path / "state.pth"
    dest.write_bytes(b"old content")
    (tmp_path / "neighbour.txt").write_text("untouched")

    def writer(tmp: Path):
        tmp.write_bytes(b"partial new con")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(dest, writer)
    assert dest.read_bytes() == b"old content"
    assert sorted(os.listdir(tmp_path)) == ["neighbour.txt", "state.pth"]  # no temp file left


def test_atomic_write_failure_creates_nothing(tmp_path):
    dest = tmp_path / "new.pth"

    def writer(tmp: Path):
        tmp.write_bytes(b"partial")
        raise KeyboardInterrupt  # an interrupt is cleaned up too

    with pytest.raises(KeyboardInterrupt):
        atomic_write(dest, writer)
    assert not dest.exists()
    assert os.listdir(tmp_path) == []


def test_atomic_write_failure_after_writer_removed_temp(tmp_path):
    """A writer that deletes its temp file before failing must not make the cleanup itself crash."""
    dest = tmp_path / "x.bin"

    def writer(tmp: Path):
        tmp.unlink()
        raise ValueError("bad data")

    with pytest.raises(ValueError, match="bad data"):
        atomic_write(dest, writer)
    assert os.listdir(tmp_path) == []


def test_atomic_write_bytes(tmp_path):
    dest = tmp_path / "a" / "b" / "blob"
    atomic_write_bytes(dest, b"\x00\x01payload")
    assert dest.read_bytes() == b"\x00\x01payload"
    assert os.listdir(dest.parent) == ["blob"]


# --- cache_dir --------------------------------------------------------------------------------------------


def test_cache_dir_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("RWKV_STATE_HUB_CACHE", str(tmp_path / "c1"))
    assert cache_dir() == tmp_path / "c1"
    monkeypatch.delenv("RWKV_STATE_HUB_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "rwkv-state-hub"


# --- sha256_file ------------------------------------------------------------------------------------------


def test_sha256_matches_hashlib(cache, data_file):
    assert sha256_file(data_file) == _sha(data_file)
    entry = json.loads(cache.read_text())[str(data_file.resolve())]
    st = data_file.stat()
    sha1 = hashlib.sha1(data_file.read_bytes()).hexdigest()
    assert entry == {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": _sha(data_file), "sha1": sha1}


def test_sha256_empty_file(cache, tmp_path):
    path = tmp_path / "empty"
    path.write_bytes(b"")
    assert sha256_file(path) == hashlib.sha256(b"").hexdigest()


def test_sha256_larger_than_one_chunk(cache, tmp_path):
    path = tmp_path / "big"
    path.write_bytes(os.urandom(files._CHUNK + 12345))
    assert sha256_file(path, use_cache=False) == _sha(path)


def test_sha256_second_call_uses_cache(cache, data_file, monkeypatch):
    calls = _count_hashes(monkeypatch)
    first = sha256_file(data_file)
    assert len(calls) == 1

    def boom(path, size):
        raise AssertionError("hashed again although the cache holds this file")

    monkeypatch.setattr(files, "_hash_stream", boom)
    assert sha256_file(data_file) == first == _sha(data_file)
    # the cache is keyed by the resolved path: a relative spelling of the same file hits it too
    monkeypatch.chdir(data_file.parent)
    assert sha256_file(Path(data_file.name)) == first


def test_sha256_recomputed_after_modification(cache, data_file, monkeypatch):
    calls = _count_hashes(monkeypatch)
    old = sha256_file(data_file)
    st = data_file.stat()
    new_bytes = os.urandom(st.st_size)  # same size: only the mtime tells the cache the file changed
    data_file.write_bytes(new_bytes)
    os.utime(data_file, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    assert data_file.stat().st_mtime_ns != st.st_mtime_ns
    new = sha256_file(data_file)
    assert len(calls) == 2
    assert new == hashlib.sha256(new_bytes).hexdigest()
    assert new != old
    assert json.loads(cache.read_text())[str(data_file.resolve())]["sha256"] == new
    assert sha256_file(data_file) == new and len(calls) == 2  # and the new hash is cached


def test_sha256_recomputed_after_size_change(cache, data_file, monkeypatch):
    calls = _count_hashes(monkeypatch)
    sha256_file(data_file)
    st = data_file.stat()
    with open(data_file, "ab") as f:
        f.write(b"more")
    os.utime(data_file, ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime, different size
    assert sha256_file(data_file) == _sha(data_file)
    assert len(calls) == 2


def test_sha256_cache_holds_several_files(cache, tmp_path):
    paths = []
    for i in range(3):
        p = tmp_path / f"f{i}"
        p.write_bytes(os.urandom(1000))
        paths.append(p)
        sha256_file(p)
    stored = json.loads(cache.read_text())
    assert {str(p.resolve()): _sha(p) for p in paths} == {k: v["sha256"] for k, v in stored.items()}


def test_sha256_without_cache_never_touches_cache(cache, data_file, monkeypatch):
    # no cache file: use_cache=False creates none
    assert sha256_file(data_file, use_cache=False) == _sha(data_file)
    assert not cache.parent.exists()

    # a cache entry with the right stamp but a wrong hash: use_cache=False must not read it...
    st = data_file.stat()
    planted = {str(data_file.resolve()): {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": "0" * 64,
                                          "sha1": "0" * 40}}
    cache.parent.mkdir()
    cache.write_text(json.dumps(planted))
    before = cache.stat().st_mtime_ns
    calls = _count_hashes(monkeypatch)
    assert sha256_file(data_file, use_cache=False) == _sha(data_file)
    assert len(calls) == 1
    # ...nor write it
    assert json.loads(cache.read_text()) == planted
    assert cache.stat().st_mtime_ns == before
    assert os.listdir(cache.parent) == ["sha256.json"]
    # while the cached path does trust it (which proves the planted entry was well-formed)
    assert sha256_file(data_file) == "0" * 64


@pytest.mark.parametrize("garbage", [b"{not json", b"\xff\xfe\x00garbage", b""],
                         ids=["bad-json", "binary", "empty"])
def test_sha256_tolerates_corrupt_cache(cache, data_file, garbage):
    cache.parent.mkdir()
    cache.write_bytes(garbage)
    assert sha256_file(data_file) == _sha(data_file)
    # and the cache is rewritten as valid JSON holding the new entry
    assert json.loads(cache.read_text())[str(data_file.resolve())]["sha256"] == _sha(data_file)


@pytest.mark.parametrize("entry", [
    "not a dict",
    {"size": 1, "mtime_ns": 2},
    {"sha256": 5},
], ids=["string", "stale-without-hash", "hash-not-str"])
def test_sha256_ignores_malformed_entry(cache, data_file, entry):
    st = data_file.stat()
    if isinstance(entry, dict) and "sha256" in entry:
        entry = {**entry, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    cache.parent.mkdir()
    cache.write_text(json.dumps({str(data_file.resolve()): entry}))
    assert sha256_file(data_file) == _sha(data_file)


@pytest.mark.parametrize("garbage", ["[]", "null", '"text"', "3"])
def test_sha256_tolerates_cache_that_is_not_an_object(cache, data_file, garbage):
    cache.parent.mkdir()
    cache.write_text(garbage)
    assert sha256_file(data_file) == _sha(data_file)


def test_sha256_unwritable_cache_is_not_fatal(tmp_path, monkeypatch, data_file):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("RWKV_STATE_HUB_CACHE", str(blocker / "cache"))
    assert sha256_file(data_file) == _sha(data_file)


def test_sha256_missing_file(cache, tmp_path):
    path = tmp_path / "missing.pth"
    with pytest.raises(StateHubError) as info:
        sha256_file(path)
    msg = str(info.value)
    assert str(path) in msg
    assert "\n" not in msg
    assert not cache.exists()


def test_atomic_write_gives_normal_permissions_and_keeps_existing_ones(tmp_path):
    old = os.umask(0o022)
    try:
        new = atomic_write_bytes(tmp_path / "new.bin", b"x")
        assert new.stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
        kept = tmp_path / "kept.bin"
        kept.write_bytes(b"old")
        kept.chmod(0o640)
        atomic_write_bytes(kept, b"new")
        assert kept.stat().st_mode & 0o777 == 0o640 and kept.read_bytes() == b"new"
    finally:
        os.umask(old)

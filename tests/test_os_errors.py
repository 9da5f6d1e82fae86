"""The operating system saying no: a full disk, no permission, a read-only folder, /proc, a writer killed
mid-write. Each gives one line naming the path and the reason, leaves nothing partial behind, and our own
stale temp files are removed by the next write into that folder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from rwkv_state_hub.cli import cli
from rwkv_state_hub.errors import StateHubError
from rwkv_state_hub.files import _host, atomic_write, atomic_write_bytes
from rwkv_state_hub.formats import save_native
from rwkv_state_hub.state import State


@pytest.fixture
def state_file(tmp_path) -> Path:
    """A 4-layer, 3-head, N=64 state: 196 KB as fp32, 98 KB as fp16, more than the small full disk holds."""
    g = torch.Generator().manual_seed(0)
    return save_native(State(torch.randn(4, 3, 64, 64, generator=g)), tmp_path / "s.safetensors")


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _one_line_error(result, *needles: str) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------------ stale temp files


def test_next_write_removes_temp_files_of_dead_writers_only(tmp_path):
    host = _host()
    dead = tmp_path / f".big.pth.{host}-{_dead_pid()}.abcdefgh.tmp"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".big.pth.{host}-{sleeper.pid}.ijklmnop.tmp"
        other_host = tmp_path / f".big.pth.elsewhere-{_dead_pid()}.qrstuvwx.tmp"
        old_style_old = tmp_path / ".big.pth.a1b2c3d4.tmp"
        old_style_new = tmp_path / ".big.pth.e5f6g7h8.tmp"
        not_ours = [tmp_path / ".bashrc", tmp_path / ".notes.tmp", tmp_path / "visible.abcdefgh.tmp"]
        for f in [dead, live, other_host, old_style_old, old_style_new, *not_ours]:
            f.write_bytes(b"partial")
        two_hours_ago = time.time() - 7200
        os.utime(old_style_old, (two_hours_ago, two_hours_ago))
        atomic_write_bytes(tmp_path / "other.bin", b"x")
        assert not dead.exists() and not old_style_old.exists()
        assert live.exists() and other_host.exists() and old_style_new.exists()
        assert all(f.exists() for f in not_ours)
        day_ago = time.time() - 2 * 24 * 3600
        os.utime(other_host, (day_ago, day_ago))
        atomic_write_bytes(tmp_path / "other.bin", b"y")
        assert not other_host.exists() and live.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_writer_killed_mid_write_leaves_a_temp_that_the_next_write_removes(tmp_path):
    target = tmp_path / "export.pth"
    code = (
        "import sys, time\n"
        "from rwkv_state_hub.files import atomic_write\n"
        "def write(p):\n"
        "    p.write_bytes(b'x' * 100000)\n"
        "    print('writing', flush=True)\n"
        "    time.sleep(60)\n"
        f"atomic_write({str(target)!r}, write)\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "writing"
    p.send_signal(signal.SIGKILL)
    p.wait()
    left = [f for f in tmp_path.iterdir() if f.name.endswith(".tmp")]
    assert len(left) == 1 and not target.exists()
    atomic_write_bytes(tmp_path / "next.bin", b"ok")
    assert [f.name for f in tmp_path.iterdir()] == ["next.bin"]


def test_a_long_target_name_still_gets_a_temp_file(tmp_path):
    target = tmp_path / ("n" * 250 + ".pth")
    atomic_write_bytes(target, b"ok")
    assert target.read_bytes() == b"ok"


# ------------------------------------------------------------------ a full disk


@pytest.fixture
def full_disk():
    """A 64 KiB tmpfs: writes past it fail with ENOSPC, as on a full disk."""
    where = Path(tempfile.mkdtemp(prefix="full-disk-"))
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)], capture_output=True)
    if mounted.returncode != 0:
        where.rmdir()
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.decode().strip()}); "
                    "test_write_past_the_file_size_limit covers the same path without one")
    yield where
    subprocess.run(["umount", str(where)], check=True)
    where.rmdir()


@pytest.mark.parametrize("fmt", ["pth", "safetensors", "ai00"])
def test_a_full_disk_is_one_line_and_leaves_nothing(full_disk, state_file, fmt):
    out = full_disk / f"state.{fmt}"
    r = CliRunner().invoke(cli, ["export", str(state_file), "--format", fmt, "-o", str(out)])
    _one_line_error(r, str(out), "No space left on device")
    assert list(full_disk.iterdir()) == []


@pytest.mark.slow
def test_write_past_the_file_size_limit(tmp_path, state_file):
    """Portable stand-in for a full disk: RLIMIT_FSIZE makes write() fail with EFBIG in a subprocess."""
    out = tmp_path / "out" / "state.pth"
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (32768, 32768))\n"
        "from rwkv_state_hub.cli import main\n"
        f"sys.argv = ['rwkv-state', 'export', {str(state_file)!r}, '--format', 'pth', '-o', {str(out)!r}]\n"
        "main()\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"Error: {out}: cannot write (File too large)"]
    assert list(out.parent.iterdir()) == []


# ------------------------------------------------------------------ no permission, /proc


def test_paths_that_cannot_be_written(state_file, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"")
    for out, reason in [("/proc/state.pth", "/proc/state.pth: cannot write"),
                        (str(blocker / "state.pth"), "is not a folder")]:
        r = CliRunner().invoke(cli, ["export", str(state_file), "--format", "pth", "-o", out])
        _one_line_error(r, "state.pth", reason)


@pytest.fixture
def unwritable_folder():
    """A folder that refuses new files: read-only (a tmpfs mounted ro) as root, who may write anywhere
    else; without permission (mode 0555) as an ordinary user."""
    where = Path(tempfile.mkdtemp(prefix="unwritable-"))
    if os.geteuid() != 0:
        os.chmod(where, 0o555)
        yield where, "Permission denied"
        os.chmod(where, 0o755)
        where.rmdir()
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(where)], capture_output=True)
    if mounted.returncode != 0:
        where.rmdir()
        pytest.skip(f"root writes anywhere and no read-only tmpfs can be mounted here ({mounted.stderr.decode()})")
    yield where, "Read-only file system"
    subprocess.run(["umount", str(where)], check=True)
    where.rmdir()


def test_a_folder_that_refuses_writes(state_file, unwritable_folder):
    folder, reason = unwritable_folder
    out = folder / "out.pth"
    r = CliRunner().invoke(cli, ["export", str(state_file), "--format", "pth", "-o", str(out)])
    assert _one_line_error(r) == f"Error: {out}: cannot write ({reason})"
    assert list(folder.iterdir()) == []


def test_atomic_write_keeps_our_own_errors_as_they_are(tmp_path):
    def refuse(p):
        raise StateHubError("the writer refused")

    with pytest.raises(StateHubError, match="^the writer refused$"):
        atomic_write(tmp_path / "x", refuse)
    with pytest.raises(ValueError):
        atomic_write(tmp_path / "x", lambda p: int("not a number"))
    assert list(tmp_path.iterdir()) == []

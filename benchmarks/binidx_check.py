"""The cost of range-checking every token id of a binidx dataset when it is loaded.

    .venv/bin/python benchmarks/binidx_check.py [--gb 1] [--vocab 50277]

Writes a binidx file of --gb GiB of uint16 token ids (documents of 4096 tokens, ids below --vocab) in a temp
folder, then loads it in a fresh process each time: nothing (the idle process, for its RSS), without the
check (the index alone), with it, and with one bad id in the last document. Prints the wall time of each load
and each process's peak RSS, measured from outside (os.wait4 of the child). The file was just written, so it is
read from the page cache: a cold disk adds its read time. With a vocabulary of 65536 and uint16 ids no id can
be out of range and the check is skipped.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from rwkv_state_hub.data import _BINIDX_HEADER, BINIDX_MAGIC

DOC_TOKENS = 4096
UINT16_CODE = 8

CHILD = """
import sys, time
from rwkv_state_hub import data
from rwkv_state_hub.errors import StateHubError
from rwkv_state_hub.tokenizer import get_tokenizer

path, vocab, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
get_tokenizer("bytes")
if mode == "imports only":
    print("0 nothing loaded")
    sys.exit()
if mode == "index only":
    data._check_bin_ids = lambda *args: None
started = time.perf_counter()
try:
    ds = data.load_dataset(path, get_tokenizer("bytes"), 512, vocab_size=vocab)
    outcome = f"{len(ds)} samples"
except StateHubError as e:
    outcome = f"refused: {e}"
print(f"{time.perf_counter() - started:.3f}", outcome)
"""


def write_bin(prefix: Path, gib: float, vocab: int, bad_at_end: bool) -> Path:
    """Write prefix.bin in 64 MiB pieces (never the whole file in memory) and its index."""
    n_tokens = int(gib * 2**30) // 2 // DOC_TOKENS * DOC_TOKENS
    rng = np.random.default_rng(0)
    piece = 32 << 20  # tokens per write
    with open(f"{prefix}.bin", "wb") as f:
        for start in range(0, n_tokens, piece):
            ids = rng.integers(0, vocab, size=min(piece, n_tokens - start), dtype=np.uint16)
            if bad_at_end and start + len(ids) == n_tokens:
                ids[-2] = vocab  # the second-to-last token of the last document
            f.write(ids.tobytes())
    n_docs = n_tokens // DOC_TOKENS
    sizes = np.full(n_docs, DOC_TOKENS, dtype="<i4")
    pointers = np.arange(n_docs, dtype="<i8") * DOC_TOKENS * 2
    header = _BINIDX_HEADER.pack(BINIDX_MAGIC, 1, UINT16_CODE, n_docs, n_docs + 1)
    with open(f"{prefix}.idx", "wb") as f:
        f.write(header + sizes.tobytes() + pointers.tobytes() + np.arange(n_docs + 1, dtype="<i8").tobytes())
    return Path(f"{prefix}.bin")


def run_child(path: Path, vocab: int, mode: str) -> tuple[str, float]:
    """(the child's output, its peak RSS in MiB)."""
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(vocab), mode], stdout=subprocess.PIPE,
                            text=True)
    out = proc.stdout.read().strip()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"the {mode} child failed with exit status {proc.returncode}")
    return out, usage.ru_maxrss / 1024  # KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=1.0, help="GiB of token ids")
    ap.add_argument("--vocab", type=int, default=50277, help="vocabulary size (ids are drawn below it)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for bad in (False, True):
            path = write_bin(Path(tmp) / "data", args.gb, args.vocab, bad)
            size = path.stat().st_size
            modes = ("imports only", "index only", "with the check") if not bad else ("with the check",)
            for mode in modes:
                out, rss = run_child(path, args.vocab, mode)
                seconds, outcome = out.split(" ", 1)
                label = f"{mode}{', a bad id in the last document' if bad else ''}"
                print(f"{size / 2**30:.2f} GiB uint16, vocab {args.vocab}, {label}: {float(seconds):.2f} s, "
                      f"peak RSS {rss:.0f} MiB ({outcome[:120]})")


if __name__ == "__main__":
    main()

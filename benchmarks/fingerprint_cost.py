"""What the weights fingerprint costs on a 0.1B-shaped checkpoint, beside the sha256 of the same file, in one run.

    .venv/bin/python benchmarks/fingerprint_cost.py

Each measurement runs in its own process; peak RSS is that process's whole peak, read from outside (the
parent's getrusage of its child). The checkpoint is a random RWKV-7 of the 0.1B shape (L12 D768, vocab 65536),
bf16 as the official ones are; the fingerprint streams it tensor by tensor from the memory map.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from rwkv_state_hub.bench import SHAPE
from rwkv_state_hub.random_model import random_checkpoint, save_checkpoint

MEASURE = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
           "rc = subprocess.run(sys.argv[1:]).returncode; dt = time.perf_counter() - t; "
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, dt, rc)")
JOBS = {
    "python start-up + torch import": "import torch",
    "sha256 of the file": "from rwkv_state_hub.files import sha256_file; sha256_file(sys.argv[1], use_cache=False)",
    "weights fingerprint": "from rwkv_state_hub.checkpoint import read_checkpoint; "
                           "from rwkv_state_hub.fingerprint import fingerprint; "
                           "print(fingerprint(*read_checkpoint(sys.argv[1])), file=sys.stderr)",
}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rwkv7-0.1B-shape.pth"
        sd = random_checkpoint("v7", seed=0, dtype=torch.bfloat16, **SHAPE)
        n_values = sum(t.numel() for t in sd.values())
        save_checkpoint(sd, path)
        del sd
        size = path.stat().st_size / 2**20
        print(f"RWKV-7 {SHAPE}: {n_values / 1e6:.0f} M values, {size:.0f} MiB bf16; {torch.get_num_threads()} threads")
        print(f"{'job':<32} {'seconds':>8} {'peak RSS MiB':>13}")
        for name, code in JOBS.items():
            cmd = [sys.executable, "-c", f"import sys; {code}", str(path)]
            out = subprocess.run([sys.executable, "-c", MEASURE, *cmd], capture_output=True, text=True).stdout
            kib, seconds, rc = out.split()[-3:]
            if rc != "0":
                raise RuntimeError(f"{name} failed")
            print(f"{name:<32} {float(seconds):>8.2f} {int(kib) / 1024:>13.0f}", flush=True)


if __name__ == "__main__":
    main()

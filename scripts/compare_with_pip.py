"""Print how far our model's logits are from the `rwkv` pip package's (cpu fp32) and from rwkv.cpp's
stored logits, for every real model in ../shared/models, the bundled example, and random models of
realistic shape; from the zero state and from a random state handed to pip through pip_state.

    .venv/bin/python scripts/compare_with_pip.py                                # the default (chunked) WKV
    RWKV_STATE_HUB_WKV=reference .venv/bin/python scripts/compare_with_pip.py   # the plain loops
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("RWKV_JIT_ON", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from rwkv_state_hub import State, load_model, pip_state  # noqa: E402
from rwkv_state_hub.pip_bridge import load_pip_model  # noqa: E402
from rwkv_state_hub.random_model import random_checkpoint, save_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "models"
TEXT = ("Once upon a time, in a quiet village by the sea, there lived an old fisherman who told "
        "stories about the stars to anyone who would listen.")


def compare(path: Path, tokens: list[int], label: str, cpp: Path | None = None) -> None:
    ours = load_model(path)
    pip = load_pip_model(path)
    g = torch.Generator().manual_seed(0)
    random = State(torch.randn(ours.spec.state_shape(), generator=g) * 0.5,
                   torch.randn(ours.spec.n_layer, 2, ours.spec.n_embd, generator=g)).with_model(ours.spec)
    cells = []
    for state in (None, random):
        with torch.no_grad():
            a, _ = ours(torch.tensor([tokens]), state.to_recurrent() if state else None)
        b, _ = pip.forward(tokens, pip_state(state) if state else None, full_output=True)
        cells.append(f"{(a[0] - b).abs().max().item():.2e}")
    if cpp is not None:
        expected = torch.from_numpy(np.fromfile(cpp, dtype="<f4"))
        with torch.no_grad():
            a, _ = ours(torch.tensor([[34, 105, 110]]))
        cells.append(f"{(a[0, -1] - expected).abs().max().item():.2e}")
    else:
        cells.append("-")
    s = ours.spec
    print(f"{label:<28} {s.arch:<5} L{s.n_layer:<3} D{s.n_embd:<5} {s.n_head:>3}x{s.head_size:<3} {len(tokens):>4}  "
          + "  ".join(f"{c:>9}" for c in cells))


def main() -> None:
    print(f"{'model':<28} {'arch':<5} {'L':<4} {'D':<6} {'heads':>7} {'T':>4}  {'zero':>9}  {'random':>9}  "
          f"{'rwkv.cpp':>9}")
    print("max |our logits - reference| over every position and vocabulary entry")
    for name, enc in [("tiny-rwkv-5v2-730K", "utf-8"), ("tiny-rwkv-6v0-1m", "utf-16-le"),
                      ("tiny-rwkv-7v0-834K", "utf-8")]:
        path = SHARED / f"{name}.pth"
        if not path.exists():
            print(f"{name}: skipped, {path} not found")
            continue
        suffix = name.removeprefix("tiny-rwkv-")
        cpp = SHARED / f"expected-logits-{suffix}.bin"
        compare(path, list(TEXT.encode(enc))[:96], name, cpp)
    bundled = REPO / "rwkv_state_hub/examples/models/tiny-rwkv-7v0-834K.pth"
    compare(bundled, list(TEXT.encode())[:96], "bundled example (v7)")
    with tempfile.TemporaryDirectory() as tmp:
        for i, arch in enumerate(("v5.2", "v6", "v7")):
            path = Path(tmp) / f"random-{arch}.pth"
            save_checkpoint(random_checkpoint(arch, n_layer=2, n_embd=768, vocab_size=65536, seed=i), path)
            tokens = torch.randint(0, 65536, (96,), generator=torch.Generator().manual_seed(i)).tolist()
            compare(path, tokens, f"random {arch} (12 heads x 64)")


if __name__ == "__main__":
    sys.exit(main())

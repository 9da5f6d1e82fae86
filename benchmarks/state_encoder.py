"""Plain state vs state encoder: the same model, data, steps and seed; held-out loss for each.

    .venv/bin/python benchmarks/state_encoder.py [--steps 150] [--scales 0.01,0.03,0.1]

The encoder (`rwkv-state train --state-encoder`) learns each layer's state as an MLP of a small
embedding and saves the resulting plain state. Its learning rate is --lr-init x --encoder-lr-scale;
the script tries a few scales so the comparison is not decided by one unlucky choice.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from rwkv_state_hub.training import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--scales", default="0.01,0.03,0.1")
    args = ap.parse_args()
    base = dict(model=str(REPO / "rwkv_state_hub/examples/models/tiny-rwkv-5v2-730K.pth"),
                data=[str(REPO / "examples/data/train.jsonl")], val_data=[str(REPO / "examples/data/val.jsonl")],
                steps=args.steps, micro_bsz=8, seed=1, val_every=args.steps, save_every=args.steps)
    runs = [("plain state", {})] + [(f"encoder, lr scale {s}", {"state_encoder": True, "encoder_lr_scale": float(s)})
                                    for s in args.scales.split(",")]
    print(f"{'':<28} {'held-out loss':>14} {'seconds':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, extra) in enumerate(runs):
            t0 = time.perf_counter()
            r = train(TrainConfig(**base, **extra, out=f"{tmp}/{i}"), progress=False)
            print(f"{label:<28} {r.final_val.loss:>14.4f} {time.perf_counter() - t0:>8.1f}")


if __name__ == "__main__":
    main()

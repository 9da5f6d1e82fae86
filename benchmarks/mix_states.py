"""Two states trained on two styles, and their mix, on both held-out sets.

    .venv/bin/python benchmarks/mix_states.py [--steps 150]

Trains a state on the weather reports and one on the match reports (examples/data, same model, steps
and seed), mixes them 0.5/0.5, and prints held-out loss per byte for the base model, each state and
the mix on each held-out set. Nothing here assumes that mixing helps: the table says what it does.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from rwkv_state_hub import load_model
from rwkv_state_hub.data import load_dataset
from rwkv_state_hub.evaluate import evaluate
from rwkv_state_hub.tokenizer import get_tokenizer
from rwkv_state_hub.toolbox import mix
from rwkv_state_hub.training import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "rwkv_state_hub" / "examples" / "models" / "tiny-rwkv-5v2-730K.pth"
DATA = REPO / "examples" / "data"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    args = ap.parse_args()
    model = load_model(MODEL)
    tok = get_tokenizer("bytes")
    held_out = {name: load_dataset(DATA / f"{prefix}val.jsonl", tok, 512)
                for name, prefix in (("weather", ""), ("sports", "sports-"))}
    states = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, prefix in (("weather", ""), ("sports", "sports-")):
            cfg = TrainConfig(model=str(MODEL), data=[str(DATA / f"{prefix}train.jsonl")], out=f"{tmp}/{name}",
                              steps=args.steps, micro_bsz=8, full_state=True, seed=1)
            states[f"state: {name}"] = train(cfg, progress=False).state
    states["mix 0.5 weather + 0.5 sports"] = mix(list(states.values()), [0.5, 0.5])
    rows = {"base model": None, **states}
    print(f"{'held-out loss per byte':<32}" + "".join(f"{name:>12}" for name in held_out))
    for label, state in rows.items():
        start = state.to_recurrent() if state is not None else None
        cells = "".join(f"{evaluate(model, data, start).loss:>12.4f}" for data in held_out.values())
        print(f"{label:<32}{cells}")


if __name__ == "__main__":
    main()

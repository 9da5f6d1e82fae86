"""The Python API in one script, as a notebook would use it.

Load a frozen model, tune a state on a list of records, save it as a Hub repo holds it, load it back
(checked against the model), and compare the base model with the state on held-out text and in generation.

    .venv/bin/python examples/python_api.py                    # the bundled example RWKV-7, CPU, ~1 minute
    .venv/bin/python examples/python_api.py --model hf://BlinkDL/rwkv-7-world/RWKV-x070-World-0.1B-v2.8-20241210-ctx4096.pth
    .venv/bin/python examples/python_api.py --push me/weather-state   # also publish it (needs `hf auth login`)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rwkv_state_hub import RWKV, State, TrainConfig, train_state
from rwkv_state_hub.examples import example_model

DATA = Path(__file__).parent / "data"


def read_records(path: Path) -> list[dict]:
    """The example weather reports: one JSON object per line, as a notebook might hold them already."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(example_model("rwkv7-example-L4-D256.pth")))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", default="runs/python-api-state", help="the folder save_pretrained writes")
    parser.add_argument("--push", metavar="REPO_ID", help="also push the state to this Hub repo")
    args = parser.parse_args()

    model = RWKV.from_pretrained(args.model)  # frozen; a local .pth or hf://owner/repo/file.pth
    train, held_out = read_records(DATA / "train.jsonl"), read_records(DATA / "val.jsonl")

    config = TrainConfig(steps=args.steps, micro_bsz=8, lr_init=1.0, lr_final=0.01, warmup_steps=10,
                         full_state=True)
    state = train_state(model, train, config)  # in memory: nothing is written
    print(repr(state))

    folder = state.save_pretrained(args.out, exports=("pth", "ai00"))
    print(f"saved: {', '.join(sorted(p.name for p in Path(folder).iterdir()))} in {folder}")
    state = State.from_pretrained(folder, model=model)  # refused if it does not fit this model

    base, tuned = model.evaluate(held_out), model.evaluate(held_out, state=state)
    print(f"held-out loss per token: base model {base.loss:.4f}, with the state {tuned.loss:.4f}")
    prompt = held_out[0]["text"][:1]
    print(f"base model:     {prompt}{model.generate(prompt, max_tokens=60, temperature=0)!r}")
    print(f"with the state: {prompt}{model.generate(prompt, state=state, max_tokens=60, temperature=0)!r}")

    if args.push:
        result = state.push_to_hub(args.push)
        print(f"pushed: {result.url} ({', '.join(result.files)})")


if __name__ == "__main__":
    main()

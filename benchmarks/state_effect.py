"""How long a state's effect lasts: held-out loss per byte of the base model and of a trained state, in buckets
of how far into the text a byte is (0-16, 16-64, 64-256, 256+ bytes read), for several models.

    .venv/bin/python benchmarks/state_effect.py [--model A.pth --model B.pth ...] [--train T.jsonl --val V.jsonl]

For each model it trains a state with the quickstart's settings (examples/train.toml: 3 epochs, micro-batch 8,
lr 1.0 -> 0.01, full state) on --train, then reads the held-out records of --val joined into one text, cut
into windows of 512 bytes that each start from the state (or from the zero state, for the base model). A state
that only sets the first few bytes gains in the first bucket alone; one that holds a style gains in every one.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from rwkv_state_hub.data import load_dataset
from rwkv_state_hub.evaluate import loss_by_position
from rwkv_state_hub.model import load_model
from rwkv_state_hub.tokenizer import get_tokenizer
from rwkv_state_hub.training import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]
CTX = 512


def _joined_text(val: Path, folder: Path) -> Path:
    """The held-out records as one long text, so that positions past one record's length exist."""
    texts = [json.loads(line)["text"] for line in val.read_text(encoding="utf-8").splitlines() if line.strip()]
    path = folder / "held-out.txt"
    path.write_text("\n".join(texts) + "\n", encoding="utf-8")
    return path


def measure(model_path: Path, train_data: Path, text: Path, out: Path) -> tuple[list, list, float]:
    started = time.perf_counter()
    cfg = TrainConfig(model=str(model_path), data=[str(train_data)], out=str(out), epochs=3, micro_bsz=8,
                      lr_init=1.0, lr_final=0.01, warmup_steps=10, full_state=True, save_every=1000,
                      val_every=1000, tokenizer="bytes")
    state = train(cfg, progress=False).state
    seconds = time.perf_counter() - started
    model = load_model(model_path)
    samples = load_dataset([str(text)], get_tokenizer("bytes"), CTX, model.spec.vocab_size)
    return loss_by_position(model, samples), loss_by_position(model, samples, state.to_recurrent()), seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", type=Path, help="a byte-vocabulary model (repeatable)")
    ap.add_argument("--train", type=Path, default=REPO / "examples/data/train.jsonl")
    ap.add_argument("--val", type=Path, default=REPO / "examples/data/val.jsonl")
    args = ap.parse_args()
    from rwkv_state_hub.examples import example_model

    models = args.model or [example_model(name) for name in ("rwkv7-example-L4-D256", "tiny-rwkv-5v2-730K",
                                                             "tiny-rwkv-7v0-834K")]
    print(f"held-out loss per byte (nats) on {args.val.name} joined into one text, windows of {CTX} bytes; "
          f"states trained on {args.train.name}")
    print(f"{'model':<28} {'bytes read':>10} {'base':>7} {'state':>7} {'gain':>7} {'bytes':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        text = _joined_text(args.val, Path(tmp))
        for i, path in enumerate(models):
            base, tuned, seconds = measure(path, args.train, text, Path(tmp) / f"run{i}")
            for (bucket, b, n), (_, s, _) in zip(base, tuned, strict=True):
                print(f"{path.stem[:28]:<28} {bucket:>10} {b:>7.3f} {s:>7.3f} {b - s:>7.3f} {n:>7}")
            print(f"{'':<28} (state trained in {seconds:.0f} s)")


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# Train a state on the example data (about a minute on 2 CPU cores), then show what it does:
# held-out loss for the base model, a few-shot prompt and the state; and text from each, side by side.
set -euo pipefail
cd "$(dirname "$0")/.."
RS=.venv/bin/rwkv-state
MODEL=rwkv_state_hub/examples/models/tiny-rwkv-5v2-730K.pth
rm -rf runs/example
$RS train --config examples/train.toml
echo
echo "== held-out loss per byte (examples/data/val.jsonl)"
$RS eval --model $MODEL --state runs/example/state.safetensors --data examples/data/val.jsonl \
    --few-shot-data examples/data/train.jsonl
echo
echo "== greedy continuation of 'W': the state starts the house style, the tiny model forgets it within ~16 bytes"
$RS generate --model $MODEL --state runs/example/state.safetensors --prompt "W" --temperature 0 --max-tokens 40

#!/usr/bin/env bash
# Train a state on the example data (a minute or two on 2 CPU cores), then show what it does:
# held-out loss for the base model, a few-shot prompt and the state; and greedy text from each, one after the other.
# Then greedy text from the bundled Devil's Dictionary state (trained for this model, see
# rwkv_state_hub/examples/states/README.md), beside the base model's from the same prompt.
set -euo pipefail
cd "$(dirname "$0")/.."
RS=.venv/bin/rwkv-state
MODEL=rwkv_state_hub/examples/models/rwkv7-example-L4-D256.pth
rm -rf runs/example
$RS train --config examples/train.toml
echo
echo "== held-out loss per byte (examples/data/bulletins-val.jsonl)"
$RS eval --model $MODEL --state runs/example/state.safetensors --data examples/data/bulletins-val.jsonl \
    --few-shot-data examples/data/bulletins-train.jsonl
echo
echo "== greedy continuation of 'W' (no repetition penalties): the base model's style, then the state's"
$RS generate --model $MODEL --state runs/example/state.safetensors --prompt "W" --temperature 0 \
    --presence-penalty 0 --frequency-penalty 0 --max-tokens 200
echo
echo "== greedy continuation of 'A': the base model, then the bundled Devil's Dictionary state"
$RS generate --model $MODEL --state rwkv_state_hub/examples/states/devils-dictionary.safetensors --prompt "A" \
    --temperature 0 --presence-penalty 0 --frequency-penalty 0 --max-tokens 300

"""State-tuning speed and memory on the CPU, side by side with a naive baseline, in one run.

    .venv/bin/python benchmarks/train_speed.py [--arch v7,v6] [--ctx 512] [--steps 3] [--configs ...]

The same as `rwkv-state bench`; the code and the description of each configuration are in
rwkv_state_hub/bench.py.
"""

from rwkv_state_hub.bench import main

if __name__ == "__main__":
    main()

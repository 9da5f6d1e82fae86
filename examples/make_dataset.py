"""Write the example data sets: short weather reports in one fixed house style, and (for mixing
states) short match reports in another.

Generated here from word lists (so the licence is ours: Apache-2.0, like the code), deterministic
(seeded), with a held-out split. The style is what a state can learn and a base model cannot guess:
every report opens the same way and follows the same template.

    python examples/make_dataset.py   # examples/data/{,sports-,bulletins-}{train,val}.jsonl
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CITIES = ["Oslo", "Lima", "Cairo", "Perth", "Quito", "Dakar", "Hanoi", "Porto", "Turin", "Bergen", "Galway",
          "Malmo", "Split", "Leeds", "Kyoto", "Sucre", "Accra", "Nantes", "Tromso", "Dublin", "Austin", "Denver",
          "Halifax", "Lagos", "Seville", "Krakow", "Tartu", "Graz", "Aarhus", "Cork"]
SKIES = ["sunny", "cloudy", "rainy", "foggy", "windy", "snowy", "stormy", "clear"]
WINDS = ["calm", "a light breeze", "a strong wind", "gusts"]
ADVICE = {
    "sunny": "Wear a hat.", "cloudy": "Take a jumper.", "rainy": "Take an umbrella.", "foggy": "Drive slowly.",
    "windy": "Hold on to your hat.", "snowy": "Wear boots.", "stormy": "Stay indoors.", "clear": "Enjoy the stars.",
}


def report(rng: random.Random) -> str:
    sky = rng.choice(SKIES)
    return (f"WEATHER. {rng.choice(CITIES)}: {sky}, {rng.randint(-9, 35)} C, {rng.choice(WINDS)}. "
            f"{ADVICE[sky]} END.")


TEAMS = ["Rovers", "United", "Athletic", "Wanderers", "Rangers", "City", "Albion", "Harriers", "Town", "Celtic"]
MOODS = {True: "Fans sang all night.", False: "Fans went home quiet."}


def match(rng: random.Random) -> str:
    home, away = rng.sample(TEAMS, 2)
    a, b = rng.randint(0, 5), rng.randint(0, 5)
    return f"SPORT. {home} {a}, {away} {b}. {MOODS[a > b]} END."


def bulletin(rng: random.Random) -> str:
    """Four to six reports, one per line: a text long enough to show whether a state holds the style."""
    return "\n".join(report(rng) for _ in range(rng.randint(4, 6)))


def main(n_train: int = 400, n_val: int = 60, seed: int = 7) -> None:
    rng = random.Random(seed)
    folder = Path(__file__).parent / "data"
    folder.mkdir(exist_ok=True)
    for prefix, make in (("", report), ("sports-", match)):
        for name, n in (("train", n_train), ("val", n_val)):
            lines = [json.dumps({"text": make(rng)}) for _ in range(n)]
            (folder / f"{prefix}{name}.jsonl").write_text("\n".join(lines) + "\n")
    rng = random.Random(seed + 1)  # the bulletins: their own stream, so the files above stay as they were
    for name, n in (("train", n_train // 4), ("val", n_val // 3)):
        lines = [json.dumps({"text": bulletin(rng)}) for _ in range(n)]
        (folder / f"bulletins-{name}.jsonl").write_text("\n".join(lines) + "\n")
    print(f"wrote {n_train} training and {n_val} held-out samples of each style to {folder}, and "
          f"{n_train // 4} + {n_val // 3} bulletins of 4-6 weather reports")


if __name__ == "__main__":
    main()

"""Write the small preference dataset the examples train on: ``examples/data/preferences.jsonl``.

A synthetic task a tiny model learns in a few dozen steps: the prompt asks to count up from a number, the chosen
completion counts up correctly, the rejected one repeats a wrong pattern (counts down, repeats, or skips). TRL's
standard preference format (``prompt``, ``chosen``, ``rejected`` strings), one JSON object per line.

    python examples/make_preferences.py [--pairs 320] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

PATH = Path(__file__).resolve().parent / "data" / "preferences.jsonl"


def make_pair(rng: random.Random) -> dict[str, str]:
    start, n = rng.randint(1, 80), rng.randint(3, 6)
    chosen = [start + i for i in range(1, n + 1)]
    wrong = rng.choice(("down", "repeat", "skip"))
    if wrong == "down":
        rejected = [max(0, start - i) for i in range(1, n + 1)]
    elif wrong == "repeat":
        rejected = [start] * n
    else:
        rejected = [start + 2 * i for i in range(1, n + 1)]
    return {"prompt": f"count from {start}:", "chosen": " " + " ".join(map(str, chosen)),
            "rejected": " " + " ".join(map(str, rejected))}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=320)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=PATH)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        for _ in range(args.pairs):
            f.write(json.dumps(make_pair(rng)) + "\n")
    print(f"wrote {args.pairs} pairs to {args.out}")


if __name__ == "__main__":
    main()

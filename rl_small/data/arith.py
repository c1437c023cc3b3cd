"""Built-in task ``arith``: seeded multi-step arithmetic word problems with a difficulty knob.

    rows = generate_arith(split="train", n=2000, difficulty=2, seed=0)

``difficulty`` is the number of operations after the starting amount (1..6); numbers grow with it. Train and
eval splits are disjoint by construction: a problem's split is a hash of its text, so an eval question can
never be generated for train, whatever the seeds. Answers are non-negative integers.
"""

from __future__ import annotations

import hashlib
import random

NAMES = ["Mia", "Tom", "Ava", "Leo", "Zoe", "Sam", "Ivy", "Max", "Eli", "Ana", "Ben", "Lily"]
ITEMS = ["apples", "marbles", "stickers", "books", "coins", "cookies", "pencils", "cards", "shells", "stamps"]
ADD = ["buys {n} more {item}", "finds {n} more {item}", "gets {n} {item} as a gift", "wins {n} {item}"]
SUB = ["gives {n} {item} to a friend", "loses {n} {item}", "eats {n} {item}", "sells {n} {item}"]
MUL = ["doubles the number of {item}"]
EVAL_FRACTION = 0.2  # share of the problem space reserved for the eval split


def _split_of(question: str) -> str:
    h = int.from_bytes(hashlib.sha256(question.encode()).digest()[:8], "big")
    return "eval" if (h % 1000) < EVAL_FRACTION * 1000 else "train"


def _one(rng: random.Random, difficulty: int) -> tuple[str, int]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    hi = 10 + 10 * difficulty
    value = rng.randint(2, hi)
    steps = [f"{name} has {value} {item}."]
    for _ in range(difficulty):
        kind = rng.random()
        if kind < 0.1 and value <= 50:
            value *= 2
            phrase = rng.choice(MUL).format(item=item)
        elif kind < 0.55 or value < 3:
            n = rng.randint(1, hi)
            value += n
            phrase = rng.choice(ADD).format(n=n, item=item)
        else:
            n = rng.randint(1, value - 1)
            value -= n
            phrase = rng.choice(SUB).format(n=n, item=item)
        steps.append(f"Then {name} {phrase}.")
    steps.append(f"How many {item} does {name} have now?")
    return " ".join(steps), value


def generate_arith(split: str, n: int, difficulty: int = 2, seed: int = 0) -> list[dict[str, str]]:
    """Return ``n`` distinct problems of ``split`` ('train' or 'eval') as rows {id, question, answer}."""
    if split not in ("train", "eval", "test"):
        raise ValueError(f"arith split must be 'train' or 'eval' (or 'test'), got {split!r}")
    if not 1 <= difficulty <= 6:
        raise ValueError(f"arith difficulty must be in 1..6, got {difficulty}")
    want = "train" if split == "train" else "eval"
    rng = random.Random(f"arith/{want}/{difficulty}/{seed}")
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    attempts = 0
    while len(rows) < n:
        attempts += 1
        if attempts > 200 * n + 1000:
            raise ValueError(f"arith: could not generate {n} distinct {want} problems at difficulty {difficulty}")
        question, answer = _one(rng, difficulty)
        if question in seen or _split_of(question) != want:
            continue
        seen.add(question)
        rows.append({"id": f"arith-{want}-{difficulty}-{seed}-{len(rows)}", "question": question, "answer": str(answer)})
    return rows

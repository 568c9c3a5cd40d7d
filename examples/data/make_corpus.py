"""Write corpus.txt: a few hundred KB of simple English prose, generated (no downloads, no third-party text).

The text is made from templates and word lists with a fixed seed, so it is reproducible byte for byte and
has enough structure (agreement, recurring characters, counting, day/night cycles) for a small language
model's loss to fall visibly within a few hundred steps.

    python examples/data/make_corpus.py            # rewrites examples/data/corpus.txt
"""

from __future__ import annotations

import argparse
import os
import random

NAMES = [
    "Ada",
    "Ben",
    "Cleo",
    "Dara",
    "Eli",
    "Fern",
    "Gus",
    "Hana",
    "Ivo",
    "June",
    "Kai",
    "Lena",
    "Milo",
    "Nia",
    "Otto",
    "Pia",
    "Quin",
    "Rosa",
    "Sami",
    "Tess",
]
ANIMALS = ["cat", "dog", "fox", "owl", "hen", "goat", "crow", "frog", "mole", "bee"]
PLACES = [
    "the river",
    "the old mill",
    "the market",
    "the hill",
    "the forest",
    "the harbour",
    "the garden",
    "the library",
    "the bakery",
    "the bridge",
]
OBJECTS = [
    "a red kite",
    "a small boat",
    "a loaf of bread",
    "a brass key",
    "a blue lamp",
    "a wooden box",
    "a map",
    "a basket of apples",
    "a copper bell",
    "a paper crane",
]
FEELINGS = ["happy", "tired", "curious", "brave", "worried", "calm", "proud", "sleepy"]
WEATHER = [
    "The sun was bright.",
    "It began to rain.",
    "A cold wind blew from the north.",
    "Fog covered the fields.",
    "The sky was clear and blue.",
    "Snow fell softly.",
]
NUMBERS = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def sentence(rng: random.Random, hero: str, pet: str) -> str:
    kind = rng.randrange(9)
    if kind == 0:
        return f"{hero} walked to {rng.choice(PLACES)} with the {pet}."
    if kind == 1:
        return f"At {rng.choice(PLACES)}, {hero} found {rng.choice(OBJECTS)}."
    if kind == 2:
        return f"The {pet} felt {rng.choice(FEELINGS)}, and so did {hero}."
    if kind == 3:
        return rng.choice(WEATHER)
    if kind == 4:
        a, b = rng.randrange(7), rng.randrange(6)
        return f"{hero} counted {NUMBERS[a]} and {NUMBERS[b]} apples: {NUMBERS[a + b]} apples in all."
    if kind == 5:
        other = rng.choice(NAMES)
        return f'"Good morning, {other}," said {hero}. "Have you seen my {pet}?"'
    if kind == 6:
        return f"{hero} gave {rng.choice(OBJECTS)} to {rng.choice(NAMES)}, who said thank you."
    if kind == 7:
        return f"When night came, the {pet} slept by the fire and {hero} read a book."
    return f"The {pet} ran past {rng.choice(PLACES)} and back again."


def story(rng: random.Random, index: int) -> str:
    hero, pet = rng.choice(NAMES), rng.choice(ANIMALS)
    day = DAYS[index % len(DAYS)]
    lines = [f"Story {index + 1}. On {day}, {hero} and the {pet} woke up early."]
    lines += [sentence(rng, hero, pet) for _ in range(rng.randint(5, 10))]
    lines.append(f"At the end of the day, {hero} was {rng.choice(FEELINGS)}. The end.")
    return " ".join(lines)


def make_corpus(*, target_bytes: int, seed: int) -> str:
    rng = random.Random(seed)
    parts: list[str] = []
    size = 0
    i = 0
    while size < target_bytes:
        s = story(rng, i)
        parts.append(s)
        size += len(s) + 2
        i += 1
    return "\n\n".join(parts) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus.txt"))
    p.add_argument("--bytes", type=int, default=300_000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    text = make_corpus(target_bytes=args.bytes, seed=args.seed)
    with open(args.out, "w", encoding="ascii") as fh:
        fh.write(text)
    print(f"wrote {args.out}: {len(text)} bytes")


if __name__ == "__main__":
    main()

"""Write the bundled demo dataset, demo.jsonl: short instruction examples this project made up itself.

Deterministic (one seeded RNG), so `python -m slothbook.data.make_demo` reproduces the file byte for byte.
Each line has instruction, input (may be empty), output, and "text": the exchange rendered in the embedded
SmolLM2 model's ChatML form (its default system prompt included, the final newline left out so a trainer that
appends eos does not double it).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from .formats import alpaca_to_messages
from .templates import TEMPLATES, render

SMOLLM_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
SEED = 20240601

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "Canada": "Ottawa", "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima",
    "Norway": "Oslo", "Sweden": "Stockholm", "Poland": "Warsaw", "Greece": "Athens", "Ireland": "Dublin",
    "Austria": "Vienna", "Chile": "Santiago", "Cuba": "Havana", "Finland": "Helsinki", "Thailand": "Bangkok",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "up": "down", "happy": "sad", "light": "dark",
    "open": "closed", "early": "late", "full": "empty", "young": "old", "hard": "soft", "wet": "dry",
}
PLURALS = {
    "cat": "cats", "box": "boxes", "child": "children", "mouse": "mice", "leaf": "leaves", "city": "cities",
    "foot": "feet", "tooth": "teeth", "bus": "buses", "person": "people", "sheep": "sheep", "knife": "knives",
}
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
WORDS = ["garden", "planet", "orange", "river", "window", "pencil", "rabbit", "silver", "candle", "forest",
         "butter", "anchor", "jungle", "marble", "rocket", "violet", "ladder", "bridge", "cookie", "island"]
# (from unit, to unit, factor, how many whole units to ask about)
UNITS = [("kilometres", "metres", 1000, 50), ("metres", "centimetres", 100, 90), ("kilograms", "grams", 1000, 40),
         ("hours", "minutes", 60, 48), ("minutes", "seconds", 60, 90), ("litres", "millilitres", 1000, 20)]


def _arithmetic(rng: random.Random):
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    op = rng.choice(["+", "-", "*"])
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    return "Calculate the result.", f"{a} {op} {b}", str(value)


def _conversion(rng: random.Random):
    src, dst, factor, top = rng.choice(UNITS)
    n = rng.randint(1, top)
    return f"Convert {n} {src} to {dst}.", "", f"{n} {src} is {n * factor} {dst}."


def _reverse(rng: random.Random):
    word = rng.choice(WORDS)
    return "Reverse the letters of the word.", word, word[::-1]


def _capitalise(rng: random.Random):
    words = " ".join(rng.sample(WORDS, 3))
    if rng.random() < 0.5:
        return "Capitalise each word.", words, words.title()
    return "Write the text in upper case.", words, words.upper()


def _count(rng: random.Random):
    words = rng.sample(WORDS, rng.randint(2, 6))
    return "How many words are in this sentence?", " ".join(words), str(len(words))


def _sort(rng: random.Random):
    numbers = rng.sample(range(1, 100), 5)
    return "Sort the numbers from smallest to largest.", ", ".join(map(str, numbers)), \
        ", ".join(map(str, sorted(numbers)))


def _parity(rng: random.Random):
    n = rng.randint(1, 999)
    return f"Is {n} even or odd?", "", f"{n} is {'even' if n % 2 == 0 else 'odd'}."


def _fact(rng: random.Random):
    kind = rng.choice(["capital", "opposite", "plural", "day", "month"])
    if kind == "capital":
        country = rng.choice(sorted(CAPITALS))
        return f"What is the capital of {country}?", "", f"The capital of {country} is {CAPITALS[country]}."
    if kind == "opposite":
        word = rng.choice(sorted(OPPOSITES))
        return "Give the opposite of the word.", word, OPPOSITES[word]
    if kind == "plural":
        word = rng.choice(sorted(PLURALS))
        return "Write the plural of the noun.", word, PLURALS[word]
    names = DAYS if kind == "day" else MONTHS
    i = rng.randrange(len(names))
    return f"Which {kind} comes after {names[i]}?", "", names[(i + 1) % len(names)]


TASKS = (_arithmetic, _conversion, _reverse, _capitalise, _count, _sort, _parity, _fact, _fact)


def smollm_text(instruction: str, input: str, output: str) -> str:
    """The exchange as the embedded SmolLM2's ChatML template renders it, without the final newline."""
    messages = [{"role": "system", "content": SMOLLM_SYSTEM}, *alpaca_to_messages(instruction, input, output)]
    return render(TEMPLATES["chatml"].template, messages).rstrip("\n")


def make_examples(count: int = 400, seed: int = SEED) -> list[dict]:
    """`count` distinct examples, drawn in a fixed order from the tasks above."""
    rng = random.Random(seed)
    examples, seen = [], set()
    while len(examples) < count:
        instruction, input, output = rng.choice(TASKS)(rng)
        if (instruction, input) in seen:
            continue
        seen.add((instruction, input))
        examples.append({"instruction": instruction, "input": input, "output": output,
                         "text": smollm_text(instruction, input, output)})
    return examples


def write(path: Path, count: int = 400) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for example in make_examples(count):
            f.write(json.dumps(example, ensure_ascii=False) + "\n")
    return path


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("demo.jsonl")
    print(f"wrote {write(target)} ({target.stat().st_size} bytes)")

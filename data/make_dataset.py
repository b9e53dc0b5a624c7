"""Generate the bundled instruction data set and the base model's pretraining text, from one small made-up world.

The world: numbers 0-9 and their sums and differences, made-up words (random consonant-vowel strings of 3-5
letters such as "kamo") with their reversals, capitals and lengths, sets of 3-4 letters and their sorted order,
the days of the week, the months, and 40 pairs of opposites.

Two views of that world are generated:
- instruction records {"task", "instruction", "input", "output"} in three splits, written to
  data/instructions/{train,validation,test}.jsonl. No (task, input) pair is in two splits.
- plain pretraining text about the same facts ("kamo backwards is omak.", "2 plus 7 is 9."), never in the
  instruction format; data/pretrain_base.py generates it in memory with `pretraining_documents`.

Everything is drawn from seeded `random.Random` generators, so re-running gives the same bytes.
Run from the repository root: `python data/make_dataset.py`
"""

import json
import random
import string
from pathlib import Path

HERE = Path(__file__).resolve().parent
INSTRUCTIONS_DIR = HERE / "instructions"
SEED = 1234
SPLIT_SIZES = {"train": 4000, "validation": 300, "test": 300}
MAX_NUMBER = 9

DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
MONTHS = ["january", "february", "march", "april", "may", "june", "july", "august", "september", "october",
          "november", "december"]
OPPOSITES = [  # 80 different words, so every word has exactly one opposite
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("young", "old"), ("high", "low"),
    ("open", "closed"), ("full", "empty"), ("light", "dark"), ("wet", "dry"), ("hard", "soft"), ("long", "short"),
    ("early", "late"), ("rich", "poor"), ("thick", "thin"), ("happy", "sad"), ("loud", "quiet"), ("clean", "dirty"),
    ("near", "far"), ("strong", "weak"), ("in", "out"), ("left", "right"), ("pretty", "ugly"), ("good", "bad"),
    ("first", "last"), ("true", "false"), ("win", "lose"), ("push", "pull"), ("buy", "sell"), ("give", "take"),
    ("sweet", "sour"), ("wide", "narrow"), ("deep", "shallow"), ("cheap", "dear"), ("safe", "risky"),
    ("above", "below"), ("awake", "asleep"), ("start", "finish"), ("north", "south"), ("east", "west"),
]
CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"

# Instructions (two wordings per task) and plain-text sentences (the answer always comes last, so a sentence cut
# just before {y} is a question the base model can be probed with).
INSTRUCTIONS = {
    "add": ["Add the two numbers.", "What is the sum?"],
    "subtract": ["Subtract the numbers.", "What is the difference?"],
    "reverse": ["Reverse the word.", "Write the word backwards."],
    "uppercase": ["Write the word in capitals.", "Convert the word to uppercase."],
    "length": ["How many letters are in the word?", "Count the letters."],
    "sort": ["Sort the letters.", "Put the letters in alphabetical order."],
    "next_day": ["Which day comes next?", "Name the day after this one."],
    "previous_day": ["Which day comes before?", "Name the day before this one."],
    "next_month": ["Which month comes next?", "Name the month after this one."],
    "previous_month": ["Which month comes before?", "Name the month before this one."],
    "opposite": ["Give the opposite.", "What is the antonym of the word?"],
}
SENTENCES = {
    "add": ["{a} plus {b} is {y}.", "{a} + {b} = {y}."],
    "subtract": ["{a} minus {b} is {y}.", "{a} - {b} = {y}."],
    "reverse": ["{x} backwards is {y}.", "the reverse of {x} is {y}."],
    "uppercase": ["{x} in capitals is {y}.", "{x} in upper case is {y}."],
    "length": ["{x} has this many letters: {y}.", "the number of letters in {x} is {y}."],
    "sort": ["{x} sorted is {y}.", "the letters of {x} in order are {y}."],
    "next_day": ["the day after {x} is {y}.", "after {x} comes {y}."],
    "previous_day": ["the day before {x} is {y}.", "before {x} comes {y}."],
    "next_month": ["the month after {x} is {y}.", "after {x} comes {y}."],
    "previous_month": ["the month before {x} is {y}.", "before {x} comes {y}."],
    "opposite": ["the opposite of {x} is {y}.", "{x} is the opposite of {y}."],
}
FIXED_TASKS = ["add", "subtract", "next_day", "previous_day", "next_month", "previous_month", "opposite"]
OPEN_TASKS = ["reverse", "uppercase", "length", "sort"]  # inputs are drawn fresh, there is no fixed list
# How often each task is picked for a pretraining fact: the skills (reverse, sort, ...) need more examples than
# the 7 days or 12 months, which are learnt by heart quickly.
PRETRAIN_WEIGHTS = {"add": 1.5, "subtract": 1.5, "next_day": 0.5, "previous_day": 0.5, "next_month": 0.5,
                    "previous_month": 0.5, "opposite": 1.5, "reverse": 3, "uppercase": 2, "length": 1.5, "sort": 3}


def fixed_pool(task):
    """Every (input, output) pair of a task with a finite list of facts, in a fixed order."""
    numbers = range(MAX_NUMBER + 1)
    cycles = {"next_day": (DAYS, 1), "previous_day": (DAYS, -1), "next_month": (MONTHS, 1),
              "previous_month": (MONTHS, -1)}
    if task == "add":
        return [(f"{a} + {b}", str(a + b)) for a in numbers for b in numbers]
    if task == "subtract":
        return [(f"{a} - {b}", str(a - b)) for a in numbers for b in numbers if b <= a]
    if task in cycles:
        names, step = cycles[task]
        return [(name, names[(i + step) % len(names)]) for i, name in enumerate(names)]
    if task == "opposite":
        return OPPOSITES + [(b, a) for a, b in OPPOSITES]
    raise ValueError(f"{task!r} is not a fixed task; fixed tasks are {FIXED_TASKS}")


def made_up_word(rng):
    """A pronounceable made-up word of 3-5 letters: consonants and vowels alternate."""
    n = rng.randint(3, 5)
    vowel_first = rng.random() < 0.3
    return "".join(rng.choice(VOWELS if (i % 2 == 0) == vowel_first else CONSONANTS) for i in range(n))


def open_item(task, rng):
    """One fresh (input, output) pair of an open task."""
    if task == "sort":
        letters = "".join(rng.sample(string.ascii_lowercase, rng.randint(3, 4)))
        return letters, "".join(sorted(letters))
    word = made_up_word(rng)
    outputs = {"reverse": word[::-1], "uppercase": word.upper(), "length": str(len(word))}
    return word, outputs[task]


def split_counts(total_by_split, n_tasks):
    """Share each split's count over n_tasks as evenly as possible: {split: [count per task]}."""
    shares = {}
    for split, total in total_by_split.items():
        q, r = divmod(total, n_tasks)
        shares[split] = [q + (i < r) for i in range(n_tasks)]
    return shares


def build_splits(seed=SEED):
    """Return {split: [record, ...]} with exactly SPLIT_SIZES records; no (task, input) is in two splits."""
    rng = random.Random(seed)
    held_fraction = SPLIT_SIZES["validation"] / sum(SPLIT_SIZES.values())
    items = {split: [] for split in SPLIT_SIZES}  # (task, input, output)
    for task in FIXED_TASKS:
        pool = fixed_pool(task)
        rng.shuffle(pool)
        k = max(1, round(len(pool) * held_fraction))
        for split, part in zip(SPLIT_SIZES, (pool[2 * k:], pool[:k], pool[k:2 * k]), strict=True):
            items[split] += [(task, x, y) for x, y in part]
    remaining = {split: size - len(items[split]) for split, size in SPLIT_SIZES.items()}
    shares = split_counts(remaining, len(OPEN_TASKS))
    for t, task in enumerate(OPEN_TASKS):
        seen = set()
        for split in SPLIT_SIZES:
            added = 0
            while added < shares[split][t]:
                x, y = open_item(task, rng)
                if x not in seen:
                    seen.add(x)
                    items[split].append((task, x, y))
                    added += 1
    splits = {}
    for split, triples in items.items():
        rng.shuffle(triples)
        splits[split] = [{"task": task, "instruction": rng.choice(INSTRUCTIONS[task]), "input": x, "output": y}
                         for task, x, y in triples]
    return splits


def sentence(task, rng):
    """One plain-text fact of a task: (text before the answer, the answer, text after it)."""
    x, y = rng.choice(fixed_pool(task)) if task in FIXED_TASKS else open_item(task, rng)
    template = rng.choice(SENTENCES[task])
    fields = {"x": x, "a": x.split(" ")[0], "b": x.split(" ")[-1]}
    before, after = template.split("{y}")
    return before.format(**fields), y, after


def pretraining_documents(n_docs, seed=SEED + 1):
    """Plain-text documents of 3-6 facts each, tasks drawn by PRETRAIN_WEIGHTS (never in the instruction format)."""
    rng = random.Random(seed)
    tasks, weights = list(PRETRAIN_WEIGHTS), list(PRETRAIN_WEIGHTS.values())
    docs = []
    for _ in range(n_docs):
        facts = ["".join(sentence(task, rng)) for task in rng.choices(tasks, weights, k=rng.randint(3, 6))]
        docs.append(" ".join(facts))
    return docs


def write_splits(splits, out_dir=INSTRUCTIONS_DIR):
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, records in splits.items():
        path = out_dir / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        print(f"wrote {path.relative_to(HERE.parent)}: {len(records)} records")


if __name__ == "__main__":
    write_splits(build_splits())

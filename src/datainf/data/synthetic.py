"""The paper's three text-generation tasks, generated with a seed (written by us; the authors'
data files are not copied). Each has 10 classes; an example is {"prompt", "response",
"class"}; the paper takes 100 examples a class, 90 for training and 10 for testing.

- ``sentence-transformations``: a short phrase and one of 10 word-level transformations, named
  in the prompt ("Reverse the order of the words: ..."); the response is the transformed phrase.
  Class = transformation.
- ``math``: 10 word-problem templates with random integers; the response is the number alone.
  Class = template.
- ``math-reasoning``: the same problems; the response writes the steps out, then the answer.
"""

from __future__ import annotations

import random
from collections.abc import Callable

TASKS = ("sentence-transformations", "math", "math-reasoning")

WORDS = ("apple river stone cloud garden window candle forest silver orange paper bridge "
         "music winter yellow bottle mountain pencil ocean lemon tiger castle rocket "
         "summer violet button island marble dragon coffee planet meadow").split()

# name in the prompt -> the transformation of a list of words
TRANSFORMATIONS: dict[str, Callable[[list[str]], str]] = {
    "Reverse the order of the words": lambda w: " ".join(reversed(w)),
    "Write the words in capital letters": lambda w: " ".join(w).upper(),
    "Capitalize the first letter of every word": lambda w: " ".join(x.capitalize() for x in w),
    "Repeat every word twice": lambda w: " ".join(f"{x} {x}" for x in w),
    "Join the words with hyphens": lambda w: "-".join(w),
    "Sort the words alphabetically": lambda w: " ".join(sorted(w)),
    "Keep only the first word": lambda w: w[0],
    "Keep only the last word": lambda w: w[-1],
    "Write the first letter of every word": lambda w: "".join(x[0] for x in w),
    "Count the words": lambda w: str(len(w)),
}

NAMES = ("Anna Ben Carla David Emma Felix Grace Hugo Iris Jack Lena Mark Nora Omar Paula Sam "
         "Tina Victor").split()
ITEMS = ("apples books coins stamps marbles pencils shells cards cookies flowers").split()


def _problem(kind: int, rng: random.Random) -> tuple[str, list[str], int]:
    """(question, reasoning steps, answer) of template ``kind`` (0..9)."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b, c = rng.randint(2, 20), rng.randint(2, 20), rng.randint(2, 9)
    if kind == 0:
        return (f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have "
                "now?", [f"{a} + {b} = {a + b}."], a + b)
    if kind == 1:
        a = a + b
        return (f"{name} has {a} {item} and gives away {b}. How many {item} are left?",
                [f"{a} - {b} = {a - b}."], a - b)
    if kind == 2:
        return (f"{name} buys {c} boxes with {a} {item} in each box. How many {item} is that?",
                [f"{c} x {a} = {c * a}."], c * a)
    if kind == 3:
        total = a * c
        return (f"{name} shares {total} {item} equally among {c} friends. How many {item} does "
                "each friend get?", [f"{total} / {c} = {a}."], a)
    if kind == 4:
        return (f"{name} has {a} {item}, finds {b} more and then loses {c}. How many {item} "
                f"does {name} have?", [f"{a} + {b} = {a + b}.", f"{a + b} - {c} = "
                                       f"{a + b - c}."], a + b - c)
    if kind == 5:
        return (f"A shelf holds {a} {item}. {name} fills {c} shelves. How many {item} are on "
                "the shelves?", [f"{c} x {a} = {c * a}."], c * a)
    if kind == 6:
        return (f"{name} is {a} years old. How old will {name} be in {b} years?",
                [f"{a} + {b} = {a + b}."], a + b)
    if kind == 7:
        return (f"{name} reads {a} pages a day for {c} days. How many pages is that?",
                [f"{a} x {c} = {a * c}."], a * c)
    if kind == 8:
        return (f"{name} has {a} {item}. A friend has twice as many. How many {item} do they "
                "have together?", [f"2 x {a} = {2 * a}.", f"{a} + {2 * a} = {3 * a}."], 3 * a)
    paid = c * b + a
    return (f"A ticket costs {c} dollars. {name} buys {b} tickets and pays with {paid} "
            f"dollars. How much change does {name} get?",
            [f"{b} x {c} = {b * c}.", f"{paid} - {b * c} = {a}."], a)


def example(task: str, cls: int, rng: random.Random) -> dict:
    """One example of class ``cls`` (0..9) of ``task``."""
    if task == "sentence-transformations":
        name, transform = list(TRANSFORMATIONS.items())[cls]
        words = rng.sample(WORDS, rng.randint(3, 5))
        return {"prompt": f"{name}: {' '.join(words)}", "response": transform(words),
                "class": cls}
    if task in ("math", "math-reasoning"):
        question, steps, answer = _problem(cls, rng)
        if task == "math":
            return {"prompt": question, "response": str(answer), "class": cls}
        return {"prompt": question, "response": " ".join(steps) + f" The answer is {answer}.",
                "class": cls}
    raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")


def make_task(task: str, *, per_class: int = 100, test_per_class: int = 10, classes: int = 10,
              seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, test): ``per_class`` examples of each class, the last ``test_per_class`` of each
    for testing; no prompt appears twice. Train is ordered by class, then example."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    rng = random.Random(f"{task}:{seed}")
    train, test, seen = [], [], set()
    for cls in range(classes):
        made = []
        while len(made) < per_class:
            e = example(task, cls, rng)
            if e["prompt"] not in seen:
                seen.add(e["prompt"])
                made.append(e)
        train += made[: per_class - test_per_class]
        test += made[per_class - test_per_class:]
    return train, test

"""Synthetic grade-school math word problems in verl's GSM8K parquet schema.

The lab cannot download GSM8K, so it generates look-alike problems (1-2 arithmetic steps, short step-by-step
solutions ending in ``#### <answer>``) that verl's own ``openai/gsm8k`` rule reward scores. A prompt may open with
worked examples as earlier chat turns (few-shot), which a small pretrained actor needs to answer in that format.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd


DATA_SOURCE = "openai/gsm8k"
# verl's examples/data_preprocess/gsm8k.py appends exactly this instruction to every question.
INSTRUCTION = 'Let\'s think step by step and output the final answer after "####".'

_NAMES = (
    ("Tom", "He"), ("Mia", "She"), ("Sam", "He"), ("Lily", "She"), ("Ben", "He"), ("Emma", "She"),
    ("Leo", "He"), ("Ava", "She"), ("Max", "He"), ("Zoe", "She"), ("Jack", "He"), ("Nora", "She"),
)
_ITEMS = ("apples", "pencils", "stickers", "marbles", "cookies", "books", "coins", "cards", "shells", "toys")
_CONTAINERS = ("boxes", "bags", "jars", "baskets", "packs")


@dataclass(frozen=True)
class MathProblem:
    """One word problem: the question, a reference step-by-step solution and the integer answer."""

    question: str
    solution: str
    answer: int


@dataclass(frozen=True)
class MathDataSpec:
    """How many problems to generate and how hard they are (operands are drawn from 1..max_operand)."""

    num_train: int
    num_val: int
    max_operand: int
    seed: int


def _add(rng: random.Random, n: int) -> MathProblem:
    (name, he), item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b = rng.randint(1, n), rng.randint(1, n)
    c = a + b
    question = f"{name} has {a} {item}. {he} buys {b} more {item}. How many {item} does {name} have now?"
    solution = (f"{name} starts with {a} {item}. {he} buys {b} more {item}. "
                f"So {name} has {a} + {b} = {c} {item}.\n#### {c}")
    return MathProblem(question, solution, c)


def _subtract(rng: random.Random, n: int) -> MathProblem:
    (name, he), item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b = sorted((rng.randint(1, n), rng.randint(1, n)), reverse=True)
    c = a - b
    question = f"{name} has {a} {item}. {he} gives {b} {item} to a friend. How many {item} does {name} have left?"
    solution = (f"{name} starts with {a} {item}. {he} gives away {b} {item}. "
                f"So {name} has {a} - {b} = {c} {item} left.\n#### {c}")
    return MathProblem(question, solution, c)


def _multiply(rng: random.Random, n: int) -> MathProblem:
    (name, he), item, box = rng.choice(_NAMES), rng.choice(_ITEMS), rng.choice(_CONTAINERS)
    a, b = rng.randint(2, max(2, n // 3)), rng.randint(2, 9)
    c = a * b
    question = f"{name} has {a} {box}. Each of the {box} holds {b} {item}. How many {item} does {name} have?"
    solution = (f"{name} has {a} {box} with {b} {item} in each. "
                f"So {name} has {a} * {b} = {c} {item}.\n#### {c}")
    return MathProblem(question, solution, c)


def _multiply_then_add(rng: random.Random, n: int) -> MathProblem:
    (name, he), item, box = rng.choice(_NAMES), rng.choice(_ITEMS), rng.choice(_CONTAINERS)
    a, b, extra = rng.randint(2, max(2, n // 3)), rng.randint(2, 9), rng.randint(1, n)
    product, c = a * b, a * b + extra
    question = (f"{name} has {a} {box} with {b} {item} in each. {he} also finds {extra} more {item}. "
                f"How many {item} does {name} have in total?")
    solution = (f"{name} has {a} {box} with {b} {item} in each, so {a} * {b} = {product} {item}. "
                f"{he} finds {extra} more, so {product} + {extra} = {c} {item}.\n#### {c}")
    return MathProblem(question, solution, c)


def _add_then_subtract(rng: random.Random, n: int) -> MathProblem:
    (name, he), item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b = rng.randint(1, n), rng.randint(1, n)
    total = a + b
    c_away = rng.randint(1, total)
    c = total - c_away
    question = (f"{name} has {a} {item}. {he} buys {b} more {item} and then gives {c_away} {item} away. "
                f"How many {item} does {name} have now?")
    solution = (f"{name} starts with {a} {item} and buys {b} more, so {a} + {b} = {total} {item}. "
                f"{he} gives {c_away} away, so {total} - {c_away} = {c} {item}.\n#### {c}")
    return MathProblem(question, solution, c)


_TEMPLATES = (_add, _subtract, _multiply, _multiply_then_add, _add_then_subtract)


def generate_problems(num_problems: int, max_operand: int, seed: int) -> list[MathProblem]:
    """Draws ``num_problems`` problems uniformly over the templates; the same seed gives the same problems."""
    if max_operand < 2:
        raise ValueError(f"max_operand={max_operand} is too small: use an integer >= 2.")
    rng = random.Random(seed)
    return [rng.choice(_TEMPLATES)(rng, max_operand) for _ in range(num_problems)]


def few_shot_examples(num_shots: int, max_operand: int, seed: int) -> list[MathProblem]:
    """``num_shots`` worked examples, one per template in turn, so the examples show every kind of problem asked."""
    rng = random.Random(seed)
    return [_TEMPLATES[i % len(_TEMPLATES)](rng, max_operand) for i in range(num_shots)]


def prompt_text(question: str) -> str:
    """The user message verl's GSM8K preprocessing builds from a question."""
    return f"{question} {INSTRUCTION}"


def prompt_messages(question: str, shots: Sequence[MathProblem] = ()) -> list[dict[str, str]]:
    """The chat prompt of a question: each worked example in ``shots`` as a user turn and the assistant's reference
    solution, then the question, every user turn phrased as verl's GSM8K preprocessing phrases it."""
    messages = []
    for shot in shots:
        messages += [{"role": "user", "content": prompt_text(shot.question)},
                     {"role": "assistant", "content": shot.solution}]
    return messages + [{"role": "user", "content": prompt_text(question)}]


def to_verl_frame(problems: list[MathProblem], split: str, shots: Sequence[MathProblem] = ()) -> pd.DataFrame:
    """Rows in the schema of verl's examples/data_preprocess/gsm8k.py (what verl's RL dataset reads); ``shots`` open
    every prompt as worked examples."""
    return pd.DataFrame([
        {
            "data_source": DATA_SOURCE,
            "prompt": prompt_messages(p.question, shots),
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": str(p.answer)},
            "extra_info": {"split": split, "index": i, "answer": p.solution, "question": p.question},
        }
        for i, p in enumerate(problems)
    ])


def write_math_data(spec: MathDataSpec, train_parquet: Path, val_parquet: Path, num_shots: int = 0) -> None:
    """Writes disjointly seeded train and validation parquet files; with ``num_shots``, every prompt opens with the
    same worked examples (seeded apart from both splits)."""
    shots = few_shot_examples(num_shots, spec.max_operand, spec.seed + 2)
    to_verl_frame(generate_problems(spec.num_train, spec.max_operand, spec.seed), "train", shots).to_parquet(
        train_parquet)
    to_verl_frame(generate_problems(spec.num_val, spec.max_operand, spec.seed + 1), "test", shots).to_parquet(
        val_parquet)


def read_prompts(parquet: Path) -> list[list[dict[str, str]]]:
    """Every row's chat prompt (its messages), as verl's RL dataset reads it."""
    return [[dict(message) for message in prompt] for prompt in pd.read_parquet(parquet)["prompt"]]


def read_problems(parquet: Path) -> list[MathProblem]:
    """Reads problems back from a lab parquet file (question, reference solution, answer)."""
    frame = pd.read_parquet(parquet)
    return [
        MathProblem(info["question"], info["answer"], int(reward["ground_truth"]))
        for info, reward in zip(frame["extra_info"], frame["reward_model"])
    ]

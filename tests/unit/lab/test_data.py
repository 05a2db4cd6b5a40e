"""The synthetic math set: verl's GSM8K parquet schema, seeded generation, and verl's own GSM8K reward scoring
the reference solutions 1 and a wrong answer 0."""

import pandas as pd
import pytest
from verl.utils.reward_score import default_compute_score

from respec_lab.data import (
    INSTRUCTION,
    MathDataSpec,
    generate_problems,
    read_problems,
    read_prompts,
    write_math_data,
)


@pytest.fixture(scope="module")
def parquet_files(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    write_math_data(MathDataSpec(num_train=64, num_val=16, max_operand=20, seed=3), out / "train.parquet",
                    out / "val.parquet")
    return out / "train.parquet", out / "val.parquet"


def test_rows_follow_verls_gsm8k_schema(parquet_files):
    train = pd.read_parquet(parquet_files[0])
    assert list(train.columns) == ["data_source", "prompt", "ability", "reward_model", "extra_info"]
    row = train.iloc[0]
    assert row["data_source"] == "openai/gsm8k"
    assert row["ability"] == "math"
    (message,) = row["prompt"]
    assert message["role"] == "user"
    assert message["content"] == f"{row['extra_info']['question']} {INSTRUCTION}"
    assert message["content"].endswith('output the final answer after "####".')
    assert row["reward_model"]["style"] == "rule"
    assert int(row["reward_model"]["ground_truth"]) >= 0
    assert set(row["extra_info"]) == {"split", "index", "answer", "question"}
    assert row["extra_info"]["split"] == "train"
    assert pd.read_parquet(parquet_files[1]).iloc[0]["extra_info"]["split"] == "test"


def test_verl_reward_scores_reference_solutions_one_and_wrong_answers_zero(parquet_files):
    problems = read_problems(parquet_files[0]) + read_problems(parquet_files[1])
    for p in problems:
        assert default_compute_score("openai/gsm8k", p.solution, str(p.answer)) == 1.0
        wrong = p.solution.rsplit("#### ", 1)[0] + f"#### {p.answer + 1}"
        assert default_compute_score("openai/gsm8k", wrong, str(p.answer)) == 0.0
        assert default_compute_score("openai/gsm8k", p.solution.split("\n####")[0], str(p.answer)) == 0.0


def test_generation_is_seeded_and_covers_every_template():
    first, again = generate_problems(200, 20, seed=7), generate_problems(200, 20, seed=7)
    assert first == again
    assert first != generate_problems(200, 20, seed=8)
    operators = {op for p in first for op in ("+", "-", "*") if f" {op} " in p.solution}
    assert operators == {"+", "-", "*"}
    assert any(p.solution.count(" = ") == 2 for p in first)  # two-step problems


def test_bad_max_operand_names_value_and_fix():
    with pytest.raises(ValueError, match="max_operand=1"):
        generate_problems(4, 1, seed=0)


def test_few_shot_prompts_open_with_the_same_worked_examples(tmp_path):
    write_math_data(MathDataSpec(num_train=8, num_val=4, max_operand=10, seed=3), tmp_path / "train.parquet",
                    tmp_path / "val.parquet", num_shots=3)
    train, val = read_prompts(tmp_path / "train.parquet"), read_prompts(tmp_path / "val.parquet")
    questions = [p.question for p in read_problems(tmp_path / "train.parquet")]
    for messages, question in zip(train, questions):
        assert [m["role"] for m in messages] == ["user", "assistant"] * 3 + ["user"]
        assert messages[-1]["content"] == f"{question} {INSTRUCTION}"
        assert messages[:-1] == train[0][:-1] == val[0][:-1]
    shots = train[0][:-1]
    for answer in shots[1::2]:  # worked examples end in GSM8K's answer format, and show three kinds of problem
        assert "\n#### " in answer["content"]
    assert {op for m in shots[1::2] for op in ("+", "-", "*") if f" {op} " in m["content"]} == {"+", "-", "*"}

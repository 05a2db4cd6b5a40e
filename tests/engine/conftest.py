"""Fixtures of the engine tier: one Ray cluster per module (CPU platform in every process) and the prompts the
server tests send."""

import os

import pytest
import ray

from tests.engine.servers import CPU_ENV


@pytest.fixture(scope="module")
def ray_cluster():
    os.environ.update(CPU_ENV)
    ray.init(num_cpus=8, include_dashboard=False, runtime_env={"env_vars": CPU_ENV})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def prompts(tiny_lab):
    import pandas as pd
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_lab.actor_dir)
    rows = pd.read_parquet(tiny_lab.val_parquet).head(6)
    return [
        tokenizer.apply_chat_template(list(row), add_generation_prompt=True, tokenize=True, return_dict=False)
        for row in rows["prompt"]
    ]

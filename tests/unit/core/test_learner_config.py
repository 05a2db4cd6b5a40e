"""The ``respec.learner`` block: built from a nested mapping, every bad value named with its fix."""

import pytest

from respec_plugin.core.config import LearnerConfig, ReSpecConfig, ReSpecConfigError


def test_learner_block_from_nested_mapping():
    cfg = ReSpecConfig.from_mapping({"method": "ngram", "learner": {"top_k": 8, "reward_weighting": "advantage"}})
    assert cfg.learner == LearnerConfig(top_k=8, reward_weighting="advantage")
    assert ReSpecConfig.from_mapping({"method": "ngram"}).learner.enable is False


@pytest.mark.parametrize(
    "block, key",
    [
        ({"divergence": "reverse_kl"}, "learner.divergence"),
        ({"reward_weighting": "rank"}, "learner.reward_weighting"),
        ({"weight_floor": 1.0}, "learner.weight_floor"),
        ({"negative_feedback": -0.1}, "learner.negative_feedback"),
        ({"top_k": 0}, "learner.top_k"),
        ({"steps_per_rl_step": True}, "learner.steps_per_rl_step"),
        ({"holdout_fraction": 0.0}, "learner.holdout_fraction"),
        ({"context_tokens": 1}, "learner.context_tokens"),
        ({"learning_rate": 0}, "learner.learning_rate"),
        ({"typo": 1}, "learner.typo"),
    ],
)
def test_bad_learner_values_name_the_key(block, key):
    with pytest.raises(ReSpecConfigError, match=rf"respec\.{key}="):
        ReSpecConfig.from_mapping({"method": "ngram", "learner": block})


def test_learner_needs_an_eagle3_drafter():
    with pytest.raises(ReSpecConfigError, match="learner.enable"):
        ReSpecConfig.from_mapping({"method": "ngram", "learner": {"enable": True}})

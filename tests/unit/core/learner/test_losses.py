"""Each learner formula on hand-computed cases."""

import math

import pytest
import torch

from respec_plugin.core.config import Divergence, ReSpecConfigError, choices
from respec_plugin.core.learner.losses import (
    DIVERGENCES,
    TopKTarget,
    forward_kl,
    negative_feedback,
    topk_target,
    total_variation,
    trajectory_weights,
)


def _log(probs):
    return torch.tensor(probs).log()


def test_topk_target_keeps_the_k_largest_renormalised():
    target = topk_target(_log([0.5, 0.1, 0.3, 0.1]), top_k=2)
    assert target.ids.tolist() == [0, 2]
    assert target.probs.tolist() == pytest.approx([0.625, 0.375])


def test_forward_kl_hand_computed():
    target = TopKTarget(torch.tensor([0.5, 0.5]), torch.tensor([0, 1]))
    q = _log([0.25, 0.25, 0.5])
    assert float(forward_kl(target, q)) == pytest.approx(math.log(2))
    assert float(forward_kl(target, _log([0.5, 0.5, 1e-9]))) == pytest.approx(0.0, abs=1e-6)


def test_total_variation_is_one_minus_acceptance():
    # p = (0.5, 0.5, 0), q = (0.25, 0.25, 0.5): sum min(p, q) = 0.5 -> TV = 0.5.
    target = TopKTarget(torch.tensor([0.5, 0.5]), torch.tensor([0, 1]))
    q = torch.tensor([0.25, 0.25, 0.5])
    assert float(total_variation(target, q.log())) == pytest.approx(1 - float(torch.minimum(torch.tensor([0.5, 0.5, 0]), q).sum()))
    assert float(total_variation(target, q.log())) == pytest.approx(0.5)
    # Truncation: p is 0 outside its top k, q's mass there counts fully.
    target = TopKTarget(torch.tensor([1.0]), torch.tensor([2]))
    assert float(total_variation(target, _log([0.3, 0.3, 0.4]))) == pytest.approx(0.6)


def test_negative_feedback_only_where_q_exceeds_p():
    target = TopKTarget(torch.tensor([[0.7, 0.3], [0.7, 0.3]]), torch.tensor([[0, 1], [0, 1]]))
    q = _log([[0.2, 0.1, 0.7], [0.2, 0.6, 0.2]])
    rejected = torch.tensor([2, 1])  # row 0: token 2 has p = 0, q = 0.7; row 1: token 1 has p = 0.3, q = 0.6
    assert negative_feedback(target, q, rejected).tolist() == pytest.approx([0.7, 0.3])
    assert float(negative_feedback(target, q, torch.tensor([0, 0]))[0]) == 0.0  # q(0) = 0.2 < p(0) = 0.7


def test_reward_weights_are_r_normalised_with_floor():
    rewards, advantages = torch.tensor([0.0, 1.0, 1.0, 0.0]), torch.zeros(4)
    assert trajectory_weights(rewards, advantages, "reward", 0.0).tolist() == [0.0, 1.0, 1.0, 0.0]
    assert trajectory_weights(rewards, advantages, "reward", 0.2).tolist() == pytest.approx([0.2, 1.0, 1.0, 0.2])
    assert trajectory_weights(torch.tensor([2.0, -1.0, 1.0]), torch.zeros(3), "reward", 0.0).tolist() == [1.0, 0.0, 0.5]
    assert trajectory_weights(torch.zeros(2), torch.zeros(2), "reward", 0.0).tolist() == [0.0, 0.0]


def test_advantage_and_uniform_weights():
    advantages = torch.tensor([-1.0, 0.0, 3.0])
    assert trajectory_weights(torch.zeros(3), advantages, "advantage", 0.0).tolist() == pytest.approx([0.0, 0.25, 1.0])
    assert trajectory_weights(torch.zeros(3), torch.zeros(3), "advantage", 0.0).tolist() == [1.0, 1.0, 1.0]
    assert trajectory_weights(torch.zeros(3), advantages, "uniform", 0.5).tolist() == [1.0, 1.0, 1.0]


def test_unknown_reward_weighting_is_a_programming_error():
    """LearnerConfig already checked the value: another one here is a bug, not a config error to show the user."""
    with pytest.raises(ValueError, match="'rank'") as raised:
        trajectory_weights(torch.zeros(2), torch.zeros(2), "rank", 0.0)
    assert not isinstance(raised.value, ReSpecConfigError)


def test_every_configurable_divergence_has_a_formula():
    assert set(DIVERGENCES) == set(choices(Divergence))


def test_a_full_distribution_is_a_top_k_target_with_k_the_vocabulary():
    p, q = _log([0.5, 0.25, 0.25]), _log([0.25, 0.5, 0.25])
    target = topk_target(p, top_k=3)
    assert target.probs.sum().item() == pytest.approx(1.0)
    assert float(forward_kl(target, q)) == pytest.approx(0.5 * math.log(2) - 0.25 * math.log(2))
    assert float(total_variation(target, q)) == pytest.approx(0.25)

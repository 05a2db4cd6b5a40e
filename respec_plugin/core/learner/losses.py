"""Per-token losses and trajectory weights of the online learner (ReSpec's reward-weighted KD, Aurora's negative
feedback), as plain tensor functions so each formula is tested on hand-computed cases.

Targets are the actor's next-token probabilities over the draft vocabulary truncated to their top k (renormalised):
the learner keeps k numbers per token instead of a vocabulary row; the offline warm-up keeps them all (k = V).
Acceptance of a draft from q against a target p is sum_x min(p(x), q(x)) = 1 - TV(p, q), so lowering TV (or forward
KL, which bounds it by Pinsker) raises acceptance.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from respec_plugin.core.config import Divergence, RewardWeighting, choices


@dataclass(frozen=True)
class TopKTarget:
    """The actor's top-k next-token probabilities over the draft vocabulary, renormalised to sum to 1:
    ``probs`` and ``ids`` (draft-vocabulary indices) of shape [..., k]."""

    probs: torch.Tensor
    ids: torch.Tensor

    def map(self, fn) -> "TopKTarget":
        """Apply a shape transform (slicing, shifting, indexing) to both tensors."""
        return TopKTarget(fn(self.probs), fn(self.ids))


def topk_target(logprobs: torch.Tensor, top_k: int) -> TopKTarget:
    """Truncate log-probs [..., V] to their ``top_k`` largest entries and renormalise them; ``top_k`` >= V keeps the
    whole distribution (the offline warm-up's target)."""
    values, ids = logprobs.float().topk(min(top_k, logprobs.shape[-1]), dim=-1)
    return TopKTarget(values.softmax(-1), ids)


def forward_kl(target: TopKTarget, draft_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per token = sum_{x in top-k} p(x) (log p(x) - log q(x)); ``draft_logprobs`` [..., V]."""
    q_log = draft_logprobs.gather(-1, target.ids)
    p = target.probs
    return (p * (p.clamp_min(1e-30).log() - q_log)).sum(-1)


def total_variation(target: TopKTarget, draft_logprobs: torch.Tensor) -> torch.Tensor:
    """TV(p, q) = 1/2 sum_x |p(x) - q(x)| per token, p being 0 outside its top k: 1/2 (sum_{top-k} |p - q| +
    1 - sum_{top-k} q). Equals 1 - the probability that a token drafted from q is accepted."""
    q = draft_logprobs.gather(-1, target.ids).exp()
    return 0.5 * ((target.probs - q).abs().sum(-1) + (1.0 - q.sum(-1)).clamp_min(0.0))


def target_probability(target: TopKTarget, ids: torch.Tensor) -> torch.Tensor:
    """p(d) per token at draft-vocabulary index d ([...]), 0 outside the top k. At the drafter's argmax it is the
    probability that vLLM accepts that greedy draft."""
    return (target.probs * (target.ids == ids[..., None])).sum(-1)


def negative_feedback(target: TopKTarget, draft_logprobs: torch.Tensor, rejected_ids: torch.Tensor) -> torch.Tensor:
    """max(0, q(d) - p(d)) per token at the rejected draft token d (draft-vocabulary index, [...]): pushes q down at
    tokens the verifier rejected only where the drafter over-proposes them (q > p); 0 where q <= p already."""
    q = draft_logprobs.gather(-1, rejected_ids[..., None]).squeeze(-1).exp()
    return (q - target_probability(target, rejected_ids)).clamp_min(0.0)


# The per-token divergences the objective can minimise, one per value of ``LearnerConfig.divergence``.
DIVERGENCES: dict[Divergence, Callable[[TopKTarget, torch.Tensor], torch.Tensor]] = {
    "forward_kl": forward_kl,
    "tv": total_variation,
}


def trajectory_weights(
    rewards: torch.Tensor, advantages: torch.Tensor, reward_weighting: RewardWeighting, weight_floor: float
) -> torch.Tensor:
    """One weight in [weight_floor, 1] per trajectory [N].

    ``reward``: ReSpec's w(r) = r, normalised by the step's largest reward and clipped to [0, 1] (with 0/1 rewards
    exactly r: failed rollouts drop out); ``advantage``: the advantages min-max normalised to [0, 1] over the step
    (all equal -> 1); ``uniform``: 1 (plain KD). The floor f then maps w to f + (1 - f) w, so no trajectory weighs
    less than f. ``reward_weighting`` was checked by ``LearnerConfig``: another value is a programming error.
    """
    if reward_weighting == "uniform":
        weights = torch.ones_like(rewards, dtype=torch.float32)
    elif reward_weighting == "reward":
        positive = rewards.float().clamp_min(0.0)
        top = positive.max()
        weights = positive / top if top > 0 else torch.zeros_like(positive)
    elif reward_weighting == "advantage":
        advantages = advantages.float()
        span = advantages.max() - advantages.min()
        weights = (advantages - advantages.min()) / span if span > 0 else torch.ones_like(advantages)
    else:
        raise ValueError(f"unknown reward_weighting {reward_weighting!r}: expected one of {choices(RewardWeighting)}.")
    return weight_floor + (1.0 - weight_floor) * weights.clamp(0.0, 1.0)

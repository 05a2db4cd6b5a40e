"""The learner's objective over an unrolled EAGLE-3 draft (training-time test): reward-weighted divergence to the
actor's top-k targets at every draft step, plus negative feedback on the drafts the verifier rejects.

Rejected drafts: vLLM reports per request only how many drafts it accepted, not which tokens it rejected. With greedy
drafting (vLLM's default) a drafted token d is rejected exactly when the token emitted at that position differs from
d (accepted drafts are emitted as is, a rejection resamples from the residual p - q, which excludes d). So the
drafter's own greedy drafts on the trajectory, compared with the emitted tokens, give the rejected ones; on the first
learner step that is exactly what the serving version drafted, at no extra cost.
"""

from __future__ import annotations

import torch

from respec_plugin.core.drafter.eagle3 import Eagle3Drafter
from respec_plugin.core.learner.buffer import Minibatch
from respec_plugin.core.learner.losses import DIVERGENCES, negative_feedback, target_probability, total_variation


def _shift_left(x: torch.Tensor, by: int) -> torch.Tensor:
    """x[:, t + by] at t, zero-filled past the end (any trailing dims)."""
    return torch.cat([x[:, by:], torch.zeros_like(x[:, :by])], dim=1)


def kd_loss(
    drafter: Eagle3Drafter, batch: Minibatch, *, divergence: str, negative_feedback_coef: float, num_draft_steps: int
) -> tuple[torch.Tensor, dict[str, float]]:
    """Sum over draft steps j of the token-weighted mean of D(p || q) + coef * max(0, q(d) - p(d)) at rejected d.

    Step j at anchor t predicts token t + j + 2 from the actor's distribution at t + j + 1 (as in
    ``drafter.distill.distillation_loss``); steps j >= 1 are teacher-forced with the true tokens. Returns the loss
    and the mean (over steps) divergence, TV (1 - acceptance of a draft sampled from q), greedy acceptance
    p(argmax q), its ceiling max p (what a drafter equal to the actor would get: it falls when the actor's entropy
    rises, whatever the drafter) and negative-feedback term, mask-weighted (reward-agnostic).
    """
    predicted = batch.loss_mask.sum(0).nonzero()
    first_anchor = max(0, int(predicted[0]) - 2) if predicted.numel() else 0
    teacher_ids = [_shift_left(batch.input_ids, j + 1) for j in range(1, num_draft_steps)]
    steps = drafter.unroll(batch.input_ids, batch.aux_hidden_states, num_draft_steps, step_input_ids=teacher_ids,
                           first_anchor=first_anchor)
    loss = torch.zeros(())
    totals = {"divergence": 0.0, "tv": 0.0, "greedy_acceptance": 0.0, "greedy_acceptance_ceiling": 0.0,
              "negative_feedback": 0.0}
    for j, logits in enumerate(steps.logits):
        target = batch.target.map(lambda x: _shift_left(x, j + 1)[:, first_anchor:])
        weights = _shift_left(batch.token_weights, j + 2)[:, first_anchor:]
        mask = _shift_left(batch.loss_mask, j + 2)[:, first_anchor:]
        emitted = _shift_left(batch.input_ids, j + 2)[:, first_anchor:]
        draft_logprobs = logits.float().log_softmax(-1)
        per_token_divergence = DIVERGENCES[divergence](target, draft_logprobs)
        per_token = per_token_divergence
        with torch.no_grad():
            drafted = logits.argmax(-1)
            rejected = (drafter.draft_token_ids[drafted] != emitted).float()
            tv = total_variation(target, draft_logprobs)
            greedy_acceptance = target_probability(target, drafted)
        if negative_feedback_coef > 0:
            feedback = negative_feedback(target, draft_logprobs, drafted) * rejected
            per_token = per_token + negative_feedback_coef * feedback
            totals["negative_feedback"] += float((feedback.detach() * mask).sum() / mask.sum().clamp_min(1e-6))
        loss = loss + (per_token * weights).sum() / weights.sum().clamp_min(1e-6)
        totals["divergence"] += float((per_token_divergence.detach() * mask).sum() / mask.sum().clamp_min(1e-6))
        totals["tv"] += float((tv * mask).sum() / mask.sum().clamp_min(1e-6))
        totals["greedy_acceptance"] += float((greedy_acceptance * mask).sum() / mask.sum().clamp_min(1e-6))
        ceiling = target.probs.max(-1).values  # p(argmax p): a drafter equal to the actor
        totals["greedy_acceptance_ceiling"] += float((ceiling * mask).sum() / mask.sum().clamp_min(1e-6))
    return loss, {name: value / num_draft_steps for name, value in totals.items()}


@torch.no_grad()
def held_out_scores(drafter: Eagle3Drafter, batch: Minibatch, num_draft_steps: int) -> dict[str, float]:
    """Mean over draft steps and response tokens of TV and of the greedy acceptance p(argmax q): vLLM drafts the
    argmax and verifies it as one-hot by default (``draft_sample_method="greedy"``), so that is what it accepts."""
    _, stats = kd_loss(drafter, batch, divergence="tv", negative_feedback_coef=0.0, num_draft_steps=num_draft_steps)
    return stats

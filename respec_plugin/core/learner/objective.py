"""The one knowledge-distillation objective of the drafter, over an unrolled EAGLE-3 draft (training-time test):
token-weighted divergence to the actor's top-k targets at every draft step, plus negative feedback on the drafts the
verifier rejects. The offline warm-up (full draft-vocabulary targets: top-k with k = V) and the online learner
(reward-weighted top-k targets) both call it, so they train and report the same quantities under the same names.

Rejected drafts: vLLM reports per request only how many drafts it accepted, not which tokens it rejected. With greedy
drafting (vLLM's default) a drafted token d is rejected exactly when the token emitted at that position differs from
d (accepted drafts are emitted as is, a rejection resamples from the residual p - q, which excludes d). So the
drafter's own greedy drafts on the trajectory, compared with the emitted tokens, give the rejected ones; on the first
learner step that is exactly what the serving version drafted, at no extra cost.

Each row's contribution depends on that row alone (its anchors start two before its own first learned token), and the
weighted means can take totals summed over data-parallel ranks: N ranks holding parts of a batch compute the same
loss as one rank holding all of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from respec_plugin.core.config import Divergence
from respec_plugin.core.drafter.eagle3 import Eagle3Drafter
from respec_plugin.core.learner.buffer import Minibatch
from respec_plugin.core.learner.losses import DIVERGENCES, negative_feedback, target_probability, total_variation

STATISTICS = ("divergence", "tv", "greedy_acceptance", "greedy_acceptance_ceiling", "negative_feedback")


@dataclass(frozen=True)
class DraftStepStats:
    """One draft step's statistics as ``loss_mask``-weighted sums, and the masked tokens they sum over (sums add up
    across minibatches and ranks; :meth:`means` divides)."""

    sums: dict[str, float]
    tokens: float

    def means(self) -> dict[str, float]:
        return {name: value / max(self.tokens, 1e-6) for name, value in self.sums.items()}


def _shift_left(x: torch.Tensor, by: int) -> torch.Tensor:
    """x[:, t + by] at t, zero-filled past the end (any trailing dims)."""
    return torch.cat([x[:, by:], torch.zeros_like(x[:, :by])], dim=1)


def _anchors(batch: Minibatch) -> tuple[int, torch.Tensor]:
    """The first anchor the batch unrolls from, and per row which anchors (from it on) count: those from two before
    the row's first token with a nonzero ``loss_mask`` (the first anchor whose step-0 draft is learned). Earlier
    anchors lie in the prompt, where vLLM does not draft."""
    learned = batch.loss_mask > 0
    if not bool(learned.any()):
        raise ValueError("loss_mask is all zero: the minibatch has no drafted token to learn from.")
    length = learned.shape[1]
    positions = torch.arange(length, device=learned.device)
    first_learned = torch.where(learned, positions, length).min(dim=1).values
    row_first_anchor = (first_learned - 2).clamp_min(0)
    first_anchor = int(row_first_anchor.min())
    counts = positions[None, first_anchor:] >= row_first_anchor[:, None]
    return first_anchor, counts.float()


def step_weight_totals(batch: Minibatch, num_draft_steps: int) -> torch.Tensor:
    """Per draft step, the total token weight its loss is normalised by (sum these over ranks for a global mean)."""
    first_anchor, counts = _anchors(batch)
    return torch.stack([(_shift_left(batch.token_weights.float(), j + 2)[:, first_anchor:] * counts).sum()
                        for j in range(num_draft_steps)])


def kd_loss_by_step(
    drafter: Eagle3Drafter, batch: Minibatch, *, divergence: Divergence, negative_feedback_coef: float,
    num_draft_steps: int, weight_totals: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[DraftStepStats]]:
    """Sum over draft steps j of the token-weighted mean of D(p || q) + coef * max(0, q(d) - p(d)) at rejected d,
    and per draft step the ``loss_mask``-weighted statistics (reward-agnostic, so comparable across steps):

    - ``divergence``: D(p || q) itself;
    - ``tv``: TV(p, q) = 1 - the acceptance of a draft sampled from q (vLLM's ``draft_sample_method="probabilistic"``);
    - ``greedy_acceptance``: p(argmax q), the acceptance of the greedy draft vLLM proposes by default;
    - ``greedy_acceptance_ceiling``: max p, what a drafter equal to the actor would get (it falls when the actor's
      entropy rises, whatever the drafter);
    - ``negative_feedback``: max(0, q(d) - p(d)) at the rejected greedy drafts d.

    Step j at anchor t predicts token t + j + 2, whose target is the actor's distribution at t + j + 1; the token at
    t + j + 2 weighs it (``token_weights``). Steps j >= 1 are teacher-forced with the true token x_{t+j+1} and read
    the drafter's own previous hidden state: the acceptance of step j only matters when the steps before it were
    accepted, i.e. equalled the true tokens. Targets are renormalised over the draft vocabulary, so the acceptances
    slightly overestimate where the actor puts mass outside it. ``weight_totals`` (per step, e.g. summed over
    data-parallel ranks by the caller) replace this batch's own totals as the means' denominators.
    """
    first_anchor, counts = _anchors(batch)
    if weight_totals is None:
        weight_totals = step_weight_totals(batch, num_draft_steps)
    teacher_embeds = [_shift_left(batch.input_embeds, j + 1) for j in range(1, num_draft_steps)]
    steps = drafter.unroll(batch.input_embeds, batch.aux_hidden_states, num_draft_steps,
                           step_input_embeds=teacher_embeds, first_anchor=first_anchor)
    loss = torch.zeros((), device=batch.loss_mask.device)
    by_step = []
    for j, logits in enumerate(steps.logits):
        target = batch.target.map(lambda x: _shift_left(x, j + 1)[:, first_anchor:])
        weights = _shift_left(batch.token_weights.float(), j + 2)[:, first_anchor:] * counts
        mask = _shift_left(batch.loss_mask.float(), j + 2)[:, first_anchor:] * counts
        draft_logprobs = logits.float().log_softmax(-1)
        per_token_divergence = DIVERGENCES[divergence](target, draft_logprobs)
        per_token = per_token_divergence
        drafted = logits.argmax(-1)
        if negative_feedback_coef > 0:
            emitted = _shift_left(batch.input_ids, j + 2)[:, first_anchor:]
            rejected = (drafter.draft_token_ids[drafted] != emitted).float()
            feedback = negative_feedback(target, draft_logprobs, drafted) * rejected
            per_token = per_token + negative_feedback_coef * feedback
        else:
            feedback = torch.zeros_like(per_token_divergence)
        loss = loss + (per_token * weights).sum() / weight_totals[j].clamp_min(1e-6)
        with torch.no_grad():
            per_token_stats = {
                "divergence": per_token_divergence,
                "tv": total_variation(target, draft_logprobs),
                "greedy_acceptance": target_probability(target, drafted),
                "greedy_acceptance_ceiling": target.probs.max(-1).values,
                "negative_feedback": feedback,
            }
            by_step.append(DraftStepStats({name: float((value * mask).sum()) for name, value in per_token_stats.items()},
                                          float(mask.sum())))
    return loss, by_step


def mean_over_steps(by_step: list[DraftStepStats]) -> dict[str, float]:
    """The statistics averaged over draft steps (each step's own mean first)."""
    means = [step.means() for step in by_step]
    return {name: sum(m[name] for m in means) / len(means) for name in STATISTICS}


def kd_loss(
    drafter: Eagle3Drafter, batch: Minibatch, *, divergence: Divergence, negative_feedback_coef: float,
    num_draft_steps: int,
) -> tuple[torch.Tensor, dict[str, float]]:
    """:func:`kd_loss_by_step` of one batch with its statistics averaged over the draft steps."""
    loss, by_step = kd_loss_by_step(drafter, batch, divergence=divergence,
                                    negative_feedback_coef=negative_feedback_coef, num_draft_steps=num_draft_steps)
    return loss, mean_over_steps(by_step)


@torch.no_grad()
def held_out_stats(drafter: Eagle3Drafter, batch: Minibatch, num_draft_steps: int) -> list[DraftStepStats]:
    """The per-step statistics of :func:`kd_loss_by_step` with TV as divergence and no negative feedback: the learner
    compares candidates by ``greedy_acceptance``, since vLLM drafts the argmax and verifies it as one-hot by
    default. Sums, so a caller can add them over ranks before averaging (:func:`mean_over_steps`)."""
    _, by_step = kd_loss_by_step(drafter, batch, divergence="tv", negative_feedback_coef=0.0,
                                 num_draft_steps=num_draft_steps)
    return by_step


def held_out_scores(drafter: Eagle3Drafter, batch: Minibatch, num_draft_steps: int) -> dict[str, float]:
    """:func:`held_out_stats` of one batch, averaged over draft steps."""
    return mean_over_steps(held_out_stats(drafter, batch, num_draft_steps))

"""Knowledge distillation of an EAGLE-3 drafter from its actor: the target features, the forward-KL loss over an
unrolled draft (training-time test, as vLLM feeds the drafter's own hidden state back) and the offline warm-up
loop the lab runs. The online learner reuses ``actor_features`` and ``distillation_loss`` with reward weights.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from respec_plugin.core.config import ReSpecConfigError
from respec_plugin.core.drafter.eagle3 import Eagle3Drafter

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TargetFeatures:
    """What the drafter learns from, for right-padded sequences [B, T]: the actor's residual streams entering the
    aux layers, concatenated [B, T, num_aux * H], and its next-token log-probs over the draft vocabulary
    (renormalised there: the drafter cannot propose other tokens) [B, T, draft_vocab]."""

    aux_hidden_states: torch.Tensor
    draft_logprobs: torch.Tensor


@dataclass(frozen=True)
class DistillSpec:
    """Offline warm-up: AdamW steps over minibatches of precomputed features, unrolling ``num_draft_steps``."""

    steps: int
    batch_size: int
    learning_rate: float
    num_draft_steps: int
    seed: int


@torch.no_grad()
def actor_features(
    actor, input_ids: torch.Tensor, attention_mask: torch.Tensor, drafter: Eagle3Drafter
) -> TargetFeatures:
    """One no-grad actor forward; HF ``hidden_states[i]`` is vLLM's aux stream i (the residual entering layer i)."""
    out = actor(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    aux = torch.cat([out.hidden_states[i] for i in drafter.config.eagle_aux_hidden_state_layer_ids], dim=-1)
    logits = out.logits[..., drafter.draft_token_ids].float()
    return TargetFeatures(aux_hidden_states=aux.float(), draft_logprobs=logits.log_softmax(-1))


def _shift_left(x: torch.Tensor, by: int) -> torch.Tensor:
    """x[:, t + by] at t, zero-filled past the end."""
    return torch.cat([x[:, by:], torch.zeros_like(x[:, :by])], dim=1)


def distillation_loss(
    drafter: Eagle3Drafter,
    input_ids: torch.Tensor,
    features: TargetFeatures,
    token_weights: torch.Tensor,
    num_draft_steps: int,
) -> tuple[torch.Tensor, list[dict[str, float]]]:
    """Weighted forward KL(actor || drafter) summed over draft steps, and per-step metrics.

    Step j at anchor t predicts token t + j + 2, whose actor distribution is the actor's output at t + j + 1;
    ``token_weights`` [B, T] weighs each predicted token (0/1 response masks in the lab, reward weights in the
    learner). Steps j >= 1 read the true token x_{t+j+1} and the drafter's own previous hidden state: acceptance
    of step j only matters when steps < j were accepted, i.e. equalled the true tokens.
    Metrics per step, i.e. the acceptance rate of draft position j + 1 given the earlier ones were accepted:
    ``acceptance_greedy_draft`` = E[p(argmax q)], vLLM's default (``draft_sample_method="greedy"``: drafts are
    argmax, verified as one-hot) against a target sampling at temperature 1; ``acceptance_sampled_draft`` =
    E[1 - TV(p, q)], vLLM's ``draft_sample_method="probabilistic"``; ``greedy_agreement``, a greedy target;
    ``kl``. (p is renormalised over the draft vocabulary, so these slightly overestimate when it misses mass.)
    """
    predicted = token_weights.float().sum(0).nonzero()
    if predicted.numel() == 0:
        raise ReSpecConfigError("token_weights are all zero: there is no drafted token to learn from.")
    first_anchor = max(0, int(predicted[0]) - 2)
    teacher_ids = [_shift_left(input_ids, j + 1) for j in range(1, num_draft_steps)]
    steps = drafter.unroll(input_ids, features.aux_hidden_states, num_draft_steps, step_input_ids=teacher_ids,
                           first_anchor=first_anchor)
    loss = input_ids.new_zeros((), dtype=torch.float32)
    metrics = []
    for j, logits in enumerate(steps.logits):
        target = _shift_left(features.draft_logprobs, j + 1)[:, first_anchor:]
        weights = _shift_left(token_weights.float(), j + 2)[:, first_anchor:]
        total = weights.sum().clamp(min=1e-6)
        draft_logprobs = logits.float().log_softmax(-1)
        kl = (target.exp() * (target - draft_logprobs)).sum(-1)
        loss = loss + (kl * weights).sum() / total
        with torch.no_grad():
            draft = logits.argmax(-1, keepdim=True)
            per_token = {
                "kl": kl,
                "acceptance_greedy_draft": target.gather(-1, draft).squeeze(-1).exp(),
                "acceptance_sampled_draft": torch.minimum(target.exp(), draft_logprobs.exp()).sum(-1),
                "greedy_agreement": (target.argmax(-1, keepdim=True) == draft).squeeze(-1).float(),
            }
            metrics.append({name: float((value * weights).sum() / total) for name, value in per_token.items()})
    return loss, metrics


def warmup_cosine_schedule(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over the first 5% of ``steps``, then cosine decay to 0: the short offline trainings of the
    lab (actor supervision, drafter warm-up) use the same schedule."""
    warmup = max(1, steps // 20)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps)),
    )


def distill(
    drafter: Eagle3Drafter,
    input_ids: torch.Tensor,
    features: TargetFeatures,
    token_weights: torch.Tensor,
    spec: DistillSpec,
) -> list[float]:
    """Trains the drafter (not the actor) on precomputed features of N sequences; returns every step's loss."""
    generator = torch.Generator().manual_seed(spec.seed)
    optimizer = torch.optim.AdamW(drafter.parameters(), lr=spec.learning_rate, weight_decay=0.0, betas=(0.9, 0.95))
    schedule = warmup_cosine_schedule(optimizer, spec.steps)
    drafter.train()
    losses = []
    start = time.perf_counter()
    for step in range(spec.steps):
        rows = torch.randint(input_ids.shape[0], (spec.batch_size,), generator=generator)
        length = int(token_weights[rows].nonzero()[:, 1].max()) + 1  # trailing columns are padding in every row
        batch_features = TargetFeatures(features.aux_hidden_states[rows, :length],
                                        features.draft_logprobs[rows, :length])
        loss, metrics = distillation_loss(drafter, input_ids[rows, :length], batch_features,
                                          token_weights[rows, :length], spec.num_draft_steps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(drafter.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == spec.steps - 1:
            logger.info("drafter step %d/%d loss %.3f greedy agreement per draft step %s (%.0fs)", step + 1,
                        spec.steps, losses[-1], [round(m["greedy_agreement"], 2) for m in metrics],
                        time.perf_counter() - start)
    drafter.eval()
    return losses


def precompute_features(
    actor, drafter: Eagle3Drafter, input_ids: torch.Tensor, attention_mask: torch.Tensor, batch_size: int
) -> TargetFeatures:
    """Actor features for many right-padded sequences, in chunks (the actor is frozen during the warm-up)."""
    chunks = [actor_features(actor, input_ids[i : i + batch_size], attention_mask[i : i + batch_size], drafter)
              for i in range(0, input_ids.shape[0], batch_size)]
    return TargetFeatures(torch.cat([c.aux_hidden_states for c in chunks]), torch.cat([c.draft_logprobs for c in chunks]))


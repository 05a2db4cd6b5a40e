"""The offline warm-up of an EAGLE-3 drafter on its actor's outputs (the lab runs it before RL), and the actor's
target features that both the warm-up and the online learner learn from. The loss is the online learner's KD
objective with the full draft-vocabulary distribution as target, so both report the same per-step quantities.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from respec_plugin.core.drafter.eagle3 import Eagle3Drafter
from respec_plugin.core.learner.buffer import Minibatch
from respec_plugin.core.learner.losses import topk_target
from respec_plugin.core.learner.objective import DraftStepStats, kd_loss_by_step

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TargetFeatures:
    """What the drafter learns from, for right-padded sequences [B, T]: the actor's embeddings of the tokens
    [B, T, H], its residual streams entering the aux layers, concatenated [B, T, num_aux * H], and its next-token
    log-probs over the draft vocabulary (renormalised there: the drafter cannot propose other tokens)
    [B, T, draft_vocab]."""

    input_embeds: torch.Tensor
    aux_hidden_states: torch.Tensor
    draft_logprobs: torch.Tensor

    def rows(self, rows: torch.Tensor, length: int) -> "TargetFeatures":
        """The features of ``rows``, cut to their first ``length`` positions."""
        return TargetFeatures(self.input_embeds[rows, :length], self.aux_hidden_states[rows, :length],
                              self.draft_logprobs[rows, :length])


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
    """One no-grad actor forward; HF ``hidden_states[i]`` is vLLM's aux stream i (the residual entering layer i), and
    ``hidden_states[0]`` the embedding output."""
    out = actor(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    aux = torch.cat([out.hidden_states[i] for i in drafter.config.eagle_aux_hidden_state_layer_ids], dim=-1)
    logits = out.logits[..., drafter.draft_token_ids].float()
    return TargetFeatures(input_embeds=out.hidden_states[0].float(), aux_hidden_states=aux.float(),
                          draft_logprobs=logits.log_softmax(-1))


def precompute_features(
    actor, drafter: Eagle3Drafter, input_ids: torch.Tensor, attention_mask: torch.Tensor, batch_size: int
) -> TargetFeatures:
    """Actor features for many right-padded sequences, in chunks (the actor is frozen during the warm-up)."""
    chunks = [actor_features(actor, input_ids[i : i + batch_size], attention_mask[i : i + batch_size], drafter)
              for i in range(0, input_ids.shape[0], batch_size)]
    return TargetFeatures(*(torch.cat([getattr(c, name) for c in chunks])
                            for name in ("input_embeds", "aux_hidden_states", "draft_logprobs")))


def warmup_loss(
    drafter: Eagle3Drafter, input_ids: torch.Tensor, features: TargetFeatures, response_mask: torch.Tensor,
    num_draft_steps: int,
) -> tuple[torch.Tensor, list[DraftStepStats]]:
    """The warm-up's objective on sequences [B, T]: :func:`kd_loss_by_step` (loss, and its statistics per draft
    step) with forward KL to the whole draft-vocabulary distribution (a top-k target with k = draft vocab), the
    response mask as both loss mask and token weights (no rewards offline) and no negative feedback (no verifier)."""
    mask = response_mask.float()
    batch = Minibatch(input_ids=input_ids, input_embeds=features.input_embeds,
                      aux_hidden_states=features.aux_hidden_states, target=topk_target(features.draft_logprobs, features.draft_logprobs.shape[-1]),
                      loss_mask=mask, token_weights=mask)
    return kd_loss_by_step(drafter, batch, divergence="forward_kl", negative_feedback_coef=0.0,
                           num_draft_steps=num_draft_steps)


def warmup_cosine_schedule(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over the first 5% of ``steps``, then cosine decay to 0: the short offline trainings of the
    lab (actor supervision, drafter warm-up) use the same schedule."""
    warmup = max(1, steps // 20)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps)),
    )


def train_offline(
    model: torch.nn.Module, batch_loss: Callable[[torch.Generator], torch.Tensor], *, steps: int,
    learning_rate: float, weight_decay: float, seed: int, name: str,
) -> list[float]:
    """The lab's short offline trainings (actor supervision, drafter warm-up): ``steps`` AdamW steps on
    ``batch_loss(generator)``, whose seeded generator draws the minibatches, with :func:`warmup_cosine_schedule` and
    the gradient norm clipped to 1. Trains ``model``'s parameters only; returns every step's loss."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay, betas=(0.9, 0.95))
    schedule = warmup_cosine_schedule(optimizer, steps)
    model.train()
    losses = []
    start = time.perf_counter()
    for step in range(steps):
        loss = batch_loss(generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            logger.info("%s step %d/%d loss %.3f (%.0fs)", name, step + 1, steps, losses[-1],
                        time.perf_counter() - start)
    model.eval()
    return losses


def distill(
    drafter: Eagle3Drafter,
    input_ids: torch.Tensor,
    features: TargetFeatures,
    response_mask: torch.Tensor,
    spec: DistillSpec,
) -> list[float]:
    """Trains the drafter (not the actor) on precomputed features of N sequences, learning the tokens where
    ``response_mask`` [N, T] is set; returns every step's loss."""

    def batch_loss(generator: torch.Generator) -> torch.Tensor:
        rows = torch.randint(input_ids.shape[0], (spec.batch_size,), generator=generator)
        length = int(response_mask[rows].nonzero()[:, 1].max()) + 1  # trailing columns are padding in every row
        loss, _ = warmup_loss(drafter, input_ids[rows, :length], features.rows(rows, length),
                              response_mask[rows, :length], spec.num_draft_steps)
        return loss

    return train_offline(drafter, batch_loss, steps=spec.steps, learning_rate=spec.learning_rate, weight_decay=0.0,
                         seed=spec.seed, name="drafter")

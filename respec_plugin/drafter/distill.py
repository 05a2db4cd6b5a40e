"""Offline distillation of an EAGLE-3 head from its actor: the lab's warm-up so that acceptance is meaningful.

Loss: forward KL(p_actor || q_drafter) per drafted position (KL bounds total variation, and 1 - TV is the
acceptance probability). The online, reward-weighted learner builds on the same forward (``actor_features``,
``Eagle3Drafter.forward``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from respec_plugin.drafter.eagle3 import Eagle3Drafter, actor_features

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistillSpec:
    steps: int
    batch_size: int
    learning_rate: float
    seed: int


def drafter_kl(
    drafter: Eagle3Drafter, actor, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor
) -> torch.Tensor:
    """Mean KL(actor || drafter) over positions whose *predicted* token (two ahead) is under ``loss_mask``.

    At position t the head sees the actor's features at t and the embedding of token t+1 and predicts token
    t+2, whose actor distribution is the actor's output at position t+1.
    """
    aux, actor_logprobs = actor_features(actor, input_ids, attention_mask, drafter.config.aux_layer_ids)
    embeds = actor.model.embed_tokens(input_ids[:, 1:]).detach()
    positions = torch.arange(input_ids.shape[1] - 1).expand(input_ids.shape[0], -1)
    logits, _ = drafter(embeds, aux[:, :-1], positions)
    target = actor_logprobs[:, 1:]
    kl = (target.exp() * (target - logits.float().log_softmax(-1))).sum(-1)
    mask = loss_mask[:, 2:].float()
    mask = torch.cat([mask, torch.zeros_like(mask[:, :1])], dim=1)  # position T-2 predicts token T, beyond the text
    return (kl * mask).sum() / mask.sum().clamp(min=1)


def distill(
    drafter: Eagle3Drafter,
    actor,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    spec: DistillSpec,
) -> list[float]:
    """AdamW on the head only (the actor is frozen); ``batches``: (input_ids, attention_mask, loss_mask)."""
    generator = torch.Generator().manual_seed(spec.seed)
    optimizer = torch.optim.AdamW(drafter.parameters(), lr=spec.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, spec.steps) / spec.steps))
    )
    drafter.train()
    losses, start = [], time.perf_counter()
    for step in range(spec.steps):
        input_ids, attention_mask, loss_mask = batches[torch.randint(len(batches), (1,), generator=generator).item()]
        loss = drafter_kl(drafter, actor, input_ids, attention_mask, loss_mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(drafter.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == spec.steps - 1:
            logger.info("drafter step %d/%d KL %.3f (%.0fs)", step + 1, spec.steps, losses[-1], time.perf_counter() - start)
    drafter.eval()
    return losses

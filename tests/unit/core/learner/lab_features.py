"""The learner's input built from the tiny lab's HF actor, as the actor ranks capture it in verl's forward: per
trajectory its tokens, response mask, the actor's embeddings, aux hidden states and top-k targets, its weight, and
whether it is held out (whole prompt groups, as the driver selects them)."""

import random

import torch

from respec_plugin.core.drafter.eagle3 import Eagle3Drafter
from respec_plugin.core.drafter.warmup import actor_features
from respec_plugin.core.learner.buffer import SequenceFeatures
from respec_plugin.core.learner.losses import topk_target
from respec_plugin.core.learner.selection import HELD_OUT, NOT_SELECTED, select_rows


def step_features(actor, drafter: Eagle3Drafter, prompts: list[list[int]], responses: list[list[int]],
                  weights: list[float], *, top_k: int = 32, holdout_fraction: float = 0.125,
                  groups: list[str] | None = None) -> list[SequenceFeatures]:
    """Every trajectory's features (one prompt group per trajectory unless ``groups`` says otherwise)."""
    rows = [p + r for p, r in zip(prompts, responses)]
    groups = groups or [str(i) for i in range(len(rows))]
    choice = select_rows(groups, [len(r) for r in rows], [False] * len(rows), max_tokens=10**9,
                         holdout_fraction=holdout_fraction, rng=random.Random(0))
    length = max(len(r) for r in rows)
    input_ids = torch.zeros(len(rows), length, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, row in enumerate(rows):
        input_ids[i, :len(row)], attention_mask[i, :len(row)] = torch.tensor(row), 1
    features = actor_features(actor, input_ids, attention_mask, drafter)
    target = topk_target(features.draft_logprobs, top_k)
    sequences = []
    for i, (prompt, row) in enumerate(zip(prompts, rows)):
        n = len(row)
        loss_mask = torch.zeros(n)
        loss_mask[len(prompt):] = 1.0
        assert choice[i] != NOT_SELECTED
        sequences.append(SequenceFeatures(
            token_ids=input_ids[i, :n].clone(), loss_mask=loss_mask, input_embeds=features.input_embeds[i, :n].clone(),
            aux_hidden_states=features.aux_hidden_states[i, :n].clone(), target_probs=target.probs[i, :n].clone(),
            target_ids=target.ids[i, :n].clone(), weight=weights[i], row=i, held_out=choice[i] == HELD_OUT))
    return sequences

"""The lab's two EAGLE-3 drafters for an actor, built the same way for every preset: a day-0 drafter (the draft
vocabulary taken from the actor's own sampled responses, the actor's LM-head rows, the rest freshly initialised)
and the same head warmed up offline on those responses (EAGLE's self-distillation), each measured on held-out
responses of the actor.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from respec_plugin.core.drafter.day0 import config_for_actor
from respec_plugin.core.drafter.eagle3 import Eagle3Drafter, draft_vocab_from_counts, init_from_actor
from respec_plugin.core.drafter.io import save_drafter
from respec_plugin.core.drafter.warmup import (
    DistillSpec,
    TargetFeatures,
    distill,
    precompute_features,
    warmup_loss,
)
from respec_lab.models import PaddedBatch


class WindowedFeatures(NamedTuple):
    """The actor's features of right-padded sequences, with the sequences' ids and response mask."""

    input_ids: torch.Tensor
    features: TargetFeatures
    response_mask: torch.Tensor


@dataclass(frozen=True)
class DrafterSpec:
    """The EAGLE-3 drafter of the lab and its offline warm-up on the actor's own sampled outputs; empty
    ``eagle_aux_hidden_state_layer_ids`` takes vLLM's default for the actor's depth."""

    draft_vocab_size: int
    eagle_aux_hidden_state_layer_ids: tuple[int, ...]
    num_warmup_sequences: int
    distill: DistillSpec


@dataclass(frozen=True)
class BuiltDrafters:
    """What building the drafters measured, and the warmed-up head (for its sizes)."""

    drafter: Eagle3Drafter
    metrics: dict


def build_drafters(actor, warmup: PaddedBatch, held_out: PaddedBatch, spec: DrafterSpec, day0_dir: Path,
                   warmed_dir: Path, seed: int, feature_batch_size: int = 64,
                   context_tokens: int | None = None) -> BuiltDrafters:
    """Saves the day-0 drafter (version 0) to ``day0_dir`` and the warmed-up one (version 1) to ``warmed_dir``;
    ``feature_batch_size`` sequences go through the actor at once when its features are computed. With
    ``context_tokens``, the drafter trains and is measured on windows of each sequence: that many prompt tokens
    before the response, then the response (see :func:`windowed_features`)."""
    counts = torch.bincount(warmup.input_ids[warmup.response_mask], minlength=actor.config.vocab_size)
    config = config_for_actor(actor.config.to_dict(), spec.draft_vocab_size,
                              spec.eagle_aux_hidden_state_layer_ids or None)
    draft_token_ids = draft_vocab_from_counts(counts, config.draft_vocab_size)
    drafter = init_from_actor(config, actor.get_output_embeddings().weight, draft_token_ids, seed)
    save_drafter(drafter, day0_dir, drafter_version=0)
    held_out_ids, held_out_features, held_out_mask = windowed_features(actor, drafter, held_out, feature_batch_size,
                                                                       context_tokens)
    day0_acceptance = offline_acceptance(drafter, held_out_ids, held_out_features, held_out_mask,
                                         spec.distill.num_draft_steps)

    input_ids, features, response_mask = windowed_features(actor, drafter, warmup, feature_batch_size, context_tokens)
    losses = distill(drafter, input_ids, features, response_mask, spec.distill)
    del features
    save_drafter(drafter, warmed_dir, drafter_version=1)
    warmed_acceptance = offline_acceptance(drafter, held_out_ids, held_out_features, held_out_mask,
                                           spec.distill.num_draft_steps)
    held_out_counts = torch.bincount(held_out.input_ids[held_out.response_mask], minlength=actor.config.vocab_size)
    return BuiltDrafters(drafter, {
        "drafter_final_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4),
        "offline_acceptance_day0": day0_acceptance,
        "offline_acceptance_warmed": warmed_acceptance,
        # Held-out response tokens the drafter can propose at all (the rest are never accepted).
        "draft_vocab_coverage": round(float(held_out_counts[draft_token_ids].sum() / held_out_counts.sum()), 4),
    })


@torch.no_grad()
def windowed_features(actor, drafter: Eagle3Drafter, rollouts: PaddedBatch, batch_size: int,
                      context_tokens: int | None) -> WindowedFeatures:
    """The actor's features of ``rollouts``: of whole sequences without ``context_tokens``. With it, each row keeps
    only its response and the ``context_tokens`` prompt tokens before it, re-padded on the right: the features still
    come from the actor's forward over the whole prompt, but a long few-shot prompt no longer multiplies the
    drafter's training cost and the features held in memory."""
    input_ids, attention_mask, response_mask = rollouts
    if context_tokens is None:
        return WindowedFeatures(input_ids, precompute_features(actor, drafter, input_ids, attention_mask, batch_size),
                                response_mask)
    windows, chunks = [], []
    for first in range(0, input_ids.shape[0], batch_size):
        rows = slice(first, first + batch_size)
        chunk = precompute_features(actor, drafter, input_ids[rows], attention_mask[rows], batch_size)
        for row in range(chunk.input_embeds.shape[0]):
            positions = response_mask[rows][row].nonzero()[:, 0]
            start, end = max(0, int(positions[0]) - context_tokens), int(positions[-1]) + 1
            windows.append((input_ids[rows][row, start:end], response_mask[rows][row, start:end]))
            chunks.append(TargetFeatures(chunk.input_embeds[row, start:end], chunk.aux_hidden_states[row, start:end],
                                         chunk.draft_logprobs[row, start:end]))
    padded = {name: torch.nn.utils.rnn.pad_sequence([getattr(c, name) for c in chunks], batch_first=True)
              for name in ("input_embeds", "aux_hidden_states", "draft_logprobs")}
    return WindowedFeatures(torch.nn.utils.rnn.pad_sequence([ids for ids, _ in windows], batch_first=True),
                            TargetFeatures(**padded),
                            torch.nn.utils.rnn.pad_sequence([mask for _, mask in windows], batch_first=True))


@torch.no_grad()
def offline_acceptance(drafter: Eagle3Drafter, input_ids: torch.Tensor, features: TargetFeatures,
                       response_mask: torch.Tensor, num_draft_steps: int) -> list[dict[str, float]]:
    """Per draft step, on held-out rollouts of the actor (sampled at temperature 1): the warm-up objective's
    statistics, i.e. the forward KL (``divergence``), ``tv`` (1 - acceptance of a draft sampled from the drafter),
    ``greedy_acceptance`` (of the greedy draft vLLM proposes) and its ceiling."""
    _, by_step = warmup_loss(drafter, input_ids, features, response_mask, num_draft_steps)
    return [{name: round(value, 4) for name, value in step.means().items()} for step in by_step]

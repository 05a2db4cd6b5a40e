"""The learner's replay buffer: the target features of the last few RL steps' trajectories, and minibatches of them.

ReSpec trains from a replay buffer every step (I = 1); a short window keeps the drafter on the current actor while
smoothing over one step's few rollouts. Features are kept per sequence, unpadded, with top-k targets (bounded memory).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from respec_plugin.core.learner.losses import TopKTarget


@dataclass(frozen=True)
class SequenceFeatures:
    """One trajectory's learning material, length L: token ids, loss mask (1 at response tokens), the actor's aux
    hidden states [L, num_aux * H], its top-k next-token targets [L, k] and the trajectory weight."""

    token_ids: torch.Tensor
    loss_mask: torch.Tensor
    aux_hidden_states: torch.Tensor
    target_probs: torch.Tensor
    target_ids: torch.Tensor
    weight: float

    def prompt_key(self) -> tuple[int, ...]:
        """The prompt's token ids (the tokens before the first response token): GRPO's group of this sequence."""
        response = self.loss_mask.nonzero()
        end = int(response[0]) if response.numel() else self.token_ids.numel()
        return tuple(self.token_ids[:end].tolist())


@dataclass(frozen=True)
class Minibatch:
    """Right-padded sequences [B, T]: ``token_weights`` = loss mask x trajectory weight, ``loss_mask`` unweighted."""

    input_ids: torch.Tensor
    aux_hidden_states: torch.Tensor
    target: TopKTarget
    loss_mask: torch.Tensor
    token_weights: torch.Tensor


def collate(sequences: list[SequenceFeatures]) -> Minibatch:
    length = max(s.token_ids.numel() for s in sequences)

    def pad(tensors: list[torch.Tensor]) -> torch.Tensor:
        out = tensors[0].new_zeros((len(tensors), length, *tensors[0].shape[1:]))
        for i, tensor in enumerate(tensors):
            out[i, : tensor.shape[0]] = tensor
        return out

    loss_mask = pad([s.loss_mask for s in sequences])
    weights = torch.tensor([s.weight for s in sequences])[:, None]
    return Minibatch(
        input_ids=pad([s.token_ids for s in sequences]),
        aux_hidden_states=pad([s.aux_hidden_states for s in sequences]),
        target=TopKTarget(pad([s.target_probs for s in sequences]), pad([s.target_ids for s in sequences])),
        loss_mask=loss_mask,
        token_weights=loss_mask * weights,
    )


def split_held_out(sequences: list[SequenceFeatures], fraction: float
                   ) -> tuple[list[SequenceFeatures], list[SequenceFeatures]]:
    """(held out, training): every ``round(1 / fraction)``-th prompt group, at least one, is held out whole.

    GRPO samples n responses per prompt; a held-out response whose prompt is trained on rewards memorising the
    step's prompts, which the next rollout does not repeat. A step with a single prompt is split per sequence.
    """
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, sequence in enumerate(sequences):
        groups.setdefault(sequence.prompt_key(), []).append(i)
    stride = max(2, round(1 / fraction))
    if len(groups) > 1:
        held = {i for g, members in enumerate(groups.values()) if g % stride == 0 for i in members}
    else:
        held = set(range(0, len(sequences), stride))
    return [sequences[i] for i in sorted(held)], [s for i, s in enumerate(sequences) if i not in held]


class ReplayBuffer:
    """The sequences of the last ``replay_steps`` RL steps."""

    def __init__(self, replay_steps: int):
        self.steps: deque[list[SequenceFeatures]] = deque(maxlen=replay_steps)

    def add_step(self, sequences: list[SequenceFeatures]) -> None:
        self.steps.append(list(sequences))

    def refresh(self, recompute: Callable[[list[SequenceFeatures]], list[SequenceFeatures]]) -> None:
        """Replace every stored sequence by ``recompute``'s version of it (one call over the whole window)."""
        refreshed = iter(recompute(self.sequences))
        self.steps = deque(([next(refreshed) for _ in step] for step in self.steps), maxlen=self.steps.maxlen)

    @property
    def sequences(self) -> list[SequenceFeatures]:
        return [s for step in self.steps for s in step]

    def sample(self, batch_size: int, generator: torch.Generator) -> Minibatch:
        sequences = self.sequences
        rows = torch.randperm(len(sequences), generator=generator)[:batch_size]
        return collate([sequences[int(i)] for i in rows])

    def summary(self) -> dict[str, float]:
        sequences = self.sequences
        return {
            "steps": len(self.steps),
            "sequences": len(sequences),
            "tokens": int(sum(float(s.loss_mask.sum()) for s in sequences)),
            "weight_mean": sum(s.weight for s in sequences) / len(sequences) if sequences else 0.0,
        }

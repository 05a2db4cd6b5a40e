"""The learner's replay buffer: the target features of the last few RL steps' trajectories, and minibatches of them.

ReSpec trains from a replay buffer every step (I = 1); a short window keeps the drafter on the current actor while
smoothing over one step's few rollouts. Features are kept per sequence, unpadded, with top-k targets (bounded memory).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from respec_plugin.core.learner.losses import TopKTarget


@dataclass(frozen=True)
class SequenceFeatures:
    """One trajectory's learning material, length L: token ids, loss mask (1 at response tokens), the actor's
    embeddings of the tokens [L, H] and aux hidden states [L, num_aux * H], its top-k next-token targets [L, k], the
    trajectory weight, its row in the RL step, and whether it is held out (checked on, trained on a step later)."""

    token_ids: torch.Tensor
    loss_mask: torch.Tensor
    input_embeds: torch.Tensor
    aux_hidden_states: torch.Tensor
    target_probs: torch.Tensor
    target_ids: torch.Tensor
    weight: float = 1.0
    row: int = 0
    held_out: bool = False

    @property
    def num_tokens(self) -> int:
        return self.token_ids.numel()


def response_window(loss_mask: torch.Tensor, context_tokens: int) -> slice:
    """The positions of a sequence the learner keeps: from ``context_tokens`` tokens before its response to its end.

    The drafter's loss is on response tokens only, yet it attends over everything it is given: a long prompt (a
    few-shot preamble, a long instruction) would multiply its training time and the features held in host memory
    for no more loss terms. Its first draft step needs the two positions before the first response token."""
    response = loss_mask.nonzero()
    if response.numel() == 0:
        return slice(0, 0)
    return slice(max(0, int(response[0, 0]) - context_tokens), loss_mask.numel())


@dataclass(frozen=True)
class Minibatch:
    """Right-padded sequences [B, T]: ``token_weights`` = loss mask x trajectory weight, ``loss_mask`` unweighted."""

    input_ids: torch.Tensor
    input_embeds: torch.Tensor
    aux_hidden_states: torch.Tensor
    target: TopKTarget
    loss_mask: torch.Tensor
    token_weights: torch.Tensor

    @property
    def num_sequences(self) -> int:
        return self.input_ids.shape[0]


# Minibatch lengths are rounded up to a multiple of this: a few distinct shapes instead of one per longest sequence,
# since CPU matmul libraries (oneDNN) keep compiled kernels per shape, and GPU ones autotune per shape.
PAD_TO_MULTIPLE = 32
# A length group this small (padded tokens) is never split: its matmuls cost their fixed overhead more than their size.
MIN_GROUP_TOKENS = 4096


def length_groups(sequences: list[SequenceFeatures], max_padding: float = 0.25) -> list[list[SequenceFeatures]]:
    """``sequences`` sorted by length and cut into groups that each pad to their longest with at most ``max_padding``
    padded tokens per real token, or hold at most MIN_GROUP_TOKENS padded tokens.

    RL responses are long-tailed: one response at the length limit would pad every other sequence of a minibatch to
    it, multiplying the drafter's training compute; one optimizer step accumulates the groups' gradients instead."""
    groups: list[list[SequenceFeatures]] = []
    tokens = 0
    for sequence in sorted(sequences, key=lambda s: s.num_tokens):
        padded = (len(groups[-1]) + 1) * sequence.num_tokens if groups else 0
        if groups and padded <= max((1 + max_padding) * (tokens + sequence.num_tokens), MIN_GROUP_TOKENS):
            groups[-1].append(sequence)
            tokens += sequence.num_tokens
        else:
            groups.append([sequence])
            tokens = sequence.num_tokens
    return groups


def collate(sequences: list[SequenceFeatures], device: torch.device | str = "cpu") -> Minibatch:
    """Right-pad ``sequences`` into one minibatch on ``device``, to a length that is a multiple of PAD_TO_MULTIPLE."""
    longest = max(s.token_ids.numel() for s in sequences)
    length = -(-longest // PAD_TO_MULTIPLE) * PAD_TO_MULTIPLE

    def pad(tensors: list[torch.Tensor]) -> torch.Tensor:
        out = tensors[0].new_zeros((len(tensors), length, *tensors[0].shape[1:]), device=device)
        for i, tensor in enumerate(tensors):
            out[i, : tensor.shape[0]] = tensor
        return out

    loss_mask = pad([s.loss_mask.float() for s in sequences])
    weights = torch.tensor([s.weight for s in sequences], device=device)[:, None]
    return Minibatch(
        input_ids=pad([s.token_ids for s in sequences]),
        input_embeds=pad([s.input_embeds for s in sequences]),
        aux_hidden_states=pad([s.aux_hidden_states for s in sequences]),
        target=TopKTarget(pad([s.target_probs for s in sequences]), pad([s.target_ids for s in sequences])),
        loss_mask=loss_mask,
        token_weights=loss_mask * weights,
    )


class ReplayBuffer:
    """The sequences of the last ``replay_steps`` RL steps."""

    def __init__(self, replay_steps: int):
        self.steps: deque[list[SequenceFeatures]] = deque(maxlen=replay_steps)

    def add_step(self, sequences: list[SequenceFeatures]) -> None:
        self.steps.append(list(sequences))

    @property
    def sequences(self) -> list[SequenceFeatures]:
        return [s for step in self.steps for s in step]

    def sample(self, batch_size: int, generator: torch.Generator) -> list[SequenceFeatures]:
        """Up to ``batch_size`` distinct sequences at random (all of them when fewer are stored)."""
        sequences = self.sequences
        rows = torch.randperm(len(sequences), generator=generator)[:batch_size]
        return [sequences[int(i)] for i in rows]

    def summary(self) -> dict[str, float]:
        sequences = self.sequences
        return {
            "steps": len(self.steps),
            "sequences": len(sequences),
            "tokens": int(sum(float(s.loss_mask.sum()) for s in sequences)),
            "weight_mean": sum(s.weight for s in sequences) / len(sequences) if sequences else 0.0,
        }

"""The learner's held-out split (whole GRPO prompt groups, so the safety check sees prompts it did not train on) and
the replay window's refresh."""

from dataclasses import replace

import torch

from respec_plugin.core.learner.buffer import ReplayBuffer, SequenceFeatures, split_held_out


def _sequence(prompt: list[int], response: list[int]) -> SequenceFeatures:
    ids = torch.tensor(prompt + response)
    loss_mask = torch.cat([torch.zeros(len(prompt)), torch.ones(len(response))])
    return SequenceFeatures(token_ids=ids, loss_mask=loss_mask, aux_hidden_states=torch.zeros(len(ids), 2),
                            target_probs=torch.zeros(len(ids), 1), target_ids=torch.zeros(len(ids), 1, dtype=torch.long),
                            weight=1.0)


def test_whole_prompt_groups_are_held_out():
    # 4 prompts x 4 responses, interleaved as a batch may order them; prompts share their first token.
    prompts = [[1, 2], [1, 3], [1, 2, 2], [4]]
    sequences = [_sequence(prompts[i % 4], [10 + i, 11]) for i in range(16)]
    held_out, training = split_held_out(sequences, fraction=0.125)
    assert len(held_out) == 4 and len(training) == 12  # one group of the four (at least one)
    assert {s.prompt_key() for s in held_out} == {(1, 2)}
    assert (1, 2) not in {s.prompt_key() for s in training}

    many = [_sequence([p], [p, p]) for p in range(32) for _ in range(2)]  # 32 prompts x 2
    held_out, training = split_held_out(many, fraction=0.125)
    assert sorted({s.prompt_key() for s in held_out}) == [(0,), (8,), (16,), (24,)]
    assert len(training) == 56


def test_a_single_prompt_is_split_per_sequence():
    sequences = [_sequence([7, 7], [i]) for i in range(8)]
    held_out, training = split_held_out(sequences, fraction=0.25)
    assert [int(s.token_ids[-1]) for s in held_out] == [0, 4]
    assert len(training) == 6


def test_refresh_recomputes_the_whole_window_in_one_call_and_keeps_its_steps():
    buffer = ReplayBuffer(replay_steps=2)
    for step in range(3):  # the first step falls out of the window
        buffer.add_step([_sequence([step], [step, i]) for i in range(step + 1)])
    calls = []

    def recompute(sequences):
        calls.append(len(sequences))
        return [replace(s, weight=s.weight + 1) for s in sequences]

    buffer.refresh(recompute)
    assert calls == [5]
    assert [[s.prompt_key() for s in step] for step in buffer.steps] == [[(1,)] * 2, [(2,)] * 3]
    assert all(s.weight == 2.0 for s in buffer.sequences)

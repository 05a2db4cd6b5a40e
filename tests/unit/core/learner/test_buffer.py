"""The learner's replay window (the last few steps' sequences) and its minibatches: right-padded, weighted by the
trajectory weight where the loss mask is set."""

import torch

from respec_plugin.core.learner.buffer import MIN_GROUP_TOKENS, PAD_TO_MULTIPLE, ReplayBuffer, SequenceFeatures, collate, length_groups, response_window

HIDDEN = 3


def _sequence(prompt: list[int], response: list[int], weight: float = 1.0) -> SequenceFeatures:
    ids = torch.tensor(prompt + response)
    n = len(ids)
    return SequenceFeatures(token_ids=ids, loss_mask=torch.cat([torch.zeros(len(prompt)), torch.ones(len(response))]),
                            input_embeds=torch.randn(n, HIDDEN), aux_hidden_states=torch.randn(n, 2 * HIDDEN),
                            target_probs=torch.ones(n, 1), target_ids=torch.zeros(n, 1, dtype=torch.long),
                            weight=weight)


def test_the_window_keeps_the_last_steps():
    buffer = ReplayBuffer(replay_steps=2)
    for step in range(3):  # the first step falls out of the window
        buffer.add_step([_sequence([step], [step, i]) for i in range(step + 1)])
    assert [[int(s.token_ids[0]) for s in step] for step in buffer.steps] == [[1, 1], [2, 2, 2]]
    assert buffer.summary() == {"steps": 2, "sequences": 5, "tokens": 10, "weight_mean": 1.0}


def test_sampling_draws_distinct_sequences_and_all_when_fewer():
    buffer = ReplayBuffer(replay_steps=1)
    buffer.add_step([_sequence([0], [i]) for i in range(6)])
    drawn = buffer.sample(4, torch.Generator().manual_seed(0))
    assert len({int(s.token_ids[1]) for s in drawn}) == 4
    assert len(buffer.sample(10, torch.Generator().manual_seed(0))) == 6


def test_collate_pads_right_and_weighs_the_loss_mask():
    short, long = _sequence([1], [2], weight=0.5), _sequence([1, 1], [2, 2, 2], weight=2.0)
    batch = collate([short, long])
    pad = [0] * (PAD_TO_MULTIPLE - 5)
    assert batch.input_ids.tolist() == [[1, 2, 0, 0, 0] + pad, [1, 1, 2, 2, 2] + pad]
    assert batch.token_weights.tolist() == [[0, 0.5, 0, 0, 0] + pad, [0, 0, 2, 2, 2] + pad]
    assert batch.loss_mask.tolist() == [[0, 1, 0, 0, 0] + pad, [0, 0, 1, 1, 1] + pad]
    assert torch.equal(batch.input_embeds[0, :2], short.input_embeds) and not batch.input_embeds[0, 2:].any()
    assert batch.aux_hidden_states.shape == (2, PAD_TO_MULTIPLE, 2 * HIDDEN) and batch.num_sequences == 2


def test_collate_gives_few_shapes_whatever_the_lengths():
    """Each new minibatch shape costs CPU kernel libraries a cached kernel (memory that grows with the run)."""
    lengths = range(10, 200)
    shapes = {collate([_sequence([1], [2] * n), _sequence([1], [2])]).input_ids.shape for n in lengths}
    assert len(shapes) == -(-200 // PAD_TO_MULTIPLE)


def test_response_window_keeps_the_response_and_its_context():
    mask = torch.tensor([0, 0, 0, 0, 1, 1, 0, 1, 0])
    assert response_window(mask, 2) == slice(2, 9)
    assert response_window(mask, 10) == slice(0, 9)
    assert response_window(torch.zeros(4), 2) == slice(0, 0)


def test_length_groups_bound_the_padding_of_long_tailed_lengths():
    scale = MIN_GROUP_TOKENS // 8  # lengths long enough that padding, not size, decides
    lengths = [n * scale for n in (5, 6, 7, 9, 12, 30, 31, 200)]
    sequences = [_sequence([1], [2] * (n - 1)) for n in lengths]
    groups = length_groups(sequences)
    assert sorted(s.num_tokens for g in groups for s in g) == lengths
    for group in groups:
        real = sum(s.num_tokens for s in group)
        assert len(group) == 1 or len(group) * max(s.num_tokens for s in group) <= 1.25 * real
    assert [s.num_tokens for s in groups[-1]] == [200 * scale]  # the long response pads nothing else


def test_short_sequences_stay_in_one_group():
    lengths = [5, 6, 7, 9, 12, 30, 31, 100]
    assert len(length_groups([_sequence([1], [2] * (n - 1)) for n in lengths])) == 1

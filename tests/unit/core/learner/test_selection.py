"""Which trajectories the learner keeps: whole prompt groups up to the token budget, a share held out whole."""

import random
from collections import Counter

from respec_plugin.core.learner.selection import HELD_OUT, NOT_SELECTED, TRAINING, select_rows


def _step(groups: int, n: int, length: int = 10):
    keys = [f"g{g}" for g in range(groups) for _ in range(n)]
    return keys, [length] * len(keys), [False] * len(keys)


def test_whole_groups_up_to_the_token_budget():
    groups, lengths, padding = _step(groups=8, n=4)
    choice = select_rows(groups, lengths, padding, max_tokens=120, holdout_fraction=0.25, rng=random.Random(0))
    taken = {g for g, c in zip(groups, choice) if c != NOT_SELECTED}
    assert len(taken) == 3  # 40 tokens a group: three fit 120
    for group in taken:
        assert len({c for g, c in zip(groups, choice) if g == group}) == 1  # a group is kept or held out whole
    assert sum(lengths[i] for i, c in enumerate(choice) if c != NOT_SELECTED) <= 120


def test_every_fourth_group_is_held_out_and_at_least_one():
    groups, lengths, padding = _step(groups=8, n=2)
    choice = select_rows(groups, lengths, padding, max_tokens=10**9, holdout_fraction=0.25, rng=random.Random(1))
    per_group = {g: c for g, c in zip(groups, choice)}
    assert Counter(per_group.values()) == {TRAINING: 6, HELD_OUT: 2}
    few = select_rows(*_step(groups=2, n=2), max_tokens=10**9, holdout_fraction=0.1, rng=random.Random(0))
    assert few.count(HELD_OUT) == 2 and few.count(TRAINING) == 2


def test_a_single_group_is_split_per_row_and_padding_is_never_kept():
    groups, lengths, padding = _step(groups=1, n=4)
    groups, lengths, padding = groups + ["pad"], lengths + [10], padding + [True]
    choice = select_rows(groups, lengths, padding, max_tokens=10**9, holdout_fraction=0.5, rng=random.Random(0))
    assert choice == [HELD_OUT, TRAINING, HELD_OUT, TRAINING, NOT_SELECTED]


def test_a_budget_below_one_group_still_keeps_one():
    groups, lengths, padding = _step(groups=3, n=4, length=100)
    choice = select_rows(groups, lengths, padding, max_tokens=1, holdout_fraction=0.5, rng=random.Random(0))
    assert len({g for g, c in zip(groups, choice) if c != NOT_SELECTED}) == 1

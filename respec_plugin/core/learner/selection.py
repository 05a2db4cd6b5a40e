"""Which of a step's trajectories the learner keeps: whole prompt groups, in random order, up to a token budget, a
share of the groups held out to check each candidate drafter on prompts it did not train on.

GRPO samples n responses per prompt; a held-out response whose prompt was trained on would reward memorising the
step's prompts, which the next rollout does not repeat, so groups are held out whole. The choice is made once, for
the whole step, so that every data-parallel rank agrees on it whatever rows it holds.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

NOT_SELECTED, TRAINING, HELD_OUT = 0, 1, 2


def select_rows(groups: Sequence[str], lengths: Sequence[int], padding: Sequence[bool], *, max_tokens: int,
                holdout_fraction: float, rng: random.Random) -> list[int]:
    """Per row: NOT_SELECTED, TRAINING or HELD_OUT.

    Groups are taken in random order while their tokens fit ``max_tokens`` (the first group always does, so a budget
    below one group still learns from one). Every ``round(1 / holdout_fraction)``-th taken group (at least every
    second) is held out, the first one included; with one group only, every such row is held out instead.
    """
    members: dict[str, list[int]] = {}
    for row, (group, pad) in enumerate(zip(groups, padding)):
        if not pad:
            members.setdefault(group, []).append(row)
    order = list(members)
    rng.shuffle(order)
    taken, tokens = [], 0
    for group in order:
        group_tokens = sum(lengths[row] for row in members[group])
        if taken and tokens + group_tokens > max_tokens:
            continue
        taken.append(group)
        tokens += group_tokens
    stride = max(2, round(1 / holdout_fraction))
    choice = [NOT_SELECTED] * len(groups)
    if len(taken) > 1:
        for index, group in enumerate(taken):
            for row in members[group]:
                choice[row] = HELD_OUT if index % stride == 0 else TRAINING
    elif taken:
        for index, row in enumerate(members[taken[0]]):
            choice[row] = HELD_OUT if index % stride == 0 else TRAINING
    return choice

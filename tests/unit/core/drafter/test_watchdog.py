"""The acceptance watchdog's verdicts over a sequence of rollouts."""

import pytest

from respec_plugin.core.config import ReSpecConfig, ReSpecConfigError, WatchdogConfig
from respec_plugin.core.drafter.watchdog import AcceptanceWatchdog, Action
from tests.unit.core.tuner.records import request


def _rollout(watchdog: AcceptanceWatchdog, accept_length: float, draft_steps: int = 100):
    """Feed one rollout of ``draft_steps`` verify steps with k = 3 whose acceptance length is ``accept_length``."""
    accepted = round((accept_length - 1.0) * draft_steps)
    per_pos = [min(draft_steps, max(0, accepted - draft_steps * i)) for i in range(3)]
    watchdog.observe(request([draft_steps] * 3, per_pos))
    return watchdog.judge()


def test_collapse_restores_then_turns_speculation_off():
    watchdog = AcceptanceWatchdog(WatchdogConfig())
    assert _rollout(watchdog, 2.4).action is Action.MARK_GOOD
    restore = _rollout(watchdog, 1.0)
    assert restore.action is Action.RESTORE and restore.reference == pytest.approx(2.4)
    assert _rollout(watchdog, 2.3).action is Action.MARK_GOOD  # the restore worked
    assert _rollout(watchdog, 1.02).action is Action.RESTORE
    assert _rollout(watchdog, 1.0).action is Action.SPECULATION_OFF  # collapsed again right after the restore
    assert watchdog.restores == 2 and watchdog.speculation_off
    assert _rollout(watchdog, 1.0).action is Action.NONE  # off stays off


def test_a_drafter_that_never_held_acceptance_is_left_alone():
    watchdog = AcceptanceWatchdog(WatchdogConfig())
    assert _rollout(watchdog, 1.0).action is Action.NONE  # a day-0 drafter
    assert _rollout(watchdog, 1.2).action is Action.NONE
    assert watchdog.reference is None and watchdog.restores == 0


def test_small_rollouts_and_middling_acceptance_are_not_judged():
    watchdog = AcceptanceWatchdog(WatchdogConfig(min_draft_steps=64))
    _rollout(watchdog, 2.0)
    few = _rollout(watchdog, 1.0, draft_steps=10)
    assert few.action is Action.NONE and few.accept_length is None
    assert _rollout(watchdog, 1.2).action is Action.NONE  # slower, not collapsed
    assert _rollout(watchdog, 1.0).action is Action.RESTORE


def test_failed_restore_turns_speculation_off():
    watchdog = AcceptanceWatchdog(WatchdogConfig())
    _rollout(watchdog, 2.0)
    assert _rollout(watchdog, 1.0).action is Action.RESTORE
    watchdog.restore_failed()
    assert watchdog.speculation_off and _rollout(watchdog, 2.0).action is Action.NONE


@pytest.mark.parametrize("block, key", [
    ({"collapsed_accept_length": 0.5}, "watchdog.collapsed_accept_length"),
    ({"healthy_accept_length": 1.0}, "watchdog.healthy_accept_length"),
    ({"min_draft_steps": 0}, "watchdog.min_draft_steps"),
    ({"enabled": True}, "watchdog.enabled"),
])
def test_bad_watchdog_blocks_name_the_key(block, key):
    with pytest.raises(ReSpecConfigError, match=key.replace(".", r"\.")):
        ReSpecConfig.from_mapping({"method": "ngram", "watchdog": block})

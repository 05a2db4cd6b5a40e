"""The acceptance-collapse watchdog's judgement, one engine's rollouts at a time.

A drafter whose weights went bad inside the engine (vLLM's level-2 sleep has been reported to leave drafter parameters
as garbage, vllm-project/vllm#52479) still serves lossless output, as the target verifies every draft, but accepts
almost nothing: decoding runs slower than without speculation and nothing fails. The only symptom is the acceptance
length, so the server feeds every finished request here and asks for a verdict between rollouts. A collapse first
earns a restore of the last good copy; a collapse right after a restore turns speculation off for the engine.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from respec_plugin.core.config import WatchdogConfig
from respec_plugin.core.spec_stats import RequestSpecStats


class Action(enum.Enum):
    NONE = "none"
    # The rollout was healthy: its drafter version is the one to restore later.
    MARK_GOOD = "mark_good"
    RESTORE = "restore"
    SPECULATION_OFF = "speculation_off"


@dataclass(frozen=True)
class Verdict:
    action: Action
    # Acceptance length of the rollout judged (None: too few verify steps with drafts to judge).
    accept_length: float | None
    # The highest acceptance length a rollout of this engine reached (None: none reached the healthy bar).
    reference: float | None


class AcceptanceWatchdog:
    """Accumulates one rollout's requests, then judges it against the engine's earlier rollouts."""

    def __init__(self, config: WatchdogConfig):
        self.config = config
        self.reference: float | None = None
        self.restores = 0
        self.speculation_off = False
        self._restored_last = False
        self._draft_steps = 0
        self._accepted = 0

    def observe(self, stats: RequestSpecStats) -> None:
        """A finished request: its verify steps that drafted (``drafted_per_pos[0]``) and the tokens they accepted."""
        self._draft_steps += stats.drafted_per_pos[0] if stats.drafted_per_pos else 0
        self._accepted += stats.num_accepted_tokens

    def judge(self) -> Verdict:
        """The verdict on the requests seen since the last call (which starts the next rollout's count)."""
        draft_steps, accepted = self._draft_steps, self._accepted
        self._draft_steps = self._accepted = 0
        if self.speculation_off or draft_steps < self.config.min_draft_steps:
            return Verdict(Action.NONE, None, self.reference)
        accept_length = 1.0 + accepted / draft_steps
        if accept_length >= self.config.healthy_accept_length:
            self.reference = max(self.reference or 0.0, accept_length)
            self._restored_last = False
            return Verdict(Action.MARK_GOOD, accept_length, self.reference)
        if accept_length > self.config.collapsed_accept_length or self.reference is None:
            self._restored_last = False
            return Verdict(Action.NONE, accept_length, self.reference)
        if self._restored_last:
            self.speculation_off = True
            return Verdict(Action.SPECULATION_OFF, accept_length, self.reference)
        self.restores += 1
        self._restored_last = True
        return Verdict(Action.RESTORE, accept_length, self.reference)

    def restore_failed(self) -> None:
        """The restore could not load: nothing good is left to serve, so speculation goes off now."""
        self.speculation_off = True

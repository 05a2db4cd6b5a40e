"""What one engine step costs and yields: step time t(batch, k) fitted online, acceptance per draft position,
expected tokens per verify step E(k), and the resulting goodput batch·E(k)/t(batch, k).

Both parts keep decayed sufficient statistics (so a fit is a 4x4 solve and the state is a few numbers to
checkpoint), and older evidence fades by ``forget`` per update: drafter and actor change during RL.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np

from respec_plugin.core.spec_stats import RequestSpecStats
from respec_plugin.core.tuner.channel import StepRecord

# Step time is linear in: a fixed overhead, per-request work, the verified tokens the target runs on
# (batch·(k+1) in steady state) and the k sequential drafter passes. The drafter's own tokens, batch·k, are
# verified_tokens − requests, so their cost is in the span already.
FEATURE_NAMES = ("overhead", "requests", "verified_tokens", "draft_passes")
NUM_FEATURES = len(FEATURE_NAMES)


def step_features(batch_size: int, k: int, num_verified_tokens: int | None = None) -> np.ndarray:
    """Features of one decode step; ``num_verified_tokens`` defaults to the steady state batch·(k+1)."""
    verified = batch_size * (k + 1) if num_verified_tokens is None else num_verified_tokens
    return np.array([1.0, batch_size, verified, k], dtype=np.float64)


@dataclass
class StepTimeModel:
    """Decayed least squares of measured decode-step times on :func:`step_features`."""

    gram: np.ndarray  # Σ w φφᵀ
    moment: np.ndarray  # Σ w φ t
    weight: float  # Σ w (decayed number of steps)

    @classmethod
    def empty(cls) -> "StepTimeModel":
        return cls(np.zeros((NUM_FEATURES, NUM_FEATURES)), np.zeros(NUM_FEATURES), 0.0)

    def observe(self, steps: Iterable[StepRecord], forget: float = 1.0) -> None:
        """Fade old evidence by ``forget``, then add these decode steps."""
        self.gram *= forget
        self.moment *= forget
        self.weight *= forget
        for step in steps:
            x = step_features(step.batch_size, step.k, step.num_scheduled_tokens)
            self.gram += np.outer(x, x)
            self.moment += x * step.duration_s
            self.weight += 1.0

    def coefficients(self) -> np.ndarray:
        # A light ridge keeps directions the data never excited (e.g. one k only) at ~0 instead of blowing up.
        # Scaled per feature, as the features' magnitudes differ by orders (1 vs batch·(k+1)).
        ridge = 1e-9 * np.diag(self.gram) + 1e-12
        return np.linalg.solve(self.gram + np.diag(ridge), self.moment)

    def calibrated(self, min_steps: int) -> bool:
        """Enough steps, at two or more k and two or more batch sizes, to separate what k costs from the rest."""
        if self.weight < min_steps:
            return False
        ks = self.gram[3, 3] / self.weight - (self.gram[0, 3] / self.weight) ** 2  # variance of k
        batches = self.gram[1, 1] / self.weight - (self.gram[0, 1] / self.weight) ** 2  # variance of batch
        return ks > 1e-6 and batches > 1e-6

    def predict(self, batch_size: int, k: int, num_verified_tokens: int | None = None) -> float:
        return float(step_features(batch_size, k, num_verified_tokens) @ self.coefficients())

    def state_dict(self) -> dict[str, Any]:
        return {"gram": self.gram.tolist(), "moment": self.moment.tolist(), "weight": self.weight}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> "StepTimeModel":
        return cls(np.array(state["gram"], dtype=np.float64), np.array(state["moment"], dtype=np.float64),
                   float(state["weight"]))


@dataclass
class AcceptanceModel:
    """Prefix acceptance per draft position, from the requests' spec stats (core/spec_stats.py).

    ``accepted_per_pos[i] / drafted_per_pos[i]`` is the chance that a verify step drafting at least i+1 tokens
    accepted the first i+1 of them, so E(k) = 1 + Σ_{i<k} of those chances (the 1 is the bonus token).
    """

    drafted_per_pos: list[float]
    accepted_per_pos: list[float]

    @classmethod
    def empty(cls) -> "AcceptanceModel":
        return cls([], [])

    def observe(self, requests: Iterable[RequestSpecStats], forget: float = 1.0) -> None:
        """Fade old evidence by ``forget``, then add the requests' records."""
        self.drafted_per_pos = [d * forget for d in self.drafted_per_pos]
        self.accepted_per_pos = [a * forget for a in self.accepted_per_pos]
        for record in requests:
            for pos, (drafted, accepted) in enumerate(zip(record.drafted_per_pos, record.accepted_per_pos)):
                if pos >= len(self.drafted_per_pos):
                    self.drafted_per_pos.append(0.0)
                    self.accepted_per_pos.append(0.0)
                self.drafted_per_pos[pos] += drafted
                self.accepted_per_pos[pos] += accepted

    @property
    def calibrated(self) -> bool:
        return bool(self.drafted_per_pos) and self.drafted_per_pos[0] > 0

    def prefix_acceptance(self, k: int) -> list[float]:
        """Chance of accepting the first i+1 drafts, i < k; positions never drafted continue the last observed
        per-position rate geometrically (E(k) = (1 − α^(k+1)) / (1 − α) when all rates are α)."""
        observed = [a / d for a, d in zip(self.accepted_per_pos, self.drafted_per_pos) if d > 0]
        if not observed:
            return [0.0] * k
        prefix: list[float] = []
        for i in range(k):
            if i < len(observed):
                p = observed[i]
            else:
                last = observed[-1]
                rate = last / observed[-2] if len(observed) >= 2 and observed[-2] > 0 else last
                p = prefix[-1] * min(rate, 1.0)
            # A longer prefix can never be likelier than a shorter one (sampling noise can say otherwise).
            prefix.append(min(p, prefix[-1]) if prefix else p)
        return prefix

    def expected_tokens(self, k: int) -> float:
        """E(k): tokens per request per verify step with k drafts (1 at k = 0)."""
        return 1.0 + sum(self.prefix_acceptance(k)) if k > 0 else 1.0

    def state_dict(self) -> dict[str, Any]:
        return {"drafted_per_pos": list(self.drafted_per_pos), "accepted_per_pos": list(self.accepted_per_pos)}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> "AcceptanceModel":
        return cls(list(state["drafted_per_pos"]), list(state["accepted_per_pos"]))


def predicted_goodput(time_model: StepTimeModel, acceptance: AcceptanceModel, batch_size: int, k: int) -> float:
    """Predicted tokens/s at this batch size and k: batch·E(k) / t(batch, k)."""
    step_time = time_model.predict(batch_size, k)
    if step_time <= 0:
        return 0.0
    return batch_size * acceptance.expected_tokens(k) / step_time

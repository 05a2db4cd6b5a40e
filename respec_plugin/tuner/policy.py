"""The tuner's policy: one k (0 = speculation off) per batch-size bucket, maximizing goodput, exploring a little.

Each bucket compares its candidates k = 0..k_max by tokens/s: measured where the engine ran that (bucket, k) for
``min_steps`` decode steps, predicted by the cost model elsewhere (optimistic guesses get measured, and corrected,
at the next update). A predicted k replaces the best measured one only if it beats it by more than the cost model's
own error on the last rollout (``respec/tuner/step_time_error``): a prediction within the model's error is no
evidence, and switching on it serves untried ks as if they were measured. With no estimate for SD-off yet, a
bucket keeps the configured k (the safe default): k > 0 is chosen only where it beats SD-off's estimate. A bucket
that has run with speculation but has no SD-off estimate runs SD-off at the next update: that measures the anchor
every k is compared with, and gives the step-time model a second k so it can predict the others (waiting for
random exploration to do this took tens of RL steps). With probability ``explore`` a bucket tries a neighbouring k
or SD-off instead, so every estimate stays fresh as the drafter and the actor change.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from typing import Any, Iterable, Mapping, NamedTuple

from respec_plugin.config import TunerConfig
from respec_plugin.tuner.channel import Schedule, StepRecord
from respec_plugin.tuner.cost_model import AcceptanceModel, StepTimeModel, predicted_goodput


class Estimate(NamedTuple):
    """A bucket's tokens/s at one k, and whether it was measured (else the cost model predicted it)."""

    tokens_per_s: float
    measured: bool


def bucket_ranges(bounds: Iterable[int], max_batch_size: int) -> list[tuple[int, int]]:
    """Inclusive batch-size ranges from the buckets' upper bounds; the last one reaches ``max_batch_size``."""
    ranges, start = [], 1
    for bound in bounds:
        if start > max_batch_size:
            break
        ranges.append((start, min(bound, max_batch_size)))
        start = bound + 1
    if start <= max_batch_size:
        ranges[-1] = (ranges[-1][0], max_batch_size)
    return ranges


class Tuner:
    """Chooses the speculative schedule from measured engine steps and the requests' acceptance."""

    def __init__(self, config: TunerConfig, default_k: int, max_batch_size: int, seed: int = 0):
        assert 0 <= default_k <= config.k_max, (default_k, config.k_max)
        self.config = config
        self.default_k = default_k
        self.ranges = bucket_ranges(config.buckets, max_batch_size)
        self.time_model = StepTimeModel.empty()
        self.acceptance = AcceptanceModel.empty()
        # measured[(bucket, k)] = [decayed tokens, decayed seconds, decayed steps, decayed Σ batch size]
        self.measured: dict[tuple[int, int], list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0, 0.0])
        self.choice = [default_k] * len(self.ranges)
        self.exploring = [False] * len(self.ranges)
        self.version = 0
        # Mean relative error of the step-time model on the last observed rollout: the margin a predicted k needs.
        self.model_error = 0.0
        self._rng = random.Random(seed)

    # ----- evidence -----------------------------------------------------------------------------------------

    def observe(self, steps: Iterable[StepRecord], requests: Iterable[Mapping[str, Any]]) -> dict[str, float]:
        """Add one RL step's engine steps and request spec stats; return ``respec/tuner/*`` metrics about them."""
        decode = [s for s in steps if s.is_decode and s.duration_s > 0]
        metrics: dict[str, float] = {}
        if decode:
            metrics["respec/tuner/k_mean"] = sum(s.k for s in decode) / len(decode)
            explored = sum(1 for s in decode if s.schedule_version == self.version and self.exploring[self.bucket(s)])
            metrics["respec/tuner/explore_frac"] = explored / len(decode)
            if self.time_model.calibrated(self.config.min_steps):
                errors = [abs(self.time_model.predict(s.batch_size, s.k, s.num_scheduled_tokens) - s.duration_s)
                          / s.duration_s for s in decode]
                self.model_error = sum(errors) / len(errors)
                metrics["respec/tuner/step_time_error"] = self.model_error
        forget = self.config.forget
        self.time_model.observe(decode, forget)
        self.acceptance.observe(requests, forget)
        for stats in self.measured.values():
            stats[:] = [v * forget for v in stats]
        for s in decode:
            stats = self.measured[(self.bucket(s), s.k)]
            stats[0] += s.num_generated_tokens
            stats[1] += s.duration_s
            stats[2] += 1.0
            stats[3] += s.batch_size
        return metrics

    def bucket(self, step: StepRecord) -> int:
        for index, (start, end) in enumerate(self.ranges):
            if start <= step.batch_size <= end:
                return index
        return len(self.ranges) - 1

    # ----- decision -----------------------------------------------------------------------------------------

    def goodput_estimates(self, bucket: int) -> dict[int, Estimate]:
        """Tokens/s per candidate k in this bucket: measured if trusted, else predicted, else absent."""
        model_ready = self.time_model.calibrated(self.config.min_steps) and self.acceptance.calibrated
        start, end = self.ranges[bucket]
        estimates = {}
        for k in range(self.config.k_max + 1):
            tokens, seconds, steps, batch_sum = self.measured.get((bucket, k), (0.0, 0.0, 0.0, 0.0))
            if steps >= self.config.min_steps and seconds > 0:
                estimates[k] = Estimate(tokens / seconds, measured=True)
            elif model_ready:
                batch = self._typical_batch(bucket) or math.sqrt(start * end)
                estimates[k] = Estimate(predicted_goodput(self.time_model, self.acceptance, round(batch), k), False)
        return estimates

    def _best_k(self, estimates: dict[int, Estimate]) -> int:
        """The k of the highest tokens/s; a predicted one only by more than the model's error over the best measured."""
        best = max(estimates, key=lambda k: (estimates[k].tokens_per_s, -k))
        measured = [k for k, estimate in estimates.items() if estimate.measured]
        if estimates[best].measured or not measured:
            return best
        best_measured = max(measured, key=lambda k: (estimates[k].tokens_per_s, -k))
        margin = 1 + self.model_error
        return best if estimates[best].tokens_per_s > margin * estimates[best_measured].tokens_per_s else best_measured

    def _typical_batch(self, bucket: int) -> float | None:
        steps = sum(self.measured[key][2] for key in self.measured if key[0] == bucket)
        batch_sum = sum(self.measured[key][3] for key in self.measured if key[0] == bucket)
        return batch_sum / steps if steps > 0 else None

    def _ran_speculation(self, bucket: int) -> bool:
        return any(self.measured.get((bucket, k), (0.0, 0.0, 0.0, 0.0))[2] > 0
                   for k in range(1, self.config.k_max + 1))

    def schedule(self) -> Schedule:
        """Choose k for every bucket (static mode: the configured k everywhere) and return vLLM's schedule."""
        self.version += 1
        for bucket in range(len(self.ranges)):
            if self.config.mode == "static":
                self.choice[bucket], self.exploring[bucket] = self.default_k, False
                continue
            estimates = self.goodput_estimates(bucket)
            if 0 not in estimates:
                if self._ran_speculation(bucket):  # nothing to compare its ks with: measure SD-off, the anchor
                    self.choice[bucket], self.exploring[bucket] = 0, True
                    continue
                best = self.default_k  # nothing measured: the configured k
            else:
                best = self._best_k(estimates)
            explore = self.config.explore > 0 and self._rng.random() < self.config.explore
            if explore:
                neighbours = sorted({best - 1, best + 1, 0} & set(range(self.config.k_max + 1)) - {best})
                steps = {k: self.measured.get((bucket, k), (0.0, 0.0, 0.0, 0.0))[2] for k in neighbours}
                best = min(neighbours, key=lambda k: (steps[k], k))
            self.choice[bucket], self.exploring[bucket] = best, explore
        return self.current_schedule()

    def current_schedule(self) -> Schedule:
        """The chosen k per bucket as vLLM's ``num_speculative_tokens_per_batch_size`` (equal neighbours merged)."""
        schedule: Schedule = []
        for (start, end), k in zip(self.ranges, self.choice):
            if schedule and schedule[-1][2] == k:
                schedule[-1] = (schedule[-1][0], end, k)
            else:
                schedule.append((start, end, k))
        return schedule

    def schedule_metrics(self) -> dict[str, float]:
        """The installed choice per bucket: ``respec/tuner/k_by_bucket/<start>-<end>``."""
        return {
            f"respec/tuner/k_by_bucket/{start}-{end}": float(k) for (start, end), k in zip(self.ranges, self.choice)
        }

    # ----- checkpoint ---------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything learnt, as JSON-able data (saved with verl checkpoints)."""
        return {
            "ranges": [list(r) for r in self.ranges],
            "time_model": self.time_model.state_dict(),
            "acceptance": self.acceptance.state_dict(),
            "measured": [[bucket, k, *stats] for (bucket, k), stats in self.measured.items()],
            "choice": list(self.choice),
            "version": self.version,
            "model_error": self.model_error,
            # The exploration coin: a resumed run explores exactly as the uninterrupted one would have.
            "rng": _jsonable(self._rng.getstate()),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if [tuple(r) for r in state["ranges"]] != self.ranges:
            # Measurements are per bucket: with other buckets only the cost model carries over.
            state = {**state, "measured": [], "choice": [self.default_k] * len(self.ranges)}
        self.time_model = StepTimeModel.from_state_dict(state["time_model"])
        self.acceptance = AcceptanceModel.from_state_dict(state["acceptance"])
        self.measured.clear()
        for bucket, k, *stats in state["measured"]:
            self.measured[(int(bucket), int(k))] = [float(v) for v in stats]
        self.choice = [int(k) for k in state["choice"]]
        self.exploring = [False] * len(self.ranges)
        self.version = int(state["version"])
        self.model_error = float(state.get("model_error", 0.0))  # absent in states saved before it was kept
        if "rng" in state:  # absent in states saved before it was kept
            self._rng.setstate(_tuples(state["rng"]))


def _jsonable(value: Any) -> Any:
    """``random.Random.getstate()`` (nested tuples) as nested lists."""
    return [_jsonable(v) for v in value] if isinstance(value, tuple) else value


def _tuples(value: Any) -> Any:
    """The inverse of :func:`_jsonable`: ``setstate`` wants tuples back."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value

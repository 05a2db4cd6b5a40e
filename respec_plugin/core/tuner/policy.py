"""The tuner's policy: one k (0 = speculation off) per batch-size bucket, maximizing goodput, exploring a little.

A bucket's k (its incumbent) changes only by a paired trial: the next rollout runs the incumbent and one challenger
k in alternating blocks of engine steps (respec_plugin/integrations/vllm/scheduler.py), and the challenger takes over
if its tokens/s over those same stretches is higher. Why paired: a machine's speed drifts within minutes, so tokens/s
measured in different rollouts compare the machine's moods as much as the ks; a trial compares numbers measured
seconds apart. And batch size by batch size: in a bucket the rollout drains through, the later block runs fewer
requests, so tokens/s over the whole bucket would favour whichever side ran first (benchmarks/README.md has the
tuner sweep's measurements).

Which challenger: SD-off first, wherever a bucket ran speculation without a trial against it (the anchor every k is
compared with; it also gives the step-time model a second k to predict the others from). Then, of the ks that have
not lost a trial to the incumbent, the one with the best tokens/s estimate, if that beats the incumbent's: measured
where the engine ran that (bucket, k) for ``min_steps`` decode steps, predicted by the cost model elsewhere. An
estimate only proposes a trial, so it needs no margin for the model's error (``respec/tuner/step_time_error``
reports that error; a margin large enough to cover it would keep predicted ks untried). Otherwise, with probability
``explore``, a neighbouring k or SD-off, so every estimate stays fresh as the drafter and the actor change. A trial
runs until both sides have ``min_steps`` decode steps at batch sizes both ran (a rarely visited bucket may take
several rollouts); it costs at most half a bucket's steps.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from typing import Any, Iterable, Mapping, NamedTuple

from respec_plugin.core.config import TunerConfig
from respec_plugin.core.spec_stats import RequestSpecStats
from respec_plugin.core.tuner.channel import Schedule, StepRecord
from respec_plugin.core.tuner.cost_model import AcceptanceModel, StepTimeModel, predicted_goodput
from respec_plugin.core.tuner.throughput import Throughput, Trial

# The layout of :meth:`Tuner.state_dict`; bump it when that layout changes.
STATE_FORMAT = 1


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
        # The decode steps each (bucket, k) ran, faded by ``forget`` per update.
        self.measured: dict[tuple[int, int], Throughput] = defaultdict(Throughput)
        self.choice = [default_k] * len(self.ranges)
        # Per bucket: the trial of a challenger against the incumbent (None: no trial), and the ks that lost to the
        # incumbent.
        self.trials: list[Trial | None] = [None] * len(self.ranges)
        self.beaten: list[set[int]] = [set() for _ in self.ranges]
        self.version = 0
        self._rng = random.Random(seed)

    # ----- evidence -----------------------------------------------------------------------------------------

    def observe(self, steps: Iterable[StepRecord], requests: Iterable[RequestSpecStats]) -> dict[str, float]:
        """Add one RL step's engine steps and request spec stats; return ``respec/tuner/*`` metrics about them."""
        steps = list(steps)
        decode = [s for s in steps if _timed_decode(s)]
        metrics: dict[str, float] = {}
        if decode:
            metrics["respec/tuner/k_mean"] = sum(s.k for s in decode) / len(decode)
            explored = sum(1 for s in decode if self._on_trial(s) and s.alternate)
            metrics["respec/tuner/explore_frac"] = explored / len(decode)
            if self.time_model.calibrated(self.config.min_steps):
                errors = [abs(self.time_model.predict(s.batch_size, s.k, s.num_scheduled_tokens) - s.duration_s)
                          / s.duration_s for s in decode]
                metrics["respec/tuner/step_time_error"] = sum(errors) / len(errors)
        forget = self.config.forget
        self.time_model.observe(decode, forget)
        self.acceptance.observe(requests, forget)
        for throughput in self.measured.values():
            throughput.decay(forget)
        for s in decode:
            self.measured[(self.bucket(s), s.k)].add(s)
        self._add_trial_evidence(steps)
        settled = [self._settle(bucket) for bucket in range(len(self.ranges))]
        if any(result is not None for result in settled):
            metrics["respec/tuner/trials_settled"] = float(sum(result is not None for result in settled))
            metrics["respec/tuner/trials_won"] = float(sum(bool(result) for result in settled))
        return metrics

    def _on_trial(self, step: StepRecord) -> bool:
        """Whether this step ran under the current schedule in a bucket with a trial."""
        return step.schedule_version == self.version and self.trials[self.bucket(step)] is not None

    def _add_trial_evidence(self, steps: list[StepRecord]) -> None:
        """Add the trial buckets' decode steps to their side of the trial. The first step of each block is left out:
        it verifies drafts the other side proposed."""
        previous = None
        for step in steps:
            switched = previous is None or previous.alternate != step.alternate
            previous = step
            if switched or not _timed_decode(step) or not self._on_trial(step):
                continue
            bucket = self.bucket(step)
            trial = self.trials[bucket]
            expected = trial.challenger if step.alternate else self.choice[bucket]
            if step.k != expected:  # not the k the trial put there (should not happen): no evidence for it
                continue
            trial.add(step)

    def _settle(self, bucket: int) -> bool | None:
        """End the bucket's trial once both sides have ``min_steps`` steps at batch sizes both ran (see
        :meth:`Trial.verdict`): True if the challenger won and is the bucket's k now, False if it lost, None while
        there is no trial or it goes on."""
        trial = self.trials[bucket]
        won = trial.verdict(self.config.min_steps) if trial is not None else None
        if won is None:
            return None
        if won:
            self.beaten[bucket] = {self.choice[bucket]}
            self.choice[bucket] = trial.challenger
        else:
            self.beaten[bucket].add(trial.challenger)
        self.trials[bucket] = None
        return won

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
            throughput = self.measured.get((bucket, k), Throughput())
            if throughput.steps >= self.config.min_steps and throughput.seconds > 0:
                estimates[k] = Estimate(throughput.rate, measured=True)
            elif model_ready:
                batch = self._typical_batch(bucket) or math.sqrt(start * end)
                estimates[k] = Estimate(predicted_goodput(self.time_model, self.acceptance, round(batch), k), False)
        return estimates

    def _typical_batch(self, bucket: int) -> float | None:
        """The mean batch size of the bucket's measured steps, whatever their k (None before any)."""
        return sum((t for (b, _), t in self.measured.items() if b == bucket), Throughput()).mean_batch

    def _steps(self, bucket: int, k: int) -> float:
        """The bucket's (decayed) measured steps at k."""
        return self.measured.get((bucket, k), Throughput()).steps

    def _ran_speculation(self, bucket: int) -> bool:
        return any(self._steps(bucket, k) > 0 for k in range(1, self.config.k_max + 1))

    def schedule(self) -> Schedule:
        """Choose every bucket's trial for the next rollout (static mode: the configured k everywhere, no trials) and
        return the incumbents as vLLM's schedule; :meth:`alternate_schedule` has the challengers."""
        self.version += 1
        for bucket in range(len(self.ranges)):
            if self.config.mode == "static":
                self.choice[bucket], self.trials[bucket] = self.default_k, None
                continue
            # One coin per bucket and update, drawn whatever is decided, so a resumed run draws as the original.
            explore = self.config.explore > 0 and self._rng.random() < self.config.explore
            if self.trials[bucket] is None:
                challenger = self._next_challenger(bucket, explore)
                self.trials[bucket] = Trial(challenger) if challenger is not None else None
        return self.current_schedule()

    def _next_challenger(self, bucket: int, explore: bool) -> int | None:
        incumbent = self.choice[bucket]
        estimates = self.goodput_estimates(bucket)
        if 0 not in estimates and incumbent != 0 and self._ran_speculation(bucket):
            return 0  # nothing to compare its ks with: try SD-off, the anchor
        candidates = [k for k in estimates if k != incumbent and k not in self.beaten[bucket]]
        if candidates:
            best = max(candidates, key=lambda k: (estimates[k].tokens_per_s, -k))
            if incumbent not in estimates or estimates[best].tokens_per_s > estimates[incumbent].tokens_per_s:
                return best
        if explore:
            neighbours = sorted({incumbent - 1, incumbent + 1, 0} & set(range(self.config.k_max + 1)) - {incumbent})
            return min(neighbours, key=lambda k: (self._steps(bucket, k), k))
        return None

    @property
    def challengers(self) -> list[int | None]:
        """Per bucket, the k on trial against the incumbent (None: no trial)."""
        return [trial.challenger if trial is not None else None for trial in self.trials]

    def current_schedule(self) -> Schedule:
        """The chosen k per bucket as vLLM's ``num_speculative_tokens_per_batch_size`` (equal neighbours merged)."""
        return _merged(zip(self.ranges, self.choice))

    def alternate_schedule(self) -> Schedule | None:
        """The schedule of the trial blocks (the challengers where a bucket has one), or None without trials."""
        if all(trial is None for trial in self.trials):
            return None
        return _merged(zip(self.ranges, (c if c is not None else k for k, c in zip(self.choice, self.challengers))))

    def schedule_metrics(self) -> dict[str, float]:
        """The installed choice per bucket, ``respec/tuner/k_by_bucket/<start>-<end>``, and the challenger of each
        bucket with a trial, ``respec/tuner/trial_k_by_bucket/<start>-<end>``."""
        metrics = {f"respec/tuner/k_by_bucket/{start}-{end}": float(k)
                   for (start, end), k in zip(self.ranges, self.choice)}
        metrics.update({f"respec/tuner/trial_k_by_bucket/{start}-{end}": float(k)
                        for (start, end), k in zip(self.ranges, self.challengers) if k is not None})
        return metrics

    # ----- checkpoint ---------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything learnt, as JSON-able data (saved with verl checkpoints)."""
        return {
            "format": STATE_FORMAT,
            "ranges": [list(r) for r in self.ranges],
            "time_model": self.time_model.state_dict(),
            "acceptance": self.acceptance.state_dict(),
            # [[bucket, k, tokens, seconds, steps, Σ batch size], ...]
            "measured": [[bucket, k, *throughput.as_list()] for (bucket, k), throughput in self.measured.items()],
            "choice": list(self.choice),
            # Per bucket: the challenger k (None: no trial) and its trial's evidence (see Trial.evidence_state).
            "challenger": self.challengers,
            "trial": [trial.evidence_state() if trial is not None else [] for trial in self.trials],
            "beaten": [sorted(ks) for ks in self.beaten],
            "version": self.version,
            # The exploration coin: a resumed run explores exactly as the uninterrupted one would have.
            "rng": _jsonable(self._rng.getstate()),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s data (ValueError for another format). Saved with other buckets, only the
        cost model, the schedule version and the exploration coin carry over: the rest is per bucket."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"tuner state has format {state.get('format')!r}, this respec reads format "
                             f"{STATE_FORMAT}; start the tuner afresh (drop the saved tuner state)")
        self.time_model = StepTimeModel.from_state_dict(state["time_model"])
        self.acceptance = AcceptanceModel.from_state_dict(state["acceptance"])
        self.version = int(state["version"])
        self._rng.setstate(_tuples(state["rng"]))
        self.measured.clear()
        if [tuple(r) for r in state["ranges"]] != self.ranges:
            self.choice = [self.default_k] * len(self.ranges)
            self.trials = [None] * len(self.ranges)
            self.beaten = [set() for _ in self.ranges]
            return
        for bucket, k, *throughput in state["measured"]:
            self.measured[(int(bucket), int(k))] = Throughput.from_list(throughput)
        self.choice = [int(k) for k in state["choice"]]
        self.trials = [Trial.from_state(k, evidence) if k is not None else None
                       for k, evidence in zip(state["challenger"], state["trial"], strict=True)]
        self.beaten = [{int(k) for k in ks} for ks in state["beaten"]]


def _timed_decode(step: StepRecord) -> bool:
    """Whether a step is evidence of decode speed: it decoded (no prompt tokens) and its duration was measured."""
    return step.is_decode and step.duration_s > 0


def _merged(ks_by_range: Iterable[tuple[tuple[int, int], int]]) -> Schedule:
    """Per-range ks as vLLM's ``num_speculative_tokens_per_batch_size``, equal neighbours merged."""
    schedule: Schedule = []
    for (start, end), k in ks_by_range:
        if schedule and schedule[-1][2] == k:
            schedule[-1] = (schedule[-1][0], end, k)
        else:
            schedule.append((start, end, k))
    return schedule


def _jsonable(value: Any) -> Any:
    """``random.Random.getstate()`` (nested tuples) as nested lists."""
    return [_jsonable(v) for v in value] if isinstance(value, tuple) else value


def _tuples(value: Any) -> Any:
    """The inverse of :func:`_jsonable`: ``setstate`` wants tuples back."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value

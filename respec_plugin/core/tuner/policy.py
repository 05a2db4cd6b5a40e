"""The tuner's policy: one k (0 = speculation off) per batch-size bucket, maximizing goodput, exploring a little.

A bucket's k (its incumbent) changes only by a paired trial: the next rollout runs the incumbent and one challenger
k in alternating blocks of engine steps (respec_plugin/integrations/vllm/scheduler.py), and the challenger takes over if its
tokens/s over those same stretches is higher. Comparing tokens/s measured in different rollouts compared the
machine's moods as much as the ks (a 2-core machine drifts by ~20% within minutes; the sweep's second run chose
k = 3 where k = 1 was best from such numbers); a trial compares numbers measured seconds apart, batch size by batch
size: in a bucket the rollout drains through, the later block runs fewer requests, and tokens/s over the whole
bucket favoured whichever side ran first (the sweep's long tail chose SD-off at 5-8 requests that way).

Which challenger: SD-off first, wherever a bucket ran speculation without a trial against it (the anchor every k is
compared with; it also gives the step-time model a second k to predict the others from). Then, of the ks that have
not lost a trial to the incumbent, the one with the best tokens/s estimate, if that beats the incumbent's: measured
where the engine ran that (bucket, k) for ``min_steps`` decode steps, predicted by the cost model elsewhere. An
estimate only proposes a trial, so it needs no margin for the model's error (on the lab's CPU engine the linear
step-time model was off by 8-32% per step in the sweep's runs, ``respec/tuner/step_time_error``: as a margin that
kept predicted ks untried). Otherwise, with probability ``explore``, a neighbouring k or SD-off, so every estimate
stays fresh as the drafter and the actor change. A trial runs until both sides have ``min_steps`` decode steps at batch
sizes both ran (a rarely visited bucket may take several rollouts); it costs at most half a bucket's steps.
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
        # Per bucket: the k on trial against the incumbent (None: no trial), the trial's evidence per batch size
        # {batch size: [incumbent tokens, seconds, steps, challenger tokens, seconds, steps]}, and the ks that lost to
        # the incumbent.
        self.challenger: list[int | None] = [None] * len(self.ranges)
        self.trial: list[dict[int, list[float]]] = [{} for _ in self.ranges]
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
        for stats in self.measured.values():
            stats[:] = [v * forget for v in stats]
        for s in decode:
            stats = self.measured[(self.bucket(s), s.k)]
            stats[0] += s.num_generated_tokens
            stats[1] += s.duration_s
            stats[2] += 1.0
            stats[3] += s.batch_size
        self._add_trial_evidence(steps)
        settled = [self._settle(bucket) for bucket in range(len(self.ranges))]
        if any(result is not None for result in settled):
            metrics["respec/tuner/trials_settled"] = float(sum(result is not None for result in settled))
            metrics["respec/tuner/trials_won"] = float(sum(bool(result) for result in settled))
        return metrics

    def _on_trial(self, step: StepRecord) -> bool:
        """Whether this step ran under the current schedule in a bucket with a trial."""
        return step.schedule_version == self.version and self.challenger[self.bucket(step)] is not None

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
            expected = self.challenger[bucket] if step.alternate else self.choice[bucket]
            if step.k != expected:  # not the k the trial put there (should not happen): no evidence for it
                continue
            side = 3 if step.alternate else 0
            evidence = self.trial[bucket].setdefault(step.batch_size, [0.0] * 6)
            evidence[side] += step.num_generated_tokens
            evidence[side + 1] += step.duration_s
            evidence[side + 2] += 1.0

    def _settle(self, bucket: int) -> bool | None:
        """End the bucket's trial once both sides have ``min_steps`` steps at batch sizes both ran: True if the
        challenger won (its tokens/s over the incumbent's, averaged over those batch sizes weighted by their steps,
        is above 1), False if it lost, None while there is no trial or it goes on."""
        challenger = self.challenger[bucket]
        if challenger is None:
            return None
        # (steps, challenger tokens/s over the incumbent's) per batch size both ran; only steps with a positive
        # duration are evidence, so both sides' seconds are > 0 there.
        matched = [(min(e[2], e[5]), (e[3] / e[4]) / (e[0] / e[1])) for e in self.trial[bucket].values()
                   if min(e[2], e[5]) > 0]
        steps = sum(weight for weight, _ in matched)
        if steps < self.config.min_steps:
            return None
        won = sum(weight * speedup for weight, speedup in matched) / steps > 1.0
        if won:
            self.beaten[bucket] = {self.choice[bucket]}
            self.choice[bucket] = challenger
        else:
            self.beaten[bucket].add(challenger)
        self.challenger[bucket] = None
        self.trial[bucket] = {}
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
            tokens, seconds, steps, batch_sum = self.measured.get((bucket, k), (0.0, 0.0, 0.0, 0.0))
            if steps >= self.config.min_steps and seconds > 0:
                estimates[k] = Estimate(tokens / seconds, measured=True)
            elif model_ready:
                batch = self._typical_batch(bucket) or math.sqrt(start * end)
                estimates[k] = Estimate(predicted_goodput(self.time_model, self.acceptance, round(batch), k), False)
        return estimates

    def _typical_batch(self, bucket: int) -> float | None:
        steps = sum(self.measured[key][2] for key in self.measured if key[0] == bucket)
        batch_sum = sum(self.measured[key][3] for key in self.measured if key[0] == bucket)
        return batch_sum / steps if steps > 0 else None

    def _ran_speculation(self, bucket: int) -> bool:
        return any(self.measured.get((bucket, k), (0.0, 0.0, 0.0, 0.0))[2] > 0
                   for k in range(1, self.config.k_max + 1))

    def schedule(self) -> Schedule:
        """Choose every bucket's trial for the next rollout (static mode: the configured k everywhere, no trials) and
        return the incumbents as vLLM's schedule; :meth:`alternate_schedule` has the challengers."""
        self.version += 1
        for bucket in range(len(self.ranges)):
            if self.config.mode == "static":
                self.choice[bucket], self.challenger[bucket] = self.default_k, None
                continue
            # One coin per bucket and update, drawn whatever is decided, so a resumed run draws as the original.
            explore = self.config.explore > 0 and self._rng.random() < self.config.explore
            if self.challenger[bucket] is None:
                self.challenger[bucket] = self._next_challenger(bucket, explore)
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
            steps = {k: self.measured.get((bucket, k), (0.0, 0.0, 0.0, 0.0))[2] for k in neighbours}
            return min(neighbours, key=lambda k: (steps[k], k))
        return None

    def current_schedule(self) -> Schedule:
        """The chosen k per bucket as vLLM's ``num_speculative_tokens_per_batch_size`` (equal neighbours merged)."""
        return _merged(zip(self.ranges, self.choice))

    def alternate_schedule(self) -> Schedule | None:
        """The schedule of the trial blocks (the challengers where a bucket has one), or None without trials."""
        if all(k is None for k in self.challenger):
            return None
        return _merged(zip(self.ranges, (c if c is not None else k for k, c in zip(self.choice, self.challenger))))

    def schedule_metrics(self) -> dict[str, float]:
        """The installed choice per bucket, ``respec/tuner/k_by_bucket/<start>-<end>``, and the challenger of each
        bucket with a trial, ``respec/tuner/trial_k_by_bucket/<start>-<end>``."""
        metrics = {f"respec/tuner/k_by_bucket/{start}-{end}": float(k)
                   for (start, end), k in zip(self.ranges, self.choice)}
        metrics.update({f"respec/tuner/trial_k_by_bucket/{start}-{end}": float(k)
                        for (start, end), k in zip(self.ranges, self.challenger) if k is not None})
        return metrics

    # ----- checkpoint ---------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything learnt, as JSON-able data (saved with verl checkpoints)."""
        return {
            "ranges": [list(r) for r in self.ranges],
            "time_model": self.time_model.state_dict(),
            "acceptance": self.acceptance.state_dict(),
            "measured": [[bucket, k, *stats] for (bucket, k), stats in self.measured.items()],
            "choice": list(self.choice),
            "challenger": list(self.challenger),
            "trial": [[[b, *evidence] for b, evidence in by_batch.items()] for by_batch in self.trial],
            "beaten": [sorted(ks) for ks in self.beaten],
            "version": self.version,
            # The exploration coin: a resumed run explores exactly as the uninterrupted one would have.
            "rng": _jsonable(self._rng.getstate()),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if [tuple(r) for r in state["ranges"]] != self.ranges:
            # Measurements are per bucket: with other buckets only the cost model carries over.
            state = {**state, "measured": [], "choice": [self.default_k] * len(self.ranges), "challenger": None}
        self.time_model = StepTimeModel.from_state_dict(state["time_model"])
        self.acceptance = AcceptanceModel.from_state_dict(state["acceptance"])
        self.measured.clear()
        for bucket, k, *stats in state["measured"]:
            self.measured[(int(bucket), int(k))] = [float(v) for v in stats]
        self.choice = [int(k) for k in state["choice"]]
        # Trials are per bucket too; states saved before trials were kept (or with other buckets) start none.
        if state.get("challenger") is None:
            state = {**state, "challenger": [None] * len(self.ranges), "trial": [[] for _ in self.ranges],
                     "beaten": [[] for _ in self.ranges]}
        self.challenger = [None if k is None else int(k) for k in state["challenger"]]
        self.trial = [_trial_evidence(by_batch) for by_batch in state["trial"]]
        self.beaten = [{int(k) for k in ks} for ks in state["beaten"]]
        self.version = int(state["version"])
        if "rng" in state:  # absent in states saved before it was kept
            self._rng.setstate(_tuples(state["rng"]))


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


def _trial_evidence(saved: list) -> dict[int, list[float]]:
    """A bucket's trial evidence from a state: ``[[batch size, *evidence], ...]``. States saved before the evidence was
    kept per batch size hold one flat list of six numbers per bucket: that trial starts over (its challenger stays)."""
    if saved and not isinstance(saved[0], list):
        return {}
    return {int(batch_size): [float(v) for v in evidence] for batch_size, *evidence in saved}


def _jsonable(value: Any) -> Any:
    """``random.Random.getstate()`` (nested tuples) as nested lists."""
    return [_jsonable(v) for v in value] if isinstance(value, tuple) else value


def _tuples(value: Any) -> Any:
    """The inverse of :func:`_jsonable`: ``setstate`` wants tuples back."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value

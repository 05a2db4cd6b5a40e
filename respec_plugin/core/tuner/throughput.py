"""What the tuner keeps of the decode steps it measured: decayed throughput sums per (bucket, k), and a paired
trial's evidence per batch size, so the policy reads named fields instead of positions in lists."""

from __future__ import annotations

from dataclasses import astuple, dataclass, field

from respec_plugin.core.tuner.channel import StepRecord


@dataclass
class Throughput:
    """Sums over decode steps run at one k: tokens generated, seconds, steps and their batch sizes (Σ batch size).
    Sums rather than means, so that fading old evidence and adding new steps stay exact."""

    tokens: float = 0.0
    seconds: float = 0.0
    steps: float = 0.0
    batch_sum: float = 0.0

    def add(self, step: StepRecord) -> None:
        self.tokens += step.num_generated_tokens
        self.seconds += step.duration_s
        self.steps += 1.0
        self.batch_sum += step.batch_size

    def decay(self, factor: float) -> None:
        """Fade the evidence by ``factor`` (the tuner's ``forget``): drafter and actor change during RL."""
        self.tokens *= factor
        self.seconds *= factor
        self.steps *= factor
        self.batch_sum *= factor

    def __add__(self, other: Throughput) -> Throughput:
        return Throughput(self.tokens + other.tokens, self.seconds + other.seconds, self.steps + other.steps,
                          self.batch_sum + other.batch_sum)

    @property
    def rate(self) -> float:
        """Tokens/s; only meaningful once ``seconds > 0``."""
        return self.tokens / self.seconds

    @property
    def mean_batch(self) -> float | None:
        """The mean batch size of the steps, None without steps."""
        return self.batch_sum / self.steps if self.steps > 0 else None

    def as_list(self) -> list[float]:
        """``[tokens, seconds, steps, batch_sum]``, the layout saved in the tuner's state."""
        return list(astuple(self))

    @classmethod
    def from_list(cls, values: list) -> Throughput:
        tokens, seconds, steps, batch_sum = (float(v) for v in values)
        return cls(tokens, seconds, steps, batch_sum)


@dataclass
class TrialSides:
    """A trial's evidence at one batch size: the steps the incumbent k ran there and those the challenger ran."""

    incumbent: Throughput = field(default_factory=Throughput)
    challenger: Throughput = field(default_factory=Throughput)

    @property
    def matched_steps(self) -> float:
        """Steps both sides ran at this batch size: the weight of its comparison (0: no comparison here)."""
        return min(self.incumbent.steps, self.challenger.steps)

    @property
    def speedup(self) -> float:
        """The challenger's tokens/s over the incumbent's; only where ``matched_steps > 0`` (trial evidence has
        positive durations only, so both sides' seconds are > 0 there)."""
        return self.challenger.rate / self.incumbent.rate


@dataclass
class Trial:
    """A bucket's paired trial: the ``challenger`` k runs against the incumbent in alternating blocks of engine steps,
    and the evidence is kept per batch size, as a rollout draining through the bucket runs the later block at fewer
    requests (tokens/s over the whole bucket would favour whichever side ran first)."""

    challenger: int
    evidence: dict[int, TrialSides] = field(default_factory=dict)

    def add(self, step: StepRecord) -> None:
        """Add a decode step to its side: the challenger's if it ran the alternate schedule, else the incumbent's."""
        sides = self.evidence.setdefault(step.batch_size, TrialSides())
        (sides.challenger if step.alternate else sides.incumbent).add(step)

    def verdict(self, min_steps: int) -> bool | None:
        """True if the challenger won (its speedup, averaged over the batch sizes both sides ran weighted by their
        matched steps, is above 1), False if it lost, None while those matched steps are fewer than ``min_steps``."""
        matched = [(sides.matched_steps, sides.speedup) for sides in self.evidence.values() if sides.matched_steps > 0]
        steps = sum(weight for weight, _ in matched)
        if steps < min_steps:
            return None
        return sum(weight * speedup for weight, speedup in matched) / steps > 1.0

    def evidence_state(self) -> list[list]:
        """The evidence as JSON-able data: ``[[batch size, incumbent, challenger], ...]`` (each a
        :meth:`Throughput.as_list`)."""
        return [[batch_size, sides.incumbent.as_list(), sides.challenger.as_list()]
                for batch_size, sides in self.evidence.items()]

    @classmethod
    def from_state(cls, challenger: int, evidence: list[list]) -> Trial:
        return cls(int(challenger), {int(batch_size): TrialSides(Throughput.from_list(incumbent),
                                                                 Throughput.from_list(challenger_side))
                                     for batch_size, incumbent, challenger_side in evidence})

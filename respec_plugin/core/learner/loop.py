"""The online learner: between RL steps, a bounded number of KD steps on the step's features (+ replay), a safety
check on a held-out slice, then publication of a new drafter version; its state lives in verl's checkpoint dir.

Safety: a non-finite loss, an exception, or a candidate whose held-out acceptance (of the greedy draft vLLM verifies)
is below the serving version's never reaches the engine. The held-out slice is whole prompt groups, so the check
measures the drafter on prompts it did not train on, as the next rollout will. The learner then reverts to the
serving weights and counts the rejected version; the engine keeps serving the last good version (the server also
rolls back a push it cannot load).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from respec_plugin.core.config import LearnerConfig
from respec_plugin.core.drafter.eagle3 import Eagle3Drafter, vllm_weights
from respec_plugin.core.drafter.io import load_drafter, save_drafter
from respec_plugin.core.learner.buffer import Minibatch, ReplayBuffer, SequenceFeatures, collate, split_held_out
from respec_plugin.core.learner.objective import held_out_scores, kd_loss

logger = logging.getLogger(__name__)

METRIC_PREFIX = "respec/learner/"
STATE_FILE = "learner_state.pt"
SUMMARY_FILE = "buffer_summary.json"
DRAFTER_DIR = "drafter"



@dataclass(frozen=True)
class PublishReport:
    """Outcome of one publish: which engines serve the new version, and why the others refused it."""

    version: int
    accepted: int
    rejected: int
    errors: tuple[str, ...]
    serving_versions: tuple[int, ...]

    @property
    def ok(self) -> bool:
        return self.rejected == 0


# publish(weights, version) -> PublishReport: loads a drafter version into the serving engines.
PublishFn = Callable[[list[tuple[str, torch.Tensor]], int], PublishReport]


@dataclass
class Candidate:
    """A trained drafter (the learner's training copy) not yet published, with what its checks measured."""

    start: float  # perf_counter() when training began
    held_out: Minibatch
    serving: dict[str, float]  # held-out scores of the serving version
    weight_mean: float
    loss: float | None = None
    scores: dict[str, float] | None = None  # held-out scores of the candidate
    error: Exception | None = None  # why it must not be published (NaN loss, worse on held-out, an exception)


class OnlineLearner:
    """Owns the training copy of the drafter, its optimizer, the replay buffer and the version counter.

    ``serving_version`` is the version the engines serve (the learner's last successful publish, or the one it was
    started from); ``latest_version`` the highest number handed out, so a rejected number is never reused.
    """

    def __init__(self, config: LearnerConfig, drafter: Eagle3Drafter, serving_version: int, seed: int = 0,
                 initial: Eagle3Drafter | None = None):
        self.config = config
        self.drafter = drafter
        # The drafter the run started from, scored beside the serving one (``config.compare_with_initial``).
        self.initial = initial
        self.serving_version = serving_version
        self.latest_version = serving_version
        self.rejected_versions = 0
        self.optimizer = torch.optim.AdamW(drafter.parameters(), lr=config.learning_rate, weight_decay=0.0,
                                           betas=(0.9, 0.95))
        self.buffer = ReplayBuffer(config.replay_steps)
        self.generator = torch.Generator().manual_seed(seed)
        # The drafter the engines serve: scored against each candidate, the training copy's way back after a failure.
        self.serving = copy.deepcopy(drafter)
        # The previous step's held-out sequences: checked against then, trained on now.
        self._held_out_last: list[SequenceFeatures] = []

    def set_embed_tokens(self, embed_tokens: torch.Tensor) -> None:
        """Follow the actor's updated input embedding in every drafter copy (vLLM shares the target's)."""
        for drafter in (self.drafter, self.serving, self.initial):
            if drafter is not None:
                drafter.set_embed_tokens(embed_tokens)

    def refresh_targets(self, recompute: Callable[[list[SequenceFeatures]], list[SequenceFeatures]]) -> None:
        """Recompute the replayed sequences' features (``learner.refresh_replay``): their targets came from the actor
        of the step that generated them; the next drafts are verified by the actor of now."""
        self.buffer.refresh(recompute)
        if self._held_out_last:
            self._held_out_last = recompute(self._held_out_last)

    def step(self, sequences: list[SequenceFeatures], publish: PublishFn) -> dict[str, float]:
        """Learn from one RL step's sequences and publish the result if it is safe; returns ``respec/learner/*``."""
        return self.publish(self.train_candidate(sequences), publish)

    def train_candidate(self, sequences: list[SequenceFeatures]) -> Candidate:
        """Train on one RL step's sequences (+ replay) and check the result on the held-out prompt groups. Touches
        only the training copy and the buffer, so it may run while the engines serve (overlapped mode); nothing
        reaches them before :meth:`publish`."""
        start = time.perf_counter()
        held_out_sequences, training = split_held_out(sequences, self.config.holdout_fraction)
        held_out = collate(held_out_sequences)
        self.buffer.add_step(training + self._held_out_last)
        self._held_out_last = held_out_sequences
        candidate = Candidate(start=start, held_out=held_out,
                              serving=held_out_scores(self.serving, held_out, self.config.num_draft_steps),
                              weight_mean=sum(s.weight for s in sequences) / max(len(sequences), 1))
        try:
            candidate.loss = self._train(start)
            candidate.scores = held_out_scores(self.drafter, held_out, self.config.num_draft_steps)
            accept, serving_accept = candidate.scores["greedy_acceptance"], candidate.serving["greedy_acceptance"]
            if not math.isfinite(candidate.scores["tv"]) or not accept >= serving_accept:
                raise _Rejected(f"held-out acceptance {accept:.4f} is below the serving version's {serving_accept:.4f}")
        except Exception as e:  # noqa: BLE001 -- any failure of the learner must leave the serving version alone
            candidate.error = e
        return candidate

    def publish(self, candidate: Candidate, publish: PublishFn) -> dict[str, float]:
        """Publish a candidate that passed its checks as the next version; otherwise (or if the engines refuse it)
        revert to the serving weights and count it. Returns the step's ``respec/learner/*`` metrics."""
        try:
            if candidate.error is not None:
                raise candidate.error
            self.latest_version += 1
            report = publish(vllm_weights(self.drafter), self.latest_version)
            if not report.ok:
                raise _Rejected(f"the engine refused it: {report.errors[0]}")
        except Exception as e:  # noqa: BLE001 -- any failure of the learner must leave the serving version alone
            self.rejected_versions += 1
            self.drafter.load_state_dict(self.serving.state_dict())
            logger.error("respec learner: candidate drafter not published (%s); v%d keeps serving (%s)",
                         e, self.serving_version, type(e).__name__)
            served = candidate.serving
        else:
            self.serving_version = self.latest_version
            self.serving.load_state_dict(self.drafter.state_dict())
            served = candidate.scores
        metrics = {"weight_mean": candidate.weight_mean, "tv": served["tv"],
                   "held_out_acceptance": served["greedy_acceptance"],
                   "held_out_acceptance_ceiling": candidate.serving["greedy_acceptance_ceiling"]}
        if candidate.loss is not None:
            metrics["loss"] = candidate.loss
        if self.initial is not None:
            metrics["held_out_acceptance_initial"] = held_out_scores(
                self.initial, candidate.held_out, self.config.num_draft_steps)["greedy_acceptance"]
        metrics.update(time_s=time.perf_counter() - candidate.start, published_version=float(self.serving_version),
                       rejected_versions=float(self.rejected_versions))
        return {METRIC_PREFIX + name: float(value) for name, value in metrics.items()}

    def _train(self, start: float) -> float:
        """At most ``steps_per_rl_step`` AdamW steps within ``max_time_s``; returns their mean loss."""
        if not self.buffer.sequences:
            raise _Rejected("no training sequences this step")
        losses = []
        self.drafter.train()
        for _ in range(self.config.steps_per_rl_step):
            if losses and time.perf_counter() - start > self.config.max_time_s:
                break
            batch = self.buffer.sample(self.config.batch_size, self.generator)
            loss, _ = kd_loss(self.drafter, batch, divergence=self.config.divergence,
                              negative_feedback_coef=self.config.negative_feedback,
                              num_draft_steps=self.config.num_draft_steps)
            if not torch.isfinite(loss):
                raise _Rejected(f"non-finite loss {loss.item()}")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.drafter.parameters(), 1.0)
            self.optimizer.step()
            losses.append(loss.item())
        self.drafter.eval()
        return sum(losses) / len(losses)

    # ----- state in verl's checkpoint directory ------------------------------------------------------------

    def save(self, directory: str | Path) -> None:
        """The serving drafter (vLLM layout, with its version), optimizer state, counters and buffer summary."""
        directory = Path(directory)
        save_drafter(self.serving, directory / DRAFTER_DIR, drafter_version=self.serving_version)
        torch.save({"optimizer": self.optimizer.state_dict(), "latest_version": self.latest_version,
                    "rejected_versions": self.rejected_versions, "generator": self.generator.get_state()},
                   directory / STATE_FILE)
        (directory / SUMMARY_FILE).write_text(json.dumps(self.buffer.summary(), indent=2))

    @classmethod
    def restore(cls, config: LearnerConfig, directory: str | Path, embed_tokens: torch.Tensor,
                initial: Eagle3Drafter | None = None) -> "OnlineLearner":
        """The learner saved by :meth:`save` (its buffer starts empty: only its summary is saved)."""
        directory = Path(directory)
        drafter, version = load_drafter(directory / DRAFTER_DIR, embed_tokens)
        learner = cls(config, drafter, version, initial=initial)
        state = torch.load(directory / STATE_FILE, weights_only=False)
        learner.optimizer.load_state_dict(state["optimizer"])
        learner.latest_version = state["latest_version"]
        learner.rejected_versions = state["rejected_versions"]
        learner.generator.set_state(state["generator"])
        return learner


class _Rejected(Exception):
    """A candidate drafter that must not be published."""

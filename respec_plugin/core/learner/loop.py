"""The online learner on one data-parallel rank: a bounded number of KD steps on the step's features (+ replay), a
safety check on the held-out prompt groups, then publication of a new drafter version; its state goes into the
trainer's checkpoint.

Data-parallel: every rank keeps the features it computed and trains the same drafter on them; the loss is normalised
by weight totals summed over the ranks and the gradients are summed, so N ranks make the update one rank would make
on all their rows. The ranks agree on every decision (stop for time, a failed step, the held-out check, a refused
push), so they always hold the same drafter.

Safety: a non-finite loss, an exception (running out of memory included), or a candidate whose held-out acceptance (of
the greedy draft vLLM verifies) is below the serving version's never reaches the engine. The held-out slice is whole
prompt groups, so the check measures the drafter on prompts it did not train on, as the next rollout will. The
learner then reverts to the serving weights and counts the rejected version; the engines keep serving the last good
version (each one also rolls back a push it cannot load).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from respec_plugin.core.config import LearnerConfig
from respec_plugin.core.drafter.eagle3 import Eagle3Drafter, vllm_weights
from respec_plugin.core.drafter.io import load_drafter, save_drafter
from respec_plugin.core.learner.buffer import ReplayBuffer, SequenceFeatures, collate, length_groups
from respec_plugin.core.learner.objective import (
    DraftStepStats,
    held_out_stats,
    kd_loss_by_step,
    mean_over_steps,
    step_weight_totals,
)
from respec_plugin.core.learner.ranks import Ranks

logger = logging.getLogger(__name__)

METRIC_PREFIX = "respec/learner/"
STATE_FILE = "learner_state.pt"
STATE_FORMAT = 1
SUMMARY_FILE = "buffer_summary.json"
SERVING_DIR = "drafter"
CANDIDATE_DIR = "candidate"


@dataclass
class Candidate:
    """A trained drafter (the learner's training copy) not yet published, with what its checks measured;
    ``rejection`` says why it must not be published (None: it may)."""

    weight_mean: float = 0.0
    sequences: int = 0
    tokens: int = 0
    loss: float | None = None
    optimizer_steps: int = 0
    serving: dict[str, float] = field(default_factory=dict)  # held-out scores of the serving version
    scores: dict[str, float] = field(default_factory=dict)  # held-out scores of the candidate
    initial: dict[str, float] = field(default_factory=dict)  # held-out scores of the drafter the run started from
    rejection: str | None = None


class _Rejected(Exception):
    """A candidate that must not be published (its message says why)."""


def _fast_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 matmuls natively (else autocast would emulate them, slower)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


class OnlineLearner:
    """Owns the training copy of the drafter, its optimizer, the replay buffer and the version counter, on one rank.

    ``serving_version`` is the version the engines serve (the last successful publish, or the one the learner
    started from); ``latest_version`` the highest number handed out, so a rejected number is never reused.
    """

    def __init__(self, config: LearnerConfig, drafter: Eagle3Drafter, serving_version: int, *, seed: int = 0,
                 initial: Eagle3Drafter | None = None, process_group=None):
        self.config = config
        self.drafter = drafter
        self.device = next(drafter.parameters()).device
        self.ranks = Ranks(process_group, self.device)
        # The drafter the run started from, scored beside the serving one (``config.compare_with_initial``).
        self.initial = initial
        self.serving_version = serving_version
        self.latest_version = serving_version
        self.rejected_versions = 0
        self.optimizer = torch.optim.AdamW(drafter.parameters(), lr=config.learning_rate, weight_decay=0.0,
                                           betas=(0.9, 0.95))
        self.buffer = ReplayBuffer(config.replay_steps)
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        # The drafter the engines serve: scored against each candidate, the training copy's way back after a failure.
        self.serving = copy.deepcopy(drafter)
        # The previous step's held-out sequences: checked against then, trained on now.
        self._held_out_last: list[SequenceFeatures] = []
        self._bfloat16 = config.precision == "bfloat16" and _fast_bfloat16(self.device)
        if config.precision == "bfloat16" and not self._bfloat16:
            logger.warning("respec learner: %s has no fast bfloat16; the drafter trains in float32", self.device)

    # ----- training -----------------------------------------------------------------------------------------

    def train_candidate(self, sequences: list[SequenceFeatures], stop: threading.Event | None = None) -> Candidate:
        """Train on this rank's sequences of one RL step (+ replay) and check the result on the held-out ones, with
        the other ranks. Touches only the training copy and the buffer: nothing reaches the engines before the
        candidate is published. Never raises for a bad candidate: its ``rejection`` says what went wrong. Training
        stops early, after at least one optimizer step, once rank 0's ``stop`` is set (the actor needs its device
        back) or ``max_time_s`` has passed."""
        start = time.perf_counter()
        held_out = [s for s in sequences if s.held_out]
        training = [s for s in sequences if not s.held_out]
        self.buffer.add_step(training + self._held_out_last)
        self._held_out_last = held_out
        count, weight_sum, tokens = self.ranks.sum_floats(len(sequences), sum(s.weight for s in sequences),
                                                          sum(s.num_tokens for s in sequences))
        candidate = Candidate(weight_mean=weight_sum / max(count, 1.0), sequences=int(count), tokens=int(tokens))
        try:
            candidate.serving = self._held_out_scores(self.serving, held_out)
            if self.initial is not None:
                candidate.initial = self._held_out_scores(self.initial, held_out)
            candidate.loss, candidate.optimizer_steps = self._train(start, stop)
            candidate.scores = self._held_out_scores(self.drafter, held_out)
            accept, serving_accept = candidate.scores["greedy_acceptance"], candidate.serving["greedy_acceptance"]
            if not math.isfinite(candidate.scores["tv"]) or not accept >= serving_accept:
                raise _Rejected(f"held-out acceptance {accept:.4f} is below the serving version's {serving_accept:.4f}")
        except Exception as e:  # noqa: BLE001 -- any failure of the learner must leave the serving version alone
            candidate.rejection = f"{type(e).__name__}: {e}"
        return candidate

    def _held_out_scores(self, drafter: Eagle3Drafter, held_out: list[SequenceFeatures]) -> dict[str, float]:
        """Held-out statistics of ``drafter``, over every rank's held-out sequences."""
        local = (held_out_stats(drafter, collate(held_out, self.device), self.config.num_draft_steps)
                 if held_out and any(float(s.loss_mask.sum()) for s in held_out) else None)
        names = ("divergence", "tv", "greedy_acceptance", "greedy_acceptance_ceiling", "negative_feedback")
        by_step = []
        for j in range(self.config.num_draft_steps):
            step = local[j] if local is not None else DraftStepStats(dict.fromkeys(names, 0.0), 0.0)
            *sums, tokens = self.ranks.sum_floats(*(step.sums[name] for name in names), step.tokens)
            if tokens <= 0:
                raise _Rejected("no held-out response token on any rank: the candidate cannot be checked")
            by_step.append(DraftStepStats(dict(zip(names, sums)), tokens))
        return mean_over_steps(by_step)

    def _train(self, start: float, stop: threading.Event | None) -> tuple[float, int]:
        """At most ``steps_per_rl_step`` AdamW steps, within ``max_time_s`` and until ``stop``; returns their mean
        loss (over ranks) and their number."""
        if self.ranks.sum_floats(len(self.buffer.sequences))[0] == 0:
            raise _Rejected("no training sequences this step")
        local_batch = max(1, math.ceil(self.config.batch_size / self.ranks.size))
        losses = []
        self.drafter.train()
        try:
            for _ in range(self.config.steps_per_rl_step):
                out_of_time = time.perf_counter() - start > self.config.max_time_s
                if losses and self.ranks.from_rank0(out_of_time or (stop is not None and stop.is_set())):
                    break
                losses.append(self._train_step(local_batch))
        finally:
            self.drafter.eval()
        return sum(losses) / len(losses), len(losses)

    def _train_step(self, local_batch: int) -> float:
        """One optimizer step over every rank's minibatch; all ranks agree whether it succeeded."""
        sampled = self.buffer.sample(local_batch, self.generator)
        sampled = [s for s in sampled if float(s.loss_mask.sum()) > 0]
        batches = [collate(group, self.device) for group in length_groups(sampled)]
        totals = torch.zeros(self.config.num_draft_steps, device=self.device)
        for batch in batches:
            totals = totals + step_weight_totals(batch, self.config.num_draft_steps)
        totals = self.ranks.sum(totals)
        self.optimizer.zero_grad(set_to_none=True)
        error, share = None, 0.0
        autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if self._bfloat16
                    else contextlib.nullcontext())
        try:
            for batch in batches:  # the global totals normalise every group's loss: their gradients add up
                with autocast:
                    loss, _ = kd_loss_by_step(self.drafter, batch, divergence=self.config.divergence,
                                              negative_feedback_coef=self.config.negative_feedback,
                                              num_draft_steps=self.config.num_draft_steps, weight_totals=totals)
                value = loss.item()
                if not math.isfinite(value):
                    raise _Rejected(f"non-finite loss {value}")
                loss.backward()
                share += value
        except Exception as e:  # noqa: BLE001 -- the ranks must agree before the gradient sum: report, then decide
            error = f"{type(e).__name__}: {e}"
        error = self.ranks.first_error(error)
        if error is not None:
            self.optimizer.zero_grad(set_to_none=True)
            raise _Rejected(error)
        self.ranks.sum_gradients(self.drafter.parameters())
        torch.nn.utils.clip_grad_norm_(self.drafter.parameters(), 1.0)
        self.optimizer.step()
        return self.ranks.sum_floats(share)[0]

    def failed_candidate(self, error: BaseException) -> Candidate:
        """A candidate for a step the learner could not train at all (its features were lost, say)."""
        return Candidate(rejection=f"{type(error).__name__}: {error}")

    def candidate_metrics(self, candidate: Candidate) -> dict[str, float]:
        """The ``respec/learner/*`` metrics of a candidate's training and checks (the version counters come with
        :meth:`settle`)."""
        metrics = {"weight_mean": candidate.weight_mean, "sequences": float(candidate.sequences),
                   "optimizer_steps": float(candidate.optimizer_steps)}
        if candidate.loss is not None:
            metrics["loss"] = candidate.loss
        if candidate.serving:
            metrics["held_out_acceptance_ceiling"] = candidate.serving["greedy_acceptance_ceiling"]
        if candidate.initial:
            metrics["held_out_acceptance_initial"] = candidate.initial["greedy_acceptance"]
        if candidate.scores:
            metrics["candidate_held_out_acceptance"] = candidate.scores["greedy_acceptance"]
        return {METRIC_PREFIX + name: float(value) for name, value in metrics.items()}

    # ----- publication --------------------------------------------------------------------------------------

    def next_version(self, candidate: Candidate) -> int | None:
        """The version a candidate that passed its checks is published as; None for one that must not be."""
        if candidate.rejection is not None:
            return None
        self.latest_version += 1
        return self.latest_version

    def candidate_weights(self) -> list[tuple[str, torch.Tensor]]:
        return vllm_weights(self.drafter)

    def serving_weights(self) -> list[tuple[str, torch.Tensor]]:
        return vllm_weights(self.serving)

    def agree(self, refused: str | None) -> str | None:
        """A push succeeded only where every rank's engine took it: the first refusal, on every rank."""
        return self.ranks.first_error(refused)

    def settle(self, candidate: Candidate, refused: str | None) -> dict[str, float]:
        """After the publication attempt: a candidate the engines took (``refused`` None) becomes the serving
        version; any other is counted as rejected and the training copy reverts to the serving weights. Returns the
        step's publication metrics."""
        rejection = candidate.rejection or (f"the engine refused it: {refused}" if refused is not None else None)
        if rejection is None:
            self.serving_version = self.latest_version
            self.serving.load_state_dict(self.drafter.state_dict())
            served = candidate.scores
        else:
            self.rejected_versions += 1
            self.drafter.load_state_dict(self.serving.state_dict())
            logger.error("respec learner: candidate drafter not published (%s); v%d keeps serving", rejection,
                         self.serving_version)
            served = candidate.serving
        metrics = {"published_version": float(self.serving_version), "rejected_versions": float(self.rejected_versions)}
        if served:
            metrics.update(tv=served["tv"], held_out_acceptance=served["greedy_acceptance"])
        return {METRIC_PREFIX + name: value for name, value in metrics.items()}

    # ----- state in the trainer's checkpoint ----------------------------------------------------------------

    def save(self, directory: str | Path, candidate: Candidate | None = None) -> None:
        """The serving drafter (vLLM layout, with its version), a candidate not yet published (publishable at the
        next weight sync), the optimizer state, the counters and a summary of the buffer."""
        directory = Path(directory)
        save_drafter(self.serving, directory / SERVING_DIR, drafter_version=self.serving_version)
        pending = candidate is not None and candidate.rejection is None
        if pending:
            save_drafter(self.drafter, directory / CANDIDATE_DIR, drafter_version=self.latest_version + 1)
        # A rejected candidate is counted as the publication will count it, so a resumed run's counters go on.
        rejected = self.rejected_versions + int(candidate is not None and not pending)
        torch.save({"format": STATE_FORMAT, "optimizer": self.optimizer.state_dict(),
                    "latest_version": self.latest_version, "rejected_versions": rejected,
                    "pending_candidate": pending}, directory / STATE_FILE)
        (directory / SUMMARY_FILE).write_text(json.dumps(self.buffer.summary(), indent=2))

    @staticmethod
    def read_state(directory: str | Path) -> dict:
        """The counters and optimizer state :meth:`save` wrote (tensors only: never unpickles code)."""
        path = Path(directory) / STATE_FILE
        state = torch.load(path, weights_only=True, map_location="cpu")
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"learner state {path} has format {state.get('format')!r}, this respec reads format "
                             f"{STATE_FORMAT}")
        return state

    def load(self, directory: str | Path) -> Candidate | None:
        """Restore what :meth:`save` wrote (the buffer starts empty: only its summary is saved); returns the
        candidate that was waiting to be published, if any."""
        directory = Path(directory)
        state = self.read_state(directory)
        serving, version = load_drafter(directory / SERVING_DIR)
        self.serving.load_state_dict(serving.state_dict())
        self.drafter.load_state_dict(serving.state_dict())
        self.serving_version = version
        if state["pending_candidate"]:
            candidate, _ = load_drafter(directory / CANDIDATE_DIR)
            self.drafter.load_state_dict(candidate.state_dict())
        self.optimizer.load_state_dict(state["optimizer"])
        self.latest_version = state["latest_version"]
        self.rejected_versions = state["rejected_versions"]
        self.generator.manual_seed(self.seed + self.latest_version)
        return Candidate() if state["pending_candidate"] else None


def check_saved_state(directory: str | Path) -> None:
    """Raise if the learner state :meth:`OnlineLearner.save` wrote to ``directory`` cannot be read back."""
    directory = Path(directory)
    state = OnlineLearner.read_state(directory)
    load_drafter(directory / SERVING_DIR)
    if state["pending_candidate"]:
        load_drafter(directory / CANDIDATE_DIR)

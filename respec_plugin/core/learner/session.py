"""One rank's learner across RL steps: the features it kept from the actor's forward, the candidate drafter trained
on them, its publication to the co-located engine, and its state in checkpoints.

``learner.overlap``: the step's training does not run when the driver asks for it but in a background thread started
at the weight sync, while the next rollout runs (the actor ranks are idle then), for as long as the rollout lasts (at
most ``steps_per_rl_step``): the next old-log-prob forward stops it after its current optimizer step and waits for it
(``wait_s``), and its candidate is published at the weight sync after that, one step later.

It runs inside each actor rank (respec_plugin/integrations/verl/learner_worker.py calls it); every rank holds the same
drafter (data-parallel), so each can push it to the vLLM worker on its own device. A version serves only when every
rank's engine took it: otherwise every engine is put back on the serving version, so no two replicas ever serve
different drafters. Nothing here raises into the RL step: a failure is logged, counted and the serving drafter
stays.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import torch

from respec_plugin.core.learner.buffer import SequenceFeatures
from respec_plugin.core.learner.loop import METRIC_PREFIX, Candidate, OnlineLearner

logger = logging.getLogger(__name__)

class DrafterPusher(Protocol):
    """Loads drafter weights into this rank's co-located engine, all or nothing (verl: respec's server adapter)."""

    async def push_drafter(self, weights: list[tuple[str, torch.Tensor]], version: int) -> str | None:
        """None when the engine serves ``version`` now, else why it refused it (it then keeps the old one)."""


@dataclasses.dataclass(frozen=True)
class _ScheduledTraining:
    """``learner.overlap``: a step's kept rows (None: their capture failed) and trajectory weights, waiting for the
    weight sync to start training on them."""

    captured: list[SequenceFeatures] | None
    row_weights: Mapping[int, float]
    step: int


class LearnerSession:
    """The learner of one actor rank: :meth:`add_captured` during the old-log-prob forward, :meth:`train` after the
    actor update, :meth:`publish` in the weight sync, :meth:`status` for the step's metrics."""

    def __init__(self, learner: OnlineLearner, *, record_dir: str | None = None, rank: int = 0):
        self.learner = learner
        self.record_dir = Path(record_dir) if record_dir else None
        self.rank = rank
        # The version this rank's engine serves: the drafter_path checkpoint is loaded at start-up as the learner's
        # initial version.
        self.engine_version = learner.serving_version
        self._captured: list[SequenceFeatures] = []
        self._capture_failed = False
        self._pending: Candidate | None = None
        self._metrics: dict[str, float] = {}
        self._publish_s = 0.0
        # learner.overlap: the step's rows and weights waiting for the weight sync, the trainings queued for the
        # learner's thread, whether one is running, and the metrics of the last one it finished. One daemon thread
        # for the whole run: a thread started per step leaves per-thread native state behind (benchmarks/README.md,
        # soak), and a daemon never holds up the worker's exit.
        self._scheduled: _ScheduledTraining | None = None
        self._trainings: queue.SimpleQueue | None = None
        self._idle = threading.Event()
        self._idle.set()
        self._train_metrics: dict[str, float] = {}
        self._wait_s = 0.0
        self._stop = threading.Event()

    # ----- the step's features ------------------------------------------------------------------------------

    def begin_capture(self) -> None:
        """A new old-log-prob forward: its rows replace what was kept before."""
        self._captured, self._capture_failed = [], False

    def capture_failed(self) -> None:
        self._capture_failed = True

    def add_captured(self, sequences: list[SequenceFeatures]) -> None:
        self._captured.extend(sequences)

    # ----- training -----------------------------------------------------------------------------------------

    def train(self, row_weights: Mapping[int, float], step: int, *, overlap: bool = False) -> dict[str, float]:
        """Train a candidate on the kept rows with the driver's trajectory weights; returns its metrics. With
        ``overlap``, only keep them: training starts at the weight sync (:meth:`publish`), and its metrics come with
        :meth:`status` once it is done."""
        captured, self._captured = self._captured, []
        if self._capture_failed:
            captured = None
        if overlap:
            self._scheduled = _ScheduledTraining(captured, row_weights, step)
            return {}
        return self._train(captured, row_weights, step)

    def _train(self, captured: list[SequenceFeatures] | None, row_weights: Mapping[int, float], step: int,
               stop: threading.Event | None = None) -> dict[str, float]:
        start = time.perf_counter()
        self._pending = None
        try:
            if captured is None:
                raise RuntimeError("this step's features could not be captured")
            sequences = [dataclasses.replace(s, weight=float(row_weights[s.row])) for s in captured]
            if self.record_dir is not None:
                self._record(step, sequences)
            candidate = self.learner.train_candidate(sequences, stop)
        except Exception as e:  # noqa: BLE001 -- a learner failure must leave the RL step and the serving drafter alone
            logger.exception("respec learner: no candidate this step; drafter v%d keeps serving",
                             self.learner.serving_version)
            candidate = self.learner.failed_candidate(e)
        self._pending = candidate
        metrics = self.learner.candidate_metrics(candidate)
        metrics[METRIC_PREFIX + "train_s"] = time.perf_counter() - start
        metrics[METRIC_PREFIX + "tokens"] = float(candidate.tokens)
        return metrics

    def join(self) -> None:
        """Stop the overlapped training after its current optimizer step and wait for it (before the actor's next
        forward, or a checkpoint); the wait is ``wait_s``."""
        start = time.perf_counter()
        self._stop.set()
        self._idle.wait()
        self._wait_s = time.perf_counter() - start

    def _start_scheduled(self) -> None:
        scheduled, self._scheduled = self._scheduled, None
        if scheduled is None:
            return
        stop = self._stop = threading.Event()

        def run() -> None:
            self._train_metrics = self._train(scheduled.captured, scheduled.row_weights, scheduled.step, stop)

        if self._trainings is None:
            self._trainings = queue.SimpleQueue()
            threading.Thread(target=self._run_trainings, name="respec-learner", daemon=True).start()
        self._idle.clear()
        self._trainings.put(run)

    def _run_trainings(self) -> None:
        while True:
            training = self._trainings.get()
            try:
                training()
            except BaseException:  # noqa: BLE001 -- the thread must outlive it, or the next join() would wait forever
                logger.exception("respec learner: the overlapped training was interrupted")
            finally:
                self._idle.set()

    def _record(self, step: int, sequences: list[SequenceFeatures]) -> None:
        """``learner.record_dir``: this rank's features of the step, for offline learner comparisons."""
        self.record_dir.mkdir(parents=True, exist_ok=True)
        torch.save([dataclasses.asdict(s) for s in sequences],
                   self.record_dir / f"step_{step:04d}_rank{self.rank}.pt")

    # ----- publication --------------------------------------------------------------------------------------

    async def publish(self, pusher: DrafterPusher, *, resync: bool) -> None:
        """In the weight sync: publish the pending candidate if it passed its checks, and (``resync``: the engine
        slept and lost its drafter; or the engine serves another version) push the serving drafter again."""
        start = time.perf_counter()
        candidate, self._pending = self._pending, None
        try:
            version = self.learner.next_version(candidate) if candidate is not None else None
            refused = None
            if version is not None:
                refused = await pusher.push_drafter(self.learner.candidate_weights(), version)
                refused = self.learner.agree(refused)
            if candidate is not None:
                self._metrics = self.learner.settle(candidate, refused)
            if version is not None and refused is None:
                self.engine_version = version
            elif resync or refused is not None or self.engine_version != self.learner.serving_version:
                await self._push_serving(pusher)
        except Exception:  # noqa: BLE001 -- the engine keeps whatever it served; the next sync tries again
            logger.exception("respec learner: drafter publication failed; the engine keeps its drafter")
            self.engine_version = -1
        self._publish_s = time.perf_counter() - start
        self._start_scheduled()

    async def _push_serving(self, pusher: DrafterPusher) -> None:
        version = self.learner.serving_version
        refused = self.learner.agree(await pusher.push_drafter(self.learner.serving_weights(), version))
        self.engine_version = version if refused is None else -1
        if refused is not None:
            logger.error("respec learner: the engine refused the serving drafter v%d: %s", version, refused)

    def status(self) -> dict[str, float]:
        """The last publication's ``respec/learner/*`` metrics (counters, versions, push time; with overlap, also the
        published candidate's training metrics and the wait for its training)."""
        train_metrics, self._train_metrics = self._train_metrics, {}
        publication, self._metrics = self._metrics, {}
        return {**train_metrics, **publication, METRIC_PREFIX + "publish_s": self._publish_s,
                METRIC_PREFIX + "wait_s": self._wait_s, METRIC_PREFIX + "engine_version": float(self.engine_version),
                METRIC_PREFIX + "published_version": float(self.learner.serving_version),
                METRIC_PREFIX + "rejected_versions": float(self.learner.rejected_versions)}

    # ----- checkpoint ---------------------------------------------------------------------------------------

    def save(self, directory: Path) -> None:
        """The learner (serving drafter, optimizer, counters) and a candidate trained but not yet published, which
        a resumed run publishes at its first weight sync (with overlap: rows not yet trained on are not saved)."""
        self.join()
        self.learner.save(directory, self._pending)

    def restore(self, directory: Path) -> None:
        self._pending = self.learner.load(directory)

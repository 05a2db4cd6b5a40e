"""The learner inside verl's v1 trainer (driver side): built when training begins, run after each step's actor
update and weight sync, publishing to the live replicas before the next rollout, saved with verl's checkpoints.

Overlapped mode (``learner.overlap``) trains during the actor update instead, in one background thread of the driver:
on the step's trajectories with the actor that generated them (fetched just before verl updates it), so the drafter
distills the actor one update behind; the candidate is still checked, and published only after the weight sync.

:class:`respec_plugin.integrations.verl.trainer.ReSpecTrainerMixin` calls it; this module only needs the trainer's config, worker
group, replicas and step counter, so the mixin stays a thin hook list.
"""

from __future__ import annotations

import copy
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor

from respec_plugin.core.config import ReSpecConfig
from respec_plugin.core.drafter.eagle3 import vllm_weights
from respec_plugin.core.drafter.io import load_drafter
from respec_plugin.integrations.verl.learner_features import (
    ActorMirror,
    Trajectories,
    fetch_actor_state_dict,
    record_step,
    refreshed_features,
    step_features,
    trajectories_from_transfer_queue,
)
from respec_plugin.core.learner.loop import Candidate, OnlineLearner
from respec_plugin.integrations.verl.hotswap import drafter_versions, publish_drafter
from respec_plugin.integrations.verl.trainer_view import TrainerView
from respec_plugin.core.checkpoint_files import restore_folder, written_atomically

logger = logging.getLogger(__name__)

# Sub-directory of verl's ``global_step_<n>`` checkpoint folder holding the learner's state.
CHECKPOINT_SUBDIR = "respec_learner"


class LearnerHook:
    """One online learner for one verl trainer."""

    def __init__(self, trainer: TrainerView, respec: ReSpecConfig):
        self.config = respec.learner
        self.trainer = trainer
        self.actor = ActorMirror(trainer.actor_model_path)
        embed = self.actor.model.get_input_embeddings().weight
        initial = load_drafter(respec.drafter_path, embed)[0] if self.config.compare_with_initial else None
        # fit() has already advanced global_steps past the checkpointed step when training begins.
        resumed_step = trainer.global_step - 1
        resumed = restore_folder(trainer.resumed_folder(resumed_step), resumed_step, CHECKPOINT_SUBDIR)
        if resumed is not None:
            resume_dir = resumed / CHECKPOINT_SUBDIR
            self.learner = OnlineLearner.restore(self.config, resume_dir, embed, initial=initial)
            logger.info("respec learner restored from %s: drafter v%d", resume_dir, self.learner.serving_version)
            # The engines started from drafter_path (v0): serve the restored version again.
            report = self._publish(vllm_weights(self.learner.drafter), self.learner.serving_version)
            if not report.ok:
                raise RuntimeError(f"restored drafter v{report.version} was refused by the engine: {report.errors}")
        else:
            drafter = copy.deepcopy(initial) if initial is not None else load_drafter(respec.drafter_path, embed)[0]
            # Number versions after what the engines serve (they load drafter_path as v0, whatever its config says).
            serving = max(drafter_versions(trainer.replicas))
            self.learner = OnlineLearner(self.config, drafter, serving, seed=trainer.seed, initial=initial)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="respec-learner") if self._overlaps() else None
        self._pending: Future | None = None  # overlapped mode: the candidate being trained during the actor update
        self._fetch_s = 0.0  # overlapped mode: seconds the fetch before the actor update held up the RL step

    def _overlaps(self) -> bool:
        """Overlapped mode needs one actor update per step: with several (``parameter_sync_step`` > 1), the step's
        trajectories are not all generated when the first update starts."""
        if not self.config.overlap:
            return False
        if self.trainer.parameter_sync_step > 1:
            logger.warning("respec learner: learner.overlap needs one actor update per RL step, this trainer runs %d "
                           "(parameter_sync_step); the learner runs after the update instead",
                           self.trainer.parameter_sync_step)
            return False
        return True

    def _publish(self, weights, version: int):
        return publish_drafter(self.trainer.replicas, weights, version)

    def _due(self) -> bool:
        return self.trainer.global_step % self.config.every_n_steps == 0

    def before_actor_update(self, batch) -> None:
        """Overlapped mode (``learner.overlap``): fetch the actor that generated the step's trajectories, before
        verl updates it, and train the drafter on them in a background thread while the actor update runs."""
        if self._executor is None or not self._due():
            return
        start = time.perf_counter()
        try:
            actor_state = fetch_actor_state_dict(self.trainer.actor_workers)
            trajectories = trajectories_from_transfer_queue(batch)
        except Exception:  # noqa: BLE001 -- after_step then learns the sequential way (and counts it if it fails)
            logger.exception("respec learner: could not read the step's actor and trajectories before the actor "
                             "update; learning after it instead")
            return
        self._pending = self._executor.submit(self._train_candidate, actor_state, trajectories)
        self._fetch_s = time.perf_counter() - start

    def after_step(self, batch) -> dict[str, float]:
        """Publish this step's candidate drafter (overlapped mode: the one the background thread trained; else
        train one now on the step's trajectories with the updated actor); returns metrics."""
        if not self._due():
            return {}
        start = time.perf_counter()
        pending, self._pending = self._pending, None
        try:
            if pending is not None:
                candidate, train_s = pending.result()
            else:
                self._fetch_s = 0.0
                candidate, train_s = self._train_candidate(fetch_actor_state_dict(self.trainer.actor_workers),
                                                           trajectories_from_transfer_queue(batch))
        except Exception:  # noqa: BLE001 -- a learner failure must not stop RL training; the last version serves
            logger.exception("respec learner: could not build this step's features; drafter v%d keeps serving",
                             self.learner.serving_version)
            self.learner.rejected_versions += 1
            return {"respec/learner/published_version": float(self.learner.serving_version),
                    "respec/learner/rejected_versions": float(self.learner.rejected_versions)}
        publish_start = time.perf_counter()
        metrics = self.learner.publish(candidate, self._publish)
        end = time.perf_counter()
        # The part of the learner's cost the RL step waited for (overlapped: the fetch before the actor update,
        # then what was left of training, and the publish), and its whole cost (weight fetch, actor forward, KD
        # steps, publish); they are equal when learning follows the actor update.
        metrics["respec/learner/blocking_s"] = self._fetch_s + end - start
        metrics["respec/learner/time_s"] = (
            end - start if pending is None else self._fetch_s + train_s + end - publish_start
        )
        return metrics

    def _train_candidate(self, actor_state: dict, trajectories: Trajectories) -> tuple[Candidate, float]:
        """A trained, checked candidate from the step's trajectories under ``actor_state``, and the seconds taken."""
        start = time.perf_counter()
        self.actor.load(actor_state)
        self.learner.set_embed_tokens(self.actor.model.get_input_embeddings().weight)
        if self.config.record_dir:
            record_step(self.config.record_dir, self.trainer.global_step, actor_state, trajectories)
        sequences = step_features(self.actor.model, self.learner.drafter, trajectories, top_k=self.config.top_k,
                                  reward_weighting=self.config.reward_weighting, weight_floor=self.config.weight_floor)
        if self.config.refresh_replay:
            self.learner.refresh_targets(lambda replayed: refreshed_features(
                self.actor.model, self.learner.drafter, replayed, top_k=self.config.top_k))
        return self.learner.train_candidate(sequences), time.perf_counter() - start

    def save_if_due(self) -> None:
        """Into verl's checkpoint folder of this step, when verl saved one this step (after this step's learning,
        which runs after verl's save, so a resume starts from the drafter the next rollout served)."""
        folder = self.trainer.step_folder()
        if self.trainer.saved_this_step and folder.is_dir():
            with written_atomically(folder / CHECKPOINT_SUBDIR) as partial:
                partial.mkdir()
                self.learner.save(partial)

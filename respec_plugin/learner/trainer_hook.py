"""The learner inside verl's v1 trainer (driver side): built when training begins, run after each step's actor
update and weight sync, publishing to the live replicas before the next rollout, saved with verl's checkpoints.

:class:`respec_plugin.trainer.ReSpecTrainerMixin` calls it; this module only needs the trainer's config, worker
group, replicas and step counter, so the mixin stays a thin hook list.
"""

from __future__ import annotations

import copy
import logging
import time

from respec_plugin.config import ReSpecConfig
from respec_plugin.drafter.eagle3 import vllm_weights
from respec_plugin.drafter.io import load_drafter
from respec_plugin.learner.features import (
    ActorMirror,
    fetch_actor_state_dict,
    record_step,
    refreshed_features,
    step_features,
    trajectories_from_transfer_queue,
)
from respec_plugin.learner.loop import OnlineLearner
from respec_plugin.rollout.hotswap import drafter_versions, publish_drafter
from respec_plugin.verl_checkpoint import restore_folder, save_due, step_folder, written_atomically

logger = logging.getLogger(__name__)

# Sub-directory of verl's ``global_step_<n>`` checkpoint folder holding the learner's state.
CHECKPOINT_SUBDIR = "respec_learner"


class LearnerHook:
    """One online learner for one verl trainer."""

    def __init__(self, trainer, respec: ReSpecConfig):
        self.config = respec.learner
        self.trainer = trainer
        self.actor = ActorMirror(trainer.config.actor_rollout_ref.model.path)
        embed = self.actor.model.get_input_embeddings().weight
        initial = load_drafter(respec.drafter_path, embed)[0] if self.config.compare_with_initial else None
        # fit() has already advanced global_steps past the checkpointed step when training begins.
        resumed = restore_folder(trainer.config.trainer, trainer.global_steps - 1, CHECKPOINT_SUBDIR)
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
            serving = max(drafter_versions(trainer.llm_server_manager.get_replicas()))
            self.learner = OnlineLearner(self.config, drafter, serving, seed=trainer.config.data.get("seed", 0) or 0,
                                         initial=initial)

    def _publish(self, weights, version: int):
        return publish_drafter(self.trainer.llm_server_manager.get_replicas(), weights, version)

    def after_step(self, batch) -> dict[str, float]:
        """Train on the step's trajectories with the updated actor's features and publish; returns metrics."""
        if self.trainer.global_steps % self.config.every_n_steps:
            return {}
        start = time.perf_counter()
        try:
            actor_state = fetch_actor_state_dict(self.trainer.actor_rollout_wg)
            self.actor.load(actor_state)
            self.learner.set_embed_tokens(self.actor.model.get_input_embeddings().weight)
            trajectories = trajectories_from_transfer_queue(batch)
            if self.config.record_dir:
                record_step(self.config.record_dir, self.trainer.global_steps, actor_state, trajectories)
            sequences = step_features(self.actor.model, self.learner.drafter, trajectories, top_k=self.config.top_k,
                                      reward_weighting=self.config.reward_weighting,
                                      weight_floor=self.config.weight_floor)
            if self.config.refresh_replay:
                self.learner.refresh_targets(lambda replayed: refreshed_features(
                    self.actor.model, self.learner.drafter, replayed, top_k=self.config.top_k))
        except Exception:  # noqa: BLE001 -- a learner failure must not stop RL training; the last version serves
            logger.exception("respec learner: could not build this step's features; drafter v%d keeps serving",
                             self.learner.serving_version)
            self.learner.rejected_versions += 1
            return {"respec/learner/published_version": float(self.learner.serving_version),
                    "respec/learner/rejected_versions": float(self.learner.rejected_versions)}
        metrics = self.learner.step(sequences, self._publish)
        # The whole learner cost of the step: weight fetch, actor forward, KD steps and publish.
        metrics["respec/learner/time_s"] = time.perf_counter() - start
        return metrics

    def save_if_due(self) -> None:
        """Into verl's checkpoint folder of this step, when verl saved one this step (after this step's learning,
        which runs after verl's save, so a resume starts from the drafter the next rollout served)."""
        folder = step_folder(self.trainer.config.trainer, self.trainer.global_steps)
        if save_due(self.trainer) and folder.is_dir():
            with written_atomically(folder / CHECKPOINT_SUBDIR) as partial:
                partial.mkdir()
                self.learner.save(partial)

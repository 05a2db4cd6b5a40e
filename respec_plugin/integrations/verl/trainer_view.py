"""The one place respec reads verl trainer state: the learner, the tuner and the trainer mixin get a
:class:`TrainerView` instead of the trainer, so a verl upgrade that moves these attributes changes this file only."""

from __future__ import annotations

import os
from pathlib import Path

from respec_plugin.core.checkpoint_files import step_folder


class TrainerView:
    """What respec needs of a verl v1 trainer (``verl/trainer/ppo/v1/trainer_base.py:PPOTrainer``)."""

    def __init__(self, trainer):
        self._trainer = trainer

    @property
    def replicas(self) -> list:
        """The rollout replicas (respec's ``ReSpecReplica``s); each one's ``server_handle`` owns its engine."""
        return self._trainer.llm_server_manager.get_replicas()

    @property
    def actor_worker_group(self):
        """verl's actor (+ rollout) worker group."""
        return self._trainer.actor_rollout_wg

    @property
    def actor_workers(self) -> list:
        """The Ray actor handles of the actor worker group, one per rank."""
        return self._trainer.actor_rollout_wg._workers

    @property
    def global_step(self) -> int:
        """The step being trained (verl counts from 1; before training begins, the step it resumed from)."""
        return self._trainer.global_steps

    @property
    def is_last_step(self) -> bool:
        return self._trainer.global_steps >= self._trainer.total_training_steps

    @property
    def parameter_sync_step(self) -> int:
        """Actor updates per RL step (verl's v1 ``parameter_sync_step``)."""
        return self._trainer.parameter_sync_step

    @property
    def saved_this_step(self) -> bool:
        """Whether verl wrote its checkpoint of the current step (verl's own decision, recorded by the mixin)."""
        return getattr(self._trainer, "_respec_saved_step", None) == self._trainer.global_steps

    @property
    def actor_model_path(self) -> str:
        return self._trainer.config.actor_rollout_ref.model.path

    @property
    def seed(self) -> int:
        return self._trainer.config.data.get("seed", 0) or 0

    @property
    def checkpoint_root(self) -> Path:
        """``trainer.default_local_dir``, absolute (verl resolves a relative one against the cwd)."""
        return Path(os.path.abspath(self._trainer.config.trainer.default_local_dir))

    def step_folder(self, global_step: int | None = None) -> Path:
        """verl's checkpoint folder of ``global_step`` (default: the current step)."""
        return step_folder(self.checkpoint_root, self._trainer.global_steps if global_step is None else global_step)

    def resumed_folder(self, resumed_step: int) -> Path | None:
        """The folder verl restored step ``resumed_step`` from: ``trainer.resume_from_path`` or the step's folder
        (``resume_mode=auto`` takes the latest one); None when verl started from scratch (step 0)."""
        if resumed_step < 1:
            return None
        trainer_config = self._trainer.config.trainer
        if trainer_config.resume_mode == "resume_path":
            return Path(os.path.abspath(trainer_config.resume_from_path))
        return self.step_folder(resumed_step)

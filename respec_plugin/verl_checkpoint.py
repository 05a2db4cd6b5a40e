"""Where verl's checkpoint of a step lives and when verl writes one: the learner and the tuner save their state
inside verl's ``global_step_<n>`` folder and restore it from the folder verl resumed from, so they must agree with
verl (``PPOTrainer._save_checkpoint`` / ``_load_checkpoint`` in verl/trainer/ppo/v1/trainer_base.py)."""

from __future__ import annotations

import os
from pathlib import Path


def step_folder(trainer_config, global_step: int) -> Path:
    """``<trainer.default_local_dir>/global_step_<n>``, absolute (verl resolves a relative dir against the cwd)."""
    return Path(os.path.abspath(trainer_config.default_local_dir)) / f"global_step_{global_step}"


def resumed_folder(trainer_config, resumed_step: int) -> Path | None:
    """The folder verl restored step ``resumed_step`` from: ``trainer.resume_from_path`` or the step's folder
    (``resume_mode=auto`` takes the latest one); None when verl started from scratch (step 0)."""
    if resumed_step < 1:
        return None
    if trainer_config.resume_mode == "resume_path":
        return Path(os.path.abspath(trainer_config.resume_from_path))
    return step_folder(trainer_config, resumed_step)


def save_due(trainer) -> bool:
    """verl's own condition for saving a checkpoint at the trainer's current step."""
    save_freq = trainer.config.trainer.save_freq
    is_last = trainer.global_steps >= trainer.total_training_steps
    return save_freq > 0 and (is_last or trainer.global_steps % save_freq == 0)

"""Where verl's checkpoint of a step lives and when verl writes one: the learner and the tuner save their state
inside verl's ``global_step_<n>`` folder and restore it from the folder verl resumed from, so they must agree with
verl (``PPOTrainer._save_checkpoint`` / ``_load_checkpoint`` in verl/trainer/ppo/v1/trainer_base.py).

verl writes ``latest_checkpointed_iteration.txt`` at the end of ``_save_checkpoint``, and respec's state of that
step is written later in the step (the learner trains after verl's save). A run killed in between resumes from a
folder without respec's state: :func:`restore_folder` then falls back to the newest earlier step that has it.
respec writes its state under a temporary name and renames it into place, so a folder has all of it or none.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)
STEP_PREFIX = "global_step_"


def step_folder(trainer_config, global_step: int) -> Path:
    """``<trainer.default_local_dir>/global_step_<n>``, absolute (verl resolves a relative dir against the cwd)."""
    return Path(os.path.abspath(trainer_config.default_local_dir)) / f"{STEP_PREFIX}{global_step}"


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


def restore_folder(trainer_config, resumed_step: int, name: str) -> Path | None:
    """The step folder to restore respec's state ``name`` from: the folder verl resumed from when it has it, else
    the newest earlier ``global_step_<n>`` beside it that does (one or more steps staler, but still learnt, which
    beats starting over); None when verl started from scratch or no folder has it."""
    resumed = resumed_folder(trainer_config, resumed_step)
    if resumed is None:
        return None
    if (resumed / name).exists():
        return resumed
    earlier = []
    for folder in resumed.parent.glob(f"{STEP_PREFIX}*"):
        step = folder.name.removeprefix(STEP_PREFIX)
        if step.isdigit() and int(step) < resumed_step and (folder / name).exists():
            earlier.append((int(step), folder))
    if not earlier:
        return None
    step, folder = max(earlier)
    logger.warning("respec: %s has no %s (the run stopped between verl's checkpoint and respec's); restoring it "
                   "from step %d instead", resumed, name, step)
    return folder


@contextlib.contextmanager
def written_atomically(path: Path) -> Iterator[Path]:
    """Yields a temporary sibling of ``path`` to write into (a file or a directory), renamed to ``path`` when the
    block ends without error: a run killed mid-save leaves the previous ``path``, never half of one. A file is
    replaced in one rename; a directory saved again (the same step) in two, the old one moved aside first, so only
    a kill between those two renames leaves none (resume then restores the step before, ``restore_folder``)."""
    partial = path.with_name(path.name + ".partial")
    _remove(partial)
    yield partial
    if path.is_dir():  # os.replace cannot replace a non-empty directory
        stale = path.with_name(path.name + ".stale")
        _remove(stale)
        os.replace(path, stale)
        os.replace(partial, path)
        _remove(stale)
    else:
        os.replace(partial, path)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()

"""respec's state inside a trainer's step checkpoint folders: where a step's folder is, which folder to restore from,
and writes that leave a folder with all of respec's state or none of it.

The trainer checkpoints into ``<checkpoint root>/global_step_<n>``; respec's state of that step lives inside it. A
resumed run restores respec's state from the folder the trainer resumed from, or, when that folder lacks it (a run
stopped between the trainer's checkpoint and respec's), from the newest earlier step folder that has it.
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
# respec's state in a step folder: the tuners' (one file, written by the trainer) and the learner's (one folder,
# written by the actor ranks).
TUNER_STATE_FILE = "respec_tuner.json"
LEARNER_STATE_DIR = "respec_learner"
# The trainer's own checkpoint of the actor in a step folder; respec's state is pruned with it.
ACTOR_DIR = "actor"
# verl's marker in the checkpoint root: the step its latest complete checkpoint holds.
LATEST_STEP_FILE = "latest_checkpointed_iteration.txt"


def step_folder(checkpoint_root: str | os.PathLike[str], global_step: int) -> Path:
    """``<checkpoint_root>/global_step_<n>``, absolute (a relative root is resolved against the cwd)."""
    return Path(os.path.abspath(checkpoint_root)) / f"{STEP_PREFIX}{global_step}"


def latest_checkpointed_step(checkpoint_root: str | os.PathLike[str]) -> int | None:
    """The step verl's ``latest_checkpointed_iteration.txt`` in ``checkpoint_root`` names as the checkpoint to resume
    from (None before the first checkpoint, or when the file names no step)."""
    try:
        text = (Path(os.path.abspath(checkpoint_root)) / LATEST_STEP_FILE).read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


def restore_folder(resumed: Path | None, resumed_step: int, name: str) -> Path | None:
    """The step folder to restore respec's state ``name`` from: ``resumed`` (the folder the trainer resumed step
    ``resumed_step`` from) when it has it, else the newest earlier ``global_step_<n>`` beside it that does (one or
    more steps staler, but still learnt, which beats starting over); None when the trainer started from scratch
    (``resumed`` is None) or no folder has it."""
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
    logger.warning("respec: %s has no %s (the run stopped between the trainer's checkpoint and respec's); restoring "
                   "it from step %d instead", resumed, name, step)
    return folder


def prune_orphaned_state(checkpoint_root: str | os.PathLike[str]) -> list[Path]:
    """Remove respec's state from step folders whose actor checkpoint the trainer has removed (verl's
    ``max_actor_ckpt_to_keep`` deletes only its own ``actor`` folder), and such folders once empty, so respec's files
    follow the trainer's retention instead of growing with every checkpoint; returns the folders pruned."""
    pruned = []
    for folder in Path(os.path.abspath(checkpoint_root)).glob(f"{STEP_PREFIX}*"):
        if not folder.is_dir() or (folder / ACTOR_DIR).exists():
            continue
        state = [folder / name for name in (TUNER_STATE_FILE, LEARNER_STATE_DIR) if (folder / name).exists()]
        for path in state:
            _remove(path)
        if state:
            pruned.append(folder)
        if not any(folder.iterdir()):
            folder.rmdir()
    return pruned


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

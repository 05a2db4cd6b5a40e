"""Driver-side calls to every respec replica's tuner: update between RL steps, save and restore with verl
checkpoints (one JSON file per checkpoint folder, one state per replica)."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

import ray

from respec_plugin.core.checkpoint_files import TUNER_STATE_FILE, written_atomically


def update_tuners(replicas) -> dict[str, float]:
    """Update every replica's tuner; ``respec/tuner/*`` metrics averaged over the replicas that reported them."""
    reports = ray.get([replica.server_handle.tuner_update.remote() for replica in replicas])
    values: dict[str, list[float]] = defaultdict(list)
    for report in reports:
        for key, value in report.items():
            values[key].append(value)
    return {key: sum(v) / len(v) for key, v in values.items()}


def save_tuners(replicas, checkpoint_folder: str | os.PathLike[str]) -> None:
    states = ray.get([replica.server_handle.tuner_state.remote() for replica in replicas])
    os.makedirs(checkpoint_folder, exist_ok=True)
    with written_atomically(Path(checkpoint_folder) / TUNER_STATE_FILE) as partial:
        partial.write_text(json.dumps(states))


def load_tuners(replicas, checkpoint_folder: str | os.PathLike[str]) -> bool:
    """Restore the saved states (replica i from state i, extra replicas from the first); False if none saved."""
    path = os.path.join(checkpoint_folder, TUNER_STATE_FILE)
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        states = [s for s in json.load(f) if s is not None]
    if not states:
        return False
    ray.get([replica.server_handle.load_tuner_state.remote(states[i] if i < len(states) else states[0])
             for i, replica in enumerate(replicas)])
    return True

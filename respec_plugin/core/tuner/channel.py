"""The wire contract between the respec server (tuner) and its vLLM engine-core process (scheduler): the engine
arguments that switch respec's scheduler on, and the file channel that carries schedules in and step records out.

The schedule goes in (``schedule.json``, replaced atomically), with an optional alternate schedule that the
scheduler runs in every other block of steps (the tuner's paired trials); measured engine steps come out
(``steps.jsonl``, appended by the scheduler, taken by the server with an atomic rename). Files work wherever the
engine core runs next to the server, which vLLM guarantees for the ``AsyncLLM`` it spawns, and need no vLLM API
(none reaches the scheduler at run time: ``collective_rpc`` goes to the workers). This module imports nothing from
vLLM.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import NamedTuple

# vLLM's ``scheduler_cls`` that reads this channel, and the ``additional_config`` keys it (and the k = 0 skip) read.
SCHEDULER_CLS = "respec_plugin.integrations.vllm.scheduler.ReSpecScheduler"
CONTROL_DIR_KEY = "respec_tuner_dir"
RECORD_STEPS_KEY = "respec_record_steps"
K0_SKIPS_DRAFTER_KEY = "respec_k0_skips_drafter"
# The version of the k = 0 schedule the acceptance watchdog installs (the tuner's versions count up from 0).
SPECULATION_OFF_VERSION = -2

SCHEDULE_FILE = "schedule.json"
STEPS_FILE = "steps.jsonl"

# [(batch_start, batch_end, k), ...]: vLLM's ``num_speculative_tokens_per_batch_size`` (inclusive ranges).
Schedule = list[tuple[int, int, int]]


@dataclass(frozen=True)
class StepRecord:
    """One engine step as the scheduler saw it."""

    # Requests scheduled in this step.
    batch_size: int
    # Speculative tokens the schedule asked the drafter to propose in this step (for the next one).
    k: int
    # Draft tokens verified in this step (proposed in the previous step) and all tokens the target ran on.
    num_draft_tokens: int
    num_scheduled_tokens: int
    # Tokens the step produced (accepted drafts + one bonus/sampled token per request).
    num_generated_tokens: int
    # Wall time of the step, from the previous step's end (or this step's start after idling) to its end.
    duration_s: float
    end_time: float
    # Version of the installed schedule (-1: the one the engine started with).
    schedule_version: int
    # Whether the step ran the installed alternate schedule (a trial block) rather than the main one.
    alternate: bool = False

    @property
    def is_decode(self) -> bool:
        """Only decode steps (no prompt tokens) tell what k costs; prefill steps are dominated by prompts."""
        return self.num_scheduled_tokens == self.batch_size + self.num_draft_tokens


class Installed(NamedTuple):
    """What :func:`write_schedule` installed; ``alternate`` is None when there is no trial to alternate with."""

    schedule: Schedule
    version: int
    alternate: Schedule | None = None


def write_schedule(control_dir: str, schedule: Schedule, version: int, alternate: Schedule | None = None) -> None:
    """Install ``schedule`` (and ``alternate``, run in every other block of steps) for the scheduler to pick up at
    its next step (atomic: never half-read)."""
    tmp = os.path.join(control_dir, f".{SCHEDULE_FILE}.{os.getpid()}")
    data = {"version": version, "schedule": [list(entry) for entry in schedule]}
    if alternate is not None:
        data["alternate"] = [list(entry) for entry in alternate]
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, os.path.join(control_dir, SCHEDULE_FILE))


def read_schedule(control_dir: str) -> Installed:
    with open(os.path.join(control_dir, SCHEDULE_FILE)) as f:
        data = json.load(f)

    def entries(schedule: list) -> Schedule:
        return [tuple(int(x) for x in entry) for entry in schedule]

    alternate = data.get("alternate")
    return Installed(entries(data["schedule"]), int(data["version"]), None if alternate is None else entries(alternate))


def schedule_stamp(control_dir: str) -> tuple[int, int, int] | None:
    """Changes whenever :func:`write_schedule` ran (each write is a new file); None before the first one."""
    try:
        st = os.stat(os.path.join(control_dir, SCHEDULE_FILE))
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def append_steps(control_dir: str, records: list[StepRecord]) -> None:
    """Append records in one O_APPEND write, so a concurrent :func:`take_steps` never sees a torn line."""
    payload = "".join(json.dumps(asdict(r)) + "\n" for r in records).encode()
    fd = os.open(os.path.join(control_dir, STEPS_FILE), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, payload)
    finally:
        os.close(fd)


def take_steps(control_dir: str) -> list[StepRecord]:
    """All step records written since the last call (the file is moved away, then read)."""
    path = os.path.join(control_dir, STEPS_FILE)
    taken = path + ".taken"
    try:
        os.replace(path, taken)
    except FileNotFoundError:
        return []
    with open(taken) as f:
        lines = f.read().splitlines()
    os.remove(taken)
    return [StepRecord(**json.loads(line)) for line in lines if line.strip()]

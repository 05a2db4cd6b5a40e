"""The GRPO run the learner, tuner and resume end-to-end tests share (one pair of runs per session, fixtures
``killed_run`` / ``resumed_run`` in tests/conftest.py; CPU runs are minutes each, so all of them read the same two).

Stock verl GRPO on the tiny lab with ``rollout.name=respec``, the online learner (from the day-0 drafter) and the
adaptive k tuner on, ``TOTAL_STEPS`` steps with a checkpoint at ``SAVE_STEP``. The first run is SIGKILLed, whole
(driver, Ray's cluster, vLLM engines), right after it logs step ``SAVE_STEP``; the second is the same command in
the same experiment directory, and verl's ``trainer.resume_mode=auto`` resumes it from that checkpoint.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

from respec_lab.launch import RunResult, grpo_command, respec_overrides, run_logged

SAVE_STEP = 3
TOTAL_STEPS = SAVE_STEP + 1
TRAIN_BATCH_SIZE = 4
N = 4
# Sequences a rollout runs at once: the largest batch size the tuner's schedule can meet.
SEQUENCES = TRAIN_BATCH_SIZE * N
DEFAULT_K = 3
K_MAX = 4
# Settles k within the few steps CI can afford: explore often, trust a (bucket, k) after 2 decode steps.
TUNER = {"mode": "adaptive", "k_max": K_MAX, "explore": 0.5, "min_steps": 2}
# The uniform ablation (every step has trajectories to learn from whatever the rewards), from the untrained day-0
# drafter: a warm drafter on an actor that barely moves in 3 steps gains nothing, so its candidates would rightly
# fail the held-out check and no version would be published.
# Trained after the actor update (not learner.overlap, the default), so that each step's version and the checkpoint's
# pending candidate are that step's; the two-rank run of tests/e2e/test_trainer_learner.py runs the default.
LEARNER = {"enable": True, "steps_per_rl_step": 4, "learning_rate": 3e-3, "reward_weighting": "uniform",
           "overlap": False}


@dataclasses.dataclass(frozen=True)
class LabRun:
    experiment_dir: Path
    result: RunResult
    # The run's TMPDIR (its processes' temporary files, respec's control directories among them).
    tmp_dir: Path

    @property
    def checkpoints(self) -> Path:
        """verl's ``trainer.default_local_dir`` (as ``grpo_command`` sets it)."""
        return self.experiment_dir.resolve() / "checkpoints"


def record_dir(experiment_dir: Path) -> Path:
    """Where the runs' learner records each step (``learner.record_dir``)."""
    return experiment_dir.resolve() / "learner_record"


def run(lab, experiment_dir: Path, log_name: str, kill_after_step: int | None = None) -> LabRun:
    argv, env = grpo_command(
        lab.train_parquet,
        lab.val_parquet,
        lab.actor_dir,
        experiment_dir=experiment_dir,
        rollout_name="respec",
        total_steps=TOTAL_STEPS,
        train_batch_size=TRAIN_BATCH_SIZE,
        n=N,
        max_response_length=48,
        extra_overrides=[
            *respec_overrides(
                drafter_path=lab.day0_drafter_dir, num_speculative_tokens=DEFAULT_K, tuner=TUNER,
                learner={**LEARNER, "record_dir": str(record_dir(experiment_dir))},
            ),
            f"trainer.save_freq={SAVE_STEP}",
            "trainer.resume_mode=auto",
        ],
    )
    tmp_dir = experiment_dir.resolve() / f"tmp-{Path(log_name).stem}"
    tmp_dir.mkdir(parents=True)
    # Ray keeps its usual directory (its socket paths must stay short); everything else of the run uses tmp_dir.
    env = {**env, "TMPDIR": str(tmp_dir), "RAY_TMPDIR": tempfile.gettempdir()}
    result = run_logged(argv, env, experiment_dir / log_name, timeout_s=1200, kill_after_step=kill_after_step)
    return LabRun(experiment_dir, result, tmp_dir)

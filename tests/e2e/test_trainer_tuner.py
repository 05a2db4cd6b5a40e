"""End to end: the adaptive k tuner in stock verl GRPO (the shared learner + tuner run of tests/grpo_runs.py):
``respec/tuner/*`` metrics every step, each rollout runs the schedule installed after the previous step, the state
is saved with verl's checkpoint after the step's update, and the run killed after that checkpoint resumes from it."""

import json
import math

import pytest

pytest.importorskip("vllm")

from respec_plugin.core.config import TunerConfig  # noqa: E402
from respec_plugin.core.checkpoint_files import TUNER_STATE_FILE  # noqa: E402
from tests.e2e.grpo_runs import DEFAULT_K, K_MAX, SAVE_STEP, SEQUENCES, TOTAL_STEPS, TUNER  # noqa: E402

BUCKET_PREFIX = "respec/tuner/k_by_bucket/"
TRIAL_PREFIX = "respec/tuner/trial_k_by_bucket/"


def _k_by_bucket(metrics: dict[str, float], prefix: str = BUCKET_PREFIX) -> dict[tuple[int, int], float]:
    """``<prefix><lo>-<hi>`` metrics (the installed k per bucket, or the trials' challengers) as {(lo, hi): k}."""
    buckets = {}
    for key, k in metrics.items():
        if key.startswith(prefix):
            lo, hi = key.removeprefix(prefix).split("-")
            buckets[(int(lo), int(hi))] = k
    return buckets


def _saved_state(run, step: int) -> dict:
    (state,) = json.loads((run.checkpoints / f"global_step_{step}" / TUNER_STATE_FILE).read_text())  # one replica
    return state


def test_tuner_metrics_every_step_and_its_schedule_serves_the_next_rollout(killed_run, resumed_run):
    steps = {**killed_run.result.metrics, **resumed_run.result.metrics}
    assert sorted(steps) == list(range(1, TOTAL_STEPS + 1))
    for step, metrics in steps.items():
        assert 0.0 <= metrics["respec/tuner/k_mean"] <= K_MAX, step
        assert 0.0 <= metrics["respec/tuner/explore_frac"] <= 1.0, step
        buckets = _k_by_bucket(metrics)
        assert (1, 1) in buckets and all(k in range(K_MAX + 1) for k in buckets.values()), (step, buckets)
        error = metrics.get("respec/tuner/step_time_error", 0.0)
        assert math.isfinite(error) and error >= 0, step
    # Before the first update the engine runs the configured k everywhere, nothing explored.
    assert steps[1]["respec/tuner/k_mean"] == DEFAULT_K and steps[1]["respec/tuner/explore_frac"] == 0.0
    for step in range(2, TOTAL_STEPS + 1):
        # The rollout ran the ks installed after the previous step (the resumed step: the restored ones), and their
        # trials' challengers, for the batch sizes it can reach: its mean k lies between them.
        reachable = [k for prefix in (BUCKET_PREFIX, TRIAL_PREFIX)
                     for (lo, _), k in _k_by_bucket(steps[step - 1], prefix).items() if lo <= SEQUENCES]
        assert min(reachable) <= steps[step]["respec/tuner/k_mean"] <= max(reachable), (step, reachable)
        # Once the engine ran a second k the step-time model is calibrated, and judged on the next step.
        if steps[step]["respec/tuner/k_mean"] != DEFAULT_K and step < TOTAL_STEPS:
            assert "respec/tuner/step_time_error" in steps[step + 1], step
    # explore=0.5 tries other ks within these steps.
    assert any(steps[step]["respec/tuner/k_mean"] != DEFAULT_K for step in steps)


def test_tuner_state_saved_after_the_steps_update_and_restored_on_resume(killed_run, resumed_run):
    saved = _saved_state(killed_run, SAVE_STEP)
    # One update per RL step, and the checkpoint holds the state after step SAVE_STEP's own update ...
    assert saved["version"] == SAVE_STEP
    assert saved["choice"] == [_k_by_bucket(killed_run.result.metrics[SAVE_STEP])[tuple(r)] for r in saved["ranges"]]
    log = resumed_run.result.log_path.read_text(errors="replace")
    assert "respec tuner: no saved state" not in log
    # ... and the resumed run carries it on: its own checkpoint (written at its last step) is one update later and
    # still holds every (bucket, k) measured before the kill, decayed once by `forget`.
    resumed = _saved_state(resumed_run, TOTAL_STEPS)
    assert resumed["version"] == SAVE_STEP + 1
    forget = TunerConfig(**TUNER).forget
    resumed_steps = {(bucket, k): stats[2] for bucket, k, *stats in resumed["measured"]}
    for bucket, k, *stats in saved["measured"]:
        assert resumed_steps[(bucket, k)] >= forget * stats[2] - 1e-9, (bucket, k)


def test_control_directory_is_private_and_removed_when_the_run_ends(killed_run, resumed_run):
    # The SIGKILLed run could not clean up: its directory shows where and how the engine's control directory lives.
    (left,) = killed_run.tmp_dir.glob("respec-control-*")
    assert left.stat().st_mode & 0o777 == 0o700
    assert list(resumed_run.tmp_dir.glob("respec-control-*")) == []  # the finished run removed its own

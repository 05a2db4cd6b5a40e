"""End to end: stock verl GRPO with ``rollout.name=respec`` and the online learner switched on in the respec block
(the shared run of tests/grpo_runs.py, tuner on too): the learner trains between steps, its versions reach the
engine and serve the next rollout, metrics are logged and its state lands in verl's checkpoint folder; the run,
killed after that checkpoint and resumed, serves the restored drafter and continues its versions."""

import json
import signal

import pytest

pytest.importorskip("vllm")

from tests.grpo_runs import SAVE_STEP  # noqa: E402


def test_learner_publishes_versions_that_serve_the_next_rollout(killed_run):
    run = killed_run.result
    assert run.returncode == -signal.SIGKILL, f"verl exited {run.returncode} before the kill; log: {run.log_path}"
    assert sorted(run.metrics) == list(range(1, SAVE_STEP + 1))
    for step, metrics in run.metrics.items():
        for name in ("loss", "tv", "weight_mean", "time_s", "published_version", "rejected_versions"):
            assert f"respec/learner/{name}" in metrics, (step, name)
        assert 0.0 <= metrics["respec/learner/tv"] <= 1.0
        assert metrics["respec/learner/weight_mean"] == 1.0
        assert metrics["respec/learner/time_s"] > 0
        # Each step's rollout is served by the version the learner published after the previous step.
        previous = run.metrics.get(step - 1, {}).get("respec/learner/published_version", 0.0)
        assert metrics["respec/drafter_version"] == previous, step
    last = run.metrics[SAVE_STEP]
    assert last["respec/learner/published_version"] >= 1
    assert last["respec/learner/published_version"] + last["respec/learner/rejected_versions"] == SAVE_STEP
    assert last["respec/drafter_version"] >= 1
    saved = killed_run.checkpoints / f"global_step_{SAVE_STEP}" / "respec_learner"
    config = json.loads((saved / "drafter" / "config.json").read_text())
    assert config["drafter_version"] == last["respec/learner/published_version"]
    assert (saved / "learner_state.pt").is_file()


def test_resumed_run_serves_the_restored_drafter_and_continues_its_versions(killed_run, resumed_run):
    saved_version = int(killed_run.result.metrics[SAVE_STEP]["respec/learner/published_version"])
    saved = killed_run.checkpoints / f"global_step_{SAVE_STEP}" / "respec_learner"
    log = resumed_run.result.log_path.read_text(errors="replace")
    assert f"respec learner restored from {saved}: drafter v{saved_version}" in log
    metrics = resumed_run.result.metrics[SAVE_STEP + 1]
    # The first resumed rollout is served by the restored drafter (a fresh learner would serve drafter_path, v0).
    assert metrics["respec/drafter_version"] == saved_version
    # The counters carry on: one candidate per RL step since step 1, published or rejected (fresh: 1 in all).
    published = metrics["respec/learner/published_version"]
    assert published >= saved_version
    assert published + metrics["respec/learner/rejected_versions"] == SAVE_STEP + 1

"""End to end: stock verl GRPO with ``rollout.name=respec`` and the online learner switched on in the respec block
(the shared run of tests/grpo_runs.py, tuner on too): the learner trains between steps, its versions reach the
engine and serve the next rollout, metrics are logged and its state lands in verl's checkpoint folder; the run,
killed after that checkpoint and resumed, serves the restored drafter and continues its versions."""

import json
import signal

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402

from respec_plugin.learner.features import read_step  # noqa: E402
from tests.grpo_runs import SAVE_STEP, SEQUENCES, record_dir  # noqa: E402


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


def test_learner_records_each_steps_actor_and_trajectories(killed_run):
    """learner.record_dir: one file per learner step, holding the step's trajectories (their rewards are the ones
    verl logged for the step) and the actor weights that scored them (updated between steps)."""
    paths = sorted(record_dir(killed_run.experiment_dir).glob("step_*.pt"))[:SAVE_STEP]  # the resumed run adds more
    records = [read_step(path) for path in paths]
    assert [step for step, _, _ in records] == list(range(1, SAVE_STEP + 1))
    for step, _, trajectories in records:
        assert len(trajectories.token_ids) == SEQUENCES
        logged = killed_run.result.metrics[step]["critic/score/mean"]
        assert trajectories.rewards.mean().item() == pytest.approx(logged, abs=1e-6), step
        assert all(len(t) == p + len(m) for t, p, m in zip(trajectories.token_ids, trajectories.prompt_lengths,
                                                         trajectories.response_masks))
    first, second = records[0][1], records[1][1]
    assert first.keys() == second.keys()
    assert any(not torch.equal(first[name], second[name]) for name in first)  # the actor update in between

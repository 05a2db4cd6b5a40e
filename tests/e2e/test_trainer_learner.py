"""End to end: stock verl GRPO with ``rollout.name=respec`` and the online learner switched on in the respec block
(the shared run of tests/grpo_runs.py, tuner on too): the learner trains between steps, its versions reach the
engine and serve the next rollout, metrics are logged and its state lands in verl's checkpoint folder; the run,
killed after that checkpoint and resumed, serves the restored drafter and continues its versions. A second, short
run has the learner overlap the actor update (``learner.overlap``)."""

import json
import signal

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402

from safetensors.torch import load_file  # noqa: E402

from respec_lab.launch import grpo_command, respec_overrides, run_logged  # noqa: E402
from respec_plugin.integrations.verl.learner_features import read_step  # noqa: E402
from tests.e2e.grpo_runs import LEARNER, N, SAVE_STEP, SEQUENCES, TRAIN_BATCH_SIZE, record_dir  # noqa: E402

OVERLAPPED_STEPS = 2


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


@pytest.fixture(scope="module")
def overlapped_run(tiny_lab, tmp_path_factory):
    """The shared runs' learner with ``overlap`` on (tuner off), for two steps. An entropy bonus gives the actor a
    gradient at every step, so step 1's update changes it even when all of step 1's rewards are equal."""
    experiment_dir = tmp_path_factory.mktemp("grpo_learner_overlap")
    learner = {**LEARNER, "overlap": True, "record_dir": str(record_dir(experiment_dir))}
    argv, env = grpo_command(
        tiny_lab.train_parquet, tiny_lab.val_parquet, tiny_lab.actor_dir, experiment_dir=experiment_dir,
        rollout_name="respec", total_steps=OVERLAPPED_STEPS, train_batch_size=TRAIN_BATCH_SIZE, n=N,
        max_response_length=48,
        extra_overrides=[
            *respec_overrides(drafter_path=tiny_lab.day0_drafter_dir, num_speculative_tokens=3, learner=learner),
            "actor_rollout_ref.actor.entropy_coeff=0.01",
        ],
    )
    return experiment_dir, run_logged(argv, env, experiment_dir / "verl.log", timeout_s=1200)


def test_overlapped_learner_distills_the_generating_actor_and_serves_the_next_rollout(tiny_lab, overlapped_run):
    experiment_dir, run = overlapped_run
    assert run.ok, f"verl exited {run.returncode}; log: {run.log_path}"
    assert sorted(run.metrics) == list(range(1, OVERLAPPED_STEPS + 1))
    for step, metrics in run.metrics.items():
        # What the RL step waited for (fetch, the rest of training, publish) is part of the learner's whole cost.
        assert 0 < metrics["respec/learner/blocking_s"] <= metrics["respec/learner/time_s"], step
        previous = run.metrics.get(step - 1, {}).get("respec/learner/published_version", 0.0)
        assert metrics["respec/drafter_version"] == previous, step
    assert run.metrics[OVERLAPPED_STEPS]["respec/learner/published_version"] >= 1
    # The learner read the actor before verl updated it: step 1's is the lab's actor, which generated step 1.
    records = [read_step(path) for path in sorted(record_dir(experiment_dir).glob("step_*.pt"))]
    assert [step for step, _, _ in records] == list(range(1, OVERLAPPED_STEPS + 1))
    lab_actor = load_file(f"{tiny_lab.actor_dir}/model.safetensors")
    first, second = records[0][1], records[1][1]
    assert set(lab_actor) <= set(first)
    assert all(torch.equal(first[name].float(), lab_actor[name].float()) for name in lab_actor)
    assert any(not torch.equal(first[name], second[name]) for name in first)  # one actor update later

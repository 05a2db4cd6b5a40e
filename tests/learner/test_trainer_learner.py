"""End to end: stock verl GRPO with ``rollout.name=respec`` and the online learner switched on in the respec block:
the learner trains between steps, its versions reach the engine and serve the next rollout, metrics are logged and
its state lands in verl's checkpoint folder."""

import json
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from respec_plugin.lab.launch import grpo_command, respec_overrides, run_logged  # noqa: E402

STEPS = 3


@pytest.fixture(scope="module")
def learner_run(tiny_lab, tmp_path_factory):
    experiment_dir = tmp_path_factory.mktemp("grpo_learner")
    argv, env = grpo_command(
        tiny_lab.train_parquet,
        tiny_lab.val_parquet,
        tiny_lab.actor_dir,
        experiment_dir=experiment_dir,
        rollout_name="respec",
        total_steps=STEPS,
        train_batch_size=4,
        n=4,
        max_response_length=48,
        extra_overrides=[
            *respec_overrides(
                drafter_path=tiny_lab.drafter_dir,
                # The uniform ablation: every step has trajectories to learn from whatever the rewards.
                learner={"enable": True, "steps_per_rl_step": 4, "reward_weighting": "uniform"},
            ),
            f"trainer.save_freq={STEPS}",
        ],
    )
    return experiment_dir, run_logged(argv, env, experiment_dir / "verl.log", timeout_s=1200)


def test_learner_publishes_versions_that_serve_the_next_rollout(learner_run):
    experiment_dir, run = learner_run
    assert run.ok, f"verl exited {run.returncode}; log: {run.log_path}"
    assert sorted(run.metrics) == list(range(1, STEPS + 1))
    for step, metrics in run.metrics.items():
        for name in ("loss", "tv", "weight_mean", "time_s", "published_version", "rejected_versions"):
            assert f"respec/learner/{name}" in metrics, (step, name)
        assert 0.0 <= metrics["respec/learner/tv"] <= 1.0
        assert metrics["respec/learner/weight_mean"] == 1.0
        assert metrics["respec/learner/time_s"] > 0
        # Each step's rollout is served by the version the learner published after the previous step.
        previous = run.metrics.get(step - 1, {}).get("respec/learner/published_version", 0.0)
        assert metrics["respec/drafter_version"] == previous, step
    last = run.metrics[STEPS]
    assert last["respec/learner/published_version"] >= 1
    assert last["respec/learner/published_version"] + last["respec/learner/rejected_versions"] == STEPS
    assert run.metrics[STEPS]["respec/drafter_version"] >= 1
    saved = Path(experiment_dir) / "checkpoints" / f"global_step_{STEPS}" / "respec_learner"
    config = json.loads((saved / "drafter" / "config.json").read_text())
    assert config["drafter_version"] == last["respec/learner/published_version"]
    assert (saved / "learner_state.pt").is_file()

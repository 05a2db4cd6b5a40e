"""End to end: stock verl GRPO with ``rollout.name=respec`` and the co-located online learner switched on in the respec
block (the shared run of tests/e2e/grpo_runs.py, tuner on too). The learner runs on verl's actor ranks: it keeps the
drafter's features from verl's own old-log-prob forward, trains after the actor update (``overlap=False``), pushes
each version from the actor ranks to their engines in the weight sync, and it serves the next rollout; the driver
only sends row weights and receives metrics; its state lands in verl's checkpoint folder before verl marks it the
latest, and the run, killed after that checkpoint and resumed, serves the restored drafter and continues its
versions. A second run has two actor ranks (two rollout replicas), verl's bypass mode, where respec runs its own
forward over the kept rows, and the default ``learner.overlap``."""

import json
import signal

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402

from respec_lab.launch import grpo_command, respec_overrides, run_logged  # noqa: E402
from tests.e2e.grpo_runs import LEARNER, N, SAVE_STEP, SEQUENCES, TRAIN_BATCH_SIZE, record_dir  # noqa: E402

TWO_RANK_STEPS = 2
# The tiny lab's actor in float32: the driver receives far less than that in a step (row weights go out, metrics
# come back; the drafter, its optimizer and its features stay on the actor ranks).
ACTOR_BYTES = 4 * 920_000


def _assert_versions_serve_the_next_rollout(metrics_by_step: dict[int, dict[str, float]], ranks: int,
                                            overlap: bool = False) -> None:
    for step, metrics in metrics_by_step.items():
        # Overlapped, a step's training runs during the next rollout: its metrics come with the next step.
        trained = ("loss", "tv", "weight_mean", "train_s") if step > 1 or not overlap else ()
        for name in (*trained, "blocking_s", "published_version", "rejected_versions"):
            assert f"respec/learner/{name}" in metrics, (step, name)
        if not trained:
            continue
        assert 0.0 <= metrics["respec/learner/tv"] <= 1.0
        assert metrics["respec/learner/weight_mean"] == 1.0  # uniform weights
        assert 0 < metrics["respec/learner/driver_received_bytes"] < ACTOR_BYTES / 100
        # Every rank's engine took the version (or none did: then every one is back on the serving version).
        assert metrics["respec/learner/ranks_serving_published"] == ranks, step
        # Each step's rollout is served by the version the learner published after the previous step.
        previous = metrics_by_step.get(step - 1, {}).get("respec/learner/published_version", 0.0)
        assert metrics["respec/drafter_version"] == previous, step


def test_learner_publishes_versions_that_serve_the_next_rollout(killed_run):
    run = killed_run.result
    assert run.returncode == -signal.SIGKILL, f"verl exited {run.returncode} before the kill; log: {run.log_path}"
    assert sorted(run.metrics) == list(range(1, SAVE_STEP + 1))
    _assert_versions_serve_the_next_rollout(run.metrics, ranks=1)
    last = run.metrics[SAVE_STEP]
    assert last["respec/learner/published_version"] >= 1
    assert last["respec/learner/published_version"] + last["respec/learner/rejected_versions"] == SAVE_STEP
    assert last["respec/learner/sequences"] == SEQUENCES  # the token budget keeps every row of these small steps
    # The checkpoint of step SAVE_STEP, written inside verl's save (after the step's training, before its weight
    # sync): the drafter serving then, and the step's candidate waiting to be published.
    saved = killed_run.checkpoints / f"global_step_{SAVE_STEP}" / "respec_learner"
    config = json.loads((saved / "drafter" / "config.json").read_text())
    assert config["drafter_version"] == run.metrics[SAVE_STEP - 1]["respec/learner/published_version"]
    state = torch.load(saved / "learner_state.pt", weights_only=True)
    assert state["pending_candidate"] == (saved / "candidate").is_dir()


def test_resumed_run_serves_the_restored_drafter_and_continues_its_versions(killed_run, resumed_run):
    killed = killed_run.result.metrics
    saved = killed_run.checkpoints / f"global_step_{SAVE_STEP}" / "respec_learner"
    log = resumed_run.result.log_path.read_text(errors="replace")
    serving = int(killed[SAVE_STEP - 1]["respec/learner/published_version"])
    assert f"respec learner restored from {saved}: drafter v{serving}" in log
    metrics = resumed_run.result.metrics[SAVE_STEP + 1]
    # The first resumed rollout is served by what the killed run published after step SAVE_STEP: its candidate,
    # published from the checkpoint at the resumed run's first weight sync (a fresh learner would serve v0).
    assert metrics["respec/drafter_version"] == killed[SAVE_STEP]["respec/learner/published_version"]
    # The counters carry on: one candidate per RL step since step 1, published or rejected (fresh: 1 in all).
    published = metrics["respec/learner/published_version"]
    assert published >= metrics["respec/drafter_version"]
    assert published + metrics["respec/learner/rejected_versions"] == SAVE_STEP + 1


def test_learner_records_each_steps_features_on_the_actor_ranks(killed_run):
    """learner.record_dir: per step and rank, the kept trajectories' features as the actor's forward gave them."""
    paths = sorted(record_dir(killed_run.experiment_dir).glob("step_*_rank0.pt"))[:SAVE_STEP]
    assert [p.name for p in paths] == [f"step_{s:04d}_rank0.pt" for s in range(1, SAVE_STEP + 1)]
    rows = torch.load(paths[0], weights_only=True)
    assert len(rows) == SEQUENCES and sorted(r["row"] for r in rows) == list(range(SEQUENCES))
    for row in rows:
        length = row["token_ids"].numel()
        assert (row["aux_hidden_states"].shape[0] == row["input_embeds"].shape[0] == row["target_probs"].shape[0]
                == length)
        assert 0 < row["loss_mask"].sum() < length  # the response is learned, the prompt is not
        torch.testing.assert_close(row["target_probs"].sum(-1), torch.ones(length))
    assert sum(row["held_out"] for row in rows) > 0


@pytest.fixture(scope="module")
def two_rank_run(tiny_lab, tmp_path_factory):
    """Two actor ranks (each with its rollout replica), verl's bypass mode (old log-probs from the rollout, so respec
    runs one forward over the kept rows) and the learner overlapping the next rollout: a token budget keeps one or
    two prompt groups of the four."""
    experiment_dir = tmp_path_factory.mktemp("grpo_learner_two_ranks")
    argv, env = grpo_command(
        tiny_lab.train_parquet, tiny_lab.val_parquet, tiny_lab.actor_dir, experiment_dir=experiment_dir,
        rollout_name="respec", total_steps=TWO_RANK_STEPS, train_batch_size=TRAIN_BATCH_SIZE, n=N, n_gpus=2,
        max_response_length=48,
        extra_overrides=[
            *respec_overrides(drafter_path=tiny_lab.day0_drafter_dir, num_speculative_tokens=3,
                              learner={**LEARNER, "max_tokens_per_step": 500, "overlap": True}),
            "algorithm.rollout_correction.bypass_mode=True",
            "actor_rollout_ref.rollout.calculate_log_probs=True",
            "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2",
        ],
    )
    return run_logged(argv, env, experiment_dir / "verl.log", timeout_s=1200)


def test_two_actor_ranks_train_together_and_both_replicas_serve_every_version(two_rank_run):
    run = two_rank_run
    assert run.ok, f"verl exited {run.returncode}; log: {run.log_path}"
    assert sorted(run.metrics) == list(range(1, TWO_RANK_STEPS + 1))
    _assert_versions_serve_the_next_rollout(run.metrics, ranks=2, overlap=True)
    # Step 1's candidate, trained during step 2's rollout, is published in step 2's weight sync.
    assert run.metrics[TWO_RANK_STEPS]["respec/learner/published_version"] >= 1
    for step, metrics in run.metrics.items():
        if step > 1:
            kept = metrics["respec/learner/sequences"]
            assert 0 < kept < SEQUENCES and kept % N == 0, step  # whole prompt groups within the token budget
            assert metrics["respec/learner/optimizer_steps"] >= 1, step
        # respec's own forward covered the kept rows, topped up to whole micro-batches on both ranks (2 x 2), not the
        # whole step.
        forwarded = metrics["respec/learner/extra_forward_rows"]
        assert 0 < forwarded < SEQUENCES and forwarded % 4 == 0, step

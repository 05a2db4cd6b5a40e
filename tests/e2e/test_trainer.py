"""End to end: stock verl GRPO (``python -m verl.trainer.main_ppo``) with ``rollout.name=respec`` on the tiny
lab completes its steps and logs the ``respec/*`` metrics, consistent with verl's own and under the same names in
wandb, and leaves its dashboard in the checkpoint root; a killed run resumes."""

import json
import signal
import struct
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from respec_lab.launch import grpo_command, respec_overrides, run_logged  # noqa: E402
from respec_plugin.integrations.verl.trainer import DASHBOARD_FILE  # noqa: E402
from tests.e2e.grpo_runs import SAVE_STEP, TOTAL_STEPS  # noqa: E402

STEPS = 2
TRAIN_BATCH_SIZE = 4
N = 4


@pytest.fixture(scope="module")
def respec_run(tiny_lab, tmp_path_factory):
    experiment_dir = tmp_path_factory.mktemp("grpo_respec")
    argv, env = grpo_command(
        tiny_lab.train_parquet,
        tiny_lab.val_parquet,
        tiny_lab.actor_dir,
        experiment_dir=experiment_dir,
        rollout_name="respec",
        total_steps=STEPS,
        train_batch_size=TRAIN_BATCH_SIZE,
        n=N,
        max_response_length=48,
        extra_overrides=respec_overrides(drafter_path=tiny_lab.drafter_dir, num_speculative_tokens=3),
    )
    return run_logged(argv, env, experiment_dir / "verl.log", timeout_s=1200)


def test_grpo_with_respec_completes_and_logs_respec_metrics(respec_run):
    assert respec_run.ok, f"verl exited {respec_run.returncode}; log: {respec_run.log_path}"
    assert sorted(respec_run.metrics) == list(range(1, STEPS + 1))
    for step, metrics in respec_run.metrics.items():
        assert metrics["respec/k"] == 3
        assert metrics["respec/drafter_version"] == 0
        assert 0.0 < metrics["respec/accept_rate"] <= 1.0
        # The lab's warmed-up drafter, served through verl's dummy-init + weight sync at temperature 1, keeps the
        # acceptance it shows standalone (~2.7 at k=3); it was ~1.2 when the drafter ran with the actor's lm_head.
        assert 2.0 <= metrics["respec/accept_length"] <= 4.0
        assert metrics["respec/rollout_tokens_per_s"] > 0
        assert 0.0 <= metrics["respec/accepted_per_pos/2"] <= metrics["respec/accepted_per_pos/0"] <= 1.0
        # Our per-request token counts agree with verl's own response lengths.
        verl_tokens = metrics["response_length/mean"] * TRAIN_BATCH_SIZE * N
        assert metrics["respec/rollout_tokens"] == pytest.approx(verl_tokens, rel=1e-3), step


def test_respec_metrics_reach_wandb_under_their_names(respec_run):
    """verl's own tracking logger carries the ``respec/*`` metrics to wandb unchanged (the launcher's wandb is
    offline, under the experiment directory)."""
    experiment_dir = respec_run.log_path.parent
    (run_file,) = experiment_dir.glob("wandb/offline-run-*/run-*.wandb")
    history = wandb_history(run_file)
    assert sorted(history) == sorted(respec_run.metrics)
    for step, metrics in respec_run.metrics.items():
        assert history[step]["respec/accept_length"] == pytest.approx(metrics["respec/accept_length"]), step


def test_run_ends_with_a_dashboard_in_its_checkpoint_root(respec_run):
    dashboard = respec_run.log_path.parent / "checkpoints" / DASHBOARD_FILE  # trainer.default_local_dir
    assert dashboard.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert "respec dashboard: " + str(dashboard) in respec_run.log_path.read_text(errors="replace")


def wandb_history(run_file: Path) -> dict[int, dict[str, object]]:
    """The history rows (step -> {key: value}) of an offline wandb run file. wandb 0.31 writes no
    wandb-summary.json offline and has no Python reader; the file is a LevelDB-style log (``:W&B`` header, 32 KiB
    blocks of records, each a 7-byte header: crc32, length, type FULL/FIRST/MIDDLE/LAST) of protobuf ``Record``s."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data.startswith(b":W&B"), run_file
    block, offset, payload, rows = 32768, 7, b"", {}
    while offset + 7 <= len(data):
        if block - offset % block < 7:  # a block tail too short for a record header is padding
            offset += block - offset % block
            continue
        _, length, kind = struct.unpack("<IHB", data[offset:offset + 7])
        payload += data[offset + 7:offset + 7 + length]
        offset += 7 + length
        if kind in (1, 4):  # FULL or LAST: the record is complete
            record = wandb_internal_pb2.Record.FromString(payload)
            payload = b""
            if record.WhichOneof("record_type") == "history":
                items = record.history.item
                rows[record.history.step.num] = {
                    i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items
                }
    return rows


def test_killed_run_resumes_at_the_step_after_its_checkpoint(killed_run, resumed_run):
    """The shared learner + tuner run (tests/grpo_runs.py) is SIGKILLed, all its processes at once, as soon as it
    has logged step SAVE_STEP: a real crash, not a clean stop, so nothing at shutdown (verl's ``on_train_end``,
    Ray's teardown) can help the resume. It is not flaky: verl logs a step after everything of it, checkpoints
    included (respec's state is written inside verl's save, before verl marks the checkpoint as the latest), and the
    next step takes far longer than the launcher's 1 s poll, so the kill always lands inside step SAVE_STEP + 1,
    where what it interrupts does not matter. The same command in the same directory then resumes
    (``trainer.resume_mode=auto``) at the step after the checkpoint and finishes the run. What the learner and the
    tuner restore is checked in tests/learner/test_trainer_learner.py and tests/tuner/test_trainer_tuner.py."""
    assert killed_run.result.returncode == -signal.SIGKILL, killed_run.result.log_path
    resumed = resumed_run.result
    assert resumed.ok, f"verl exited {resumed.returncode}; log: {resumed.log_path}"
    assert sorted(resumed.metrics) == [SAVE_STEP + 1]
    log = resumed.log_path.read_text(errors="replace")
    checkpoint = killed_run.checkpoints / f"global_step_{SAVE_STEP}"
    assert f"Resuming from {checkpoint}, setting global step to {SAVE_STEP}" in log
    assert (killed_run.checkpoints / "latest_checkpointed_iteration.txt").read_text() == str(TOTAL_STEPS)

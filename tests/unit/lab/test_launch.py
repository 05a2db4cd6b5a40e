"""The lab launcher: its argv composes with verl's own Hydra config and passes verl's validation; verl's console
metric lines parse into per-step dicts; the runner streams to a log, stops a command at its time limit and kills a
whole run after a given step."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import psutil
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from respec_plugin.core.config import ReSpecConfig
from respec_lab.launch import grpo_command, parse_console_metrics, respec_overrides, run_logged
from respec_lab.vllm_rollouts import KV_BLOCK_SIZE

# Excerpt (12 of its 103 metrics, in order, verbatim) of the step-3 line verl 0.9.1's console logger printed in a
# CPU GRPO run through this launcher, Ray's coloured actor prefix included.
REAL_STEP_LINE = (
    "\x1b[36m(TaskRunnerV1 pid=8569)\x1b[0m step:3 - training/rollout_probs_diff_max:9.076111018657684e-05 - "
    "rollout_corr/log_ppl_diff_min:-0.01470804214477539 - actor/lr:1e-06 - "
    "actor/perf/max_memory_allocated_gb:0.868011474609375 - critic/score/mean:0.0 - response_length/mean:32.0 - "
    "num_turns/min:np.int32(2) - num_turns/mean:np.float64(2.0) - timing_s/gen:2.023820384999908 - "
    "timing_s/step:9.721693226000298 - perf/total_num_tokens:1528 - perf/throughput:157.17426630100016"
)


def _compose(overrides: list[str]) -> DictConfig:
    import verl.trainer.main_ppo as main_ppo

    config_dir = Path(main_ppo.__file__).parent / "config"
    # `hydra.*` overrides configure the CLI's run directory, not the job config that compose returns.
    job_overrides = [override for override in overrides if not override.startswith("hydra.")]
    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        return compose(config_name="ppo_trainer", overrides=job_overrides)


def _command(tmp_path: Path, **kwargs) -> tuple[list[str], dict[str, str]]:
    data, actor, experiment = (tmp_path / "train.parquet", tmp_path / "val.parquet"), tmp_path / "actor", tmp_path / "exp"
    return grpo_command(*data, actor, experiment_dir=experiment, **kwargs)


def test_grpo_command_composes_with_verl_config_and_validates(tmp_path: Path) -> None:
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import omega_conf_to_dataclass, validate_config

    argv, env = _command(tmp_path, n=2, train_batch_size=2, kv_cache_memory_bytes=64 << 20)
    assert argv[:3] == [sys.executable, "-m", "verl.trainer.main_ppo"]
    assert env["VERL_PLATFORM"] == "cpu" and env["WANDB_MODE"] == "offline"

    config = _compose(argv[3:])
    assert not need_reference_policy(config) and not need_critic(config)
    validate_config(config=config, use_reference_policy=False, use_critic=False)

    assert config.algorithm.adv_estimator == "grpo"
    assert config.trainer.device == "cpu"
    assert config.ray_kwargs.ray_init.num_gpus == 1
    assert config.transfer_queue.backend.SimpleStorage.num_data_storage_units == 1
    assert config.trainer.default_local_dir == str((tmp_path / "exp" / "checkpoints").resolve())
    rollout = omega_conf_to_dataclass(config.actor_rollout_ref.rollout)
    assert rollout.name == "vllm" and rollout.n == 2
    assert not rollout.enable_sleep_mode and not rollout.free_cache_engine and rollout.enforce_eager
    assert rollout.engine_kwargs["vllm"]["kv_cache_memory_bytes"] == 64 << 20
    assert rollout.engine_kwargs["vllm"]["block_size"] == KV_BLOCK_SIZE


def test_extra_overrides_replace_the_launchers_own(tmp_path: Path) -> None:
    argv, _ = _command(tmp_path, extra_overrides=["actor_rollout_ref.rollout.n=3", "trainer.logger=[console]"])
    assert [a for a in argv if a.startswith("actor_rollout_ref.rollout.n=")] == ["actor_rollout_ref.rollout.n=3"]
    config = _compose(argv[3:])
    assert config.actor_rollout_ref.rollout.n == 3
    assert list(config.trainer.logger) == ["console"]


def test_respec_overrides_land_in_the_rollouts_respec_block(tmp_path: Path) -> None:
    block = respec_overrides(method="ngram", num_speculative_tokens=2, tuner={"mode": "static", "k_max": 5})
    argv, _ = _command(tmp_path, extra_overrides=block)
    respec = ReSpecConfig.from_rollout_config(_compose(argv[3:]).actor_rollout_ref.rollout)
    assert (respec.method, respec.num_speculative_tokens) == ("ngram", 2)
    assert (respec.tuner.mode, respec.tuner.k_max) == ("static", 5)


def test_parse_console_metrics_on_a_real_line() -> None:
    log = "\n".join(["ray init kwargs: {...}", REAL_STEP_LINE, "(TaskRunnerV1 pid=1) step:1 - timing_s/step:50.0"])
    metrics = parse_console_metrics(log)
    assert list(metrics) == [1, 3]
    assert metrics[1] == {"timing_s/step": 50.0}
    step = metrics[3]
    assert len(step) == 12
    assert step["training/rollout_probs_diff_max"] == 9.076111018657684e-05
    assert step["rollout_corr/log_ppl_diff_min"] == -0.01470804214477539
    assert step["actor/lr"] == 1e-06
    assert step["num_turns/min"] == 2.0 and step["num_turns/mean"] == 2.0
    assert step["timing_s/step"] == 9.721693226000298
    assert step["perf/total_num_tokens"] == 1528


def test_lines_of_one_step_are_merged() -> None:
    metrics = parse_console_metrics("step:4 - a:1.0\nstep:4 - val/b:np.float64(0.5) - c:nan")
    assert metrics[4]["a"] == 1.0 and metrics[4]["val/b"] == 0.5 and metrics[4]["c"] != metrics[4]["c"]


def test_run_logged_streams_output_and_parses_metrics(tmp_path: Path) -> None:
    script = "import os; print('step:1 - critic/score/mean:0.5 - x:' + os.environ['RESPEC_TEST_VALUE'])"
    result = run_logged([sys.executable, "-c", script], {"RESPEC_TEST_VALUE": "7"}, tmp_path / "run.log", timeout_s=60)
    assert result.ok
    assert result.metrics == {1: {"critic/score/mean": 0.5, "x": 7.0}}
    assert "step:1" in result.log_path.read_text()


def test_run_logged_stops_the_process_group_at_the_time_limit(tmp_path: Path) -> None:
    script = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        "print('child', child.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    result = run_logged([sys.executable, "-c", script], {}, tmp_path / "run.log", timeout_s=3, kill_grace_s=5)
    assert result.returncode is None and not result.ok
    assert result.wall_s < 30
    assert not _alive(int(result.log_path.read_text().split()[1]))


def test_run_logged_kills_the_whole_run_after_a_step(tmp_path: Path) -> None:
    # The child takes its own process group, as Ray's actors do; the kill must reach it through the session.
    script = (
        "import os, subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], process_group=0)\n"
        "print('child', child.pid, flush=True)\n"
        "time.sleep(1)\n"
        "print('step:1 - a:1', flush=True)\n"
        "time.sleep(120)\n"
    )
    result = run_logged([sys.executable, "-c", script], {}, tmp_path / "run.log", timeout_s=60, kill_after_step=1)
    assert result.returncode == -signal.SIGKILL and not result.ok
    assert result.wall_s < 30
    assert result.metrics == {1: {"a": 1.0}}
    assert not _alive(int(result.log_path.read_text().split()[1]))


def test_run_logged_kills_the_run_as_it_marks_a_checkpoint_the_latest(tmp_path: Path) -> None:
    # The run marks checkpoint 2, then would log step 2 a moment later: the kill lands in between.
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "root = Path(sys.argv[1])\n"
        "for step in (1, 2):\n"
        "    time.sleep(0.5)\n"
        "    (root / 'latest_checkpointed_iteration.txt').write_text(str(step))\n"
        "    time.sleep(0.3)\n"
        "    print(f'step:{step} - a:1', flush=True)\n"
        "time.sleep(120)\n"
    )
    result = run_logged([sys.executable, "-c", script, str(tmp_path)], {}, tmp_path / "run.log", timeout_s=60,
                        kill_at_checkpoint=(tmp_path, 2))
    assert result.returncode == -signal.SIGKILL and result.wall_s < 30
    assert result.metrics == {1: {"a": 1.0}}


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE  # a killed orphan may await reaping
    except psutil.NoSuchProcess:
        return False

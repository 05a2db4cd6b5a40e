"""Run verl's own GRPO CLI (``python -m verl.trainer.main_ppo``) on the CPU lab, and read its per-step metrics.

The one place that knows which overrides and environment a stock verl 0.9.1 run needs on a CPU-only host (see
``respec_lab.cpu_platform`` for the platform side); the demo, tests and benchmarks all launch through it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from respec_lab.vllm_rollouts import KV_BLOCK_SIZE
from respec_plugin.core.checkpoint_files import latest_checkpointed_step
from respec_plugin.core.config import CONFIG_PREFIX

logger = logging.getLogger(__name__)

VERL_MAIN = "verl.trainer.main_ppo"


def grpo_command(
    train_parquet: str | os.PathLike[str],
    val_parquet: str | os.PathLike[str],
    actor_dir: str | os.PathLike[str],
    *,
    experiment_dir: str | os.PathLike[str],
    rollout_name: str = "vllm",
    total_steps: int = 2,
    train_batch_size: int = 4,
    n: int = 4,
    max_prompt_length: int = 128,
    max_response_length: int = 64,
    kv_cache_memory_bytes: int = 256 << 20,
    seed: int = 0,
    n_gpus: int = 1,
    project_name: str = "respec-lab",
    experiment_name: str | None = None,
    extra_overrides: Sequence[str] = (),
) -> tuple[list[str], dict[str, str]]:
    """Argv and environment for a stock verl GRPO run on CPU, with ``n_gpus`` actor ranks (and as many rollout
    replicas).

    The environment holds only the variables to set on top of the caller's. ``extra_overrides`` are Hydra
    overrides appended last; one naming a key set here replaces it (verl's CLI would reject the duplicate).
    """
    experiment_dir = Path(experiment_dir).resolve()
    rollout_batch = train_batch_size * n
    if rollout_batch % n_gpus:
        raise ValueError(f"{rollout_batch} sequences per step do not split over n_gpus={n_gpus} ranks")
    per_rank = rollout_batch // n_gpus
    overrides = [
        # --- GRPO, as in verl's examples/grpo_trainer: group-relative advantages, no KL (so no reference model).
        "algorithm.adv_estimator=grpo",
        "algorithm.use_kl_in_reward=False",
        "actor_rollout_ref.actor.use_kl_loss=False",
        f"actor_rollout_ref.rollout.n={n}",
        f"data.train_files={Path(train_parquet).resolve()}",
        f"data.val_files={Path(val_parquet).resolve()}",
        f"data.train_batch_size={train_batch_size}",
        f"data.max_prompt_length={max_prompt_length}",
        f"data.max_response_length={max_response_length}",
        f"actor_rollout_ref.model.path={Path(actor_dir).resolve()}",
        f"actor_rollout_ref.rollout.name={rollout_name}",
        # One optimizer step per RL step, one micro batch (the lab's sizes fit in RAM).
        f"actor_rollout_ref.actor.ppo_mini_batch_size={train_batch_size}",
        f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={per_rank}",
        f"actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu={per_rank}",
        # --- Run length and bookkeeping: N steps, no validation / checkpoints, metrics to console (parsed by
        # `parse_console_metrics`) and to wandb (offline, files under experiment_dir).
        f"trainer.total_training_steps={total_steps}",
        "trainer.val_before_train=False",
        "trainer.test_freq=-1",
        "trainer.save_freq=-1",
        "trainer.logger=[console,wandb]",
        f"trainer.project_name={project_name}",
        f"trainer.experiment_name={experiment_name or experiment_dir.name}",
        f"trainer.default_local_dir={experiment_dir / 'checkpoints'}",
        f"hydra.run.dir={experiment_dir / 'hydra'}",
        # --- Seeds: data order, rollout sampling, actor init and mini-batch order.
        f"data.seed={seed}",
        f"actor_rollout_ref.rollout.seed={seed}",
        f"actor_rollout_ref.actor.data_loader_seed={seed}",
        f"actor_rollout_ref.actor.fsdp_config.seed={seed}",
        # --- CPU device: each "GPU" (n_gpus actor ranks, each with its own rollout replica) is the CPU.
        # trainer.device=cpu survives verl's auto_set_device only with the lab's CPU platform (VERL_PLATFORM=cpu);
        # verl's placement groups ask Ray for GPU bundles, so Ray gets fake GPUs.
        "trainer.device=cpu",
        "trainer.nnodes=1",
        f"trainer.n_gpus_per_node={n_gpus}",
        f"+ray_kwargs.ray_init.num_gpus={n_gpus}",
        # --- 2-core host: verl sizes Ray and its helpers for a GPU node. On Ray's real CPU count (2) the
        # actors cannot all be scheduled and the run hangs, as it does with TransferQueue's 8 storage units:
        # a generous logical CPU count and one storage unit. One agent-loop and one reward worker instead of
        # 8 + 8 (each a Ray actor process with its own memory), and no dataloader processes.
        "ray_kwargs.ray_init.num_cpus=16",
        "transfer_queue.backend.SimpleStorage.num_data_storage_units=1",
        "actor_rollout_ref.rollout.agent.num_workers=1",
        "reward.num_workers=1",
        "data.dataloader_num_workers=0",
        # --- Actor on CPU: no flash-attn (sdpa attention, padded batches instead of remove-padding), FSDP2
        # over a gloo group of one.
        "actor_rollout_ref.actor.strategy=fsdp2",
        "+actor_rollout_ref.model.override_config.attn_implementation=sdpa",
        "actor_rollout_ref.model.use_remove_padding=False",
        # --- vLLM CPU rollout: no sleep mode / cache freeing (CUDA-only memory pools), no CUDA graphs, one
        # engine, and an explicit KV cache (vLLM CPU otherwise reserves gpu_memory_utilization x total RAM;
        # with kv_cache_memory_bytes set it ignores that fraction, kept low for engines started without it).
        "+actor_rollout_ref.rollout.enable_sleep_mode=False",
        "actor_rollout_ref.rollout.free_cache_engine=False",
        "actor_rollout_ref.rollout.enforce_eager=True",
        "actor_rollout_ref.rollout.tensor_model_parallel_size=1",
        "actor_rollout_ref.rollout.gpu_memory_utilization=0.3",
        f"+actor_rollout_ref.rollout.engine_kwargs.vllm.kv_cache_memory_bytes={kv_cache_memory_bytes}",
        f"+actor_rollout_ref.rollout.engine_kwargs.vllm.block_size={KV_BLOCK_SIZE}",
    ]
    argv = [sys.executable, "-m", VERL_MAIN, *merge_overrides(overrides, extra_overrides)]
    env = {
        # Loads respec_lab.cpu_platform in every verl process (through the verl.plugins entry point).
        "VERL_PLATFORM": "cpu",
        # No network here: wandb keeps its run offline under the experiment, HF never queries the hub.
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(experiment_dir),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        # Tokenizers in forked Ray workers would warn and disable parallelism anyway.
        "TOKENIZERS_PARALLELISM": "false",
        # Ray gives every worker it starts OMP_NUM_THREADS=1 unless the variable is set: torch in verl's actor
        # workers would then update the actor (and train the drafter) on one core of the machine.
        "OMP_NUM_THREADS": str(os.cpu_count() or 1),
        # Every Ray actor's line reaches the log verbatim (no "[repeated Nx]" folding of metric lines).
        "RAY_DEDUP_LOGS": "0",
        "PYTHONUNBUFFERED": "1",
    }
    return argv, env


def respec_overrides(**block: object) -> list[str]:
    """Hydra overrides that set the respec block; nested dicts are sub-blocks:
    ``respec_overrides(num_speculative_tokens=3, learner={"enable": True})`` ->
    ``["+actor_rollout_ref.rollout.custom.respec.num_speculative_tokens=3", "+...respec.learner.enable=True"]``."""

    def flatten(prefix: str, values: Mapping[str, object]) -> list[str]:
        overrides = []
        for key, value in values.items():
            if isinstance(value, Mapping):
                overrides += flatten(f"{prefix}.{key}", value)
            else:
                overrides.append(f"+{prefix}.{key}={value}")
        return overrides

    return flatten(CONFIG_PREFIX, block)


def override_key(override: str) -> str:
    """The config key a Hydra override sets: ``+a.b=1`` -> ``a.b``."""
    return override.split("=", 1)[0].lstrip("+~")


def merge_overrides(base: Iterable[str], extra: Iterable[str]) -> list[str]:
    """``base`` then ``extra``; an extra override of a key already in ``base`` takes that entry's place."""
    merged = {override_key(override): override for override in base}
    for override in extra:
        merged[override_key(override)] = override
    return list(merged.values())


# ----------------------------------------------------------------------------------------------------------
# Running it
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunResult:
    """Outcome of one verl run: exit code (None when killed at the time limit, -SIGKILL when killed after
    ``kill_after_step``), wall time, log, metrics."""

    returncode: int | None
    wall_s: float
    log_path: Path
    metrics: dict[int, dict[str, float]]

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def run_logged(
    argv: Sequence[str],
    env: Mapping[str, str],
    log_path: str | os.PathLike[str],
    *,
    timeout_s: float,
    cwd: str | os.PathLike[str] | None = None,
    kill_grace_s: float = 30.0,
    kill_after_step: int | None = None,
    kill_at_checkpoint: tuple[Path, int] | None = None,
    on_start: Callable[[int], None] | None = None,
) -> RunResult:
    """Run ``argv`` with ``env`` added to this process's environment, stdout+stderr streamed into ``log_path``.

    The command runs in its own process group; past ``timeout_s`` the whole group (driver, Ray's local
    cluster, vLLM engines) gets SIGTERM, then SIGKILL after ``kill_grace_s``. With ``kill_after_step``, every
    process of the run gets SIGKILL as soon as verl has logged that step's metrics (the step's checkpoint is
    written by then): a crash, no clean shutdown, that a later run can resume from. With ``kill_at_checkpoint``
    ``(checkpoint root, n)`` the kill comes within milliseconds of verl marking step n's checkpoint as the latest,
    inside that step (before its weight sync and its metrics). ``on_start`` gets the run's process id, which is also
    its session id, as soon as it started (e.g. to watch its processes).
    """
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with log_path.open("w") as log:
        process = subprocess.Popen(
            list(argv),
            env={**os.environ, **env},
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        logger.info("started pid %d, log %s: %s", process.pid, log_path, " ".join(argv))
        if on_start is not None:
            on_start(process.pid)
        try:
            if kill_after_step is not None:
                returncode: int | None = _kill_when(process, lambda: kill_after_step in parse_console_metrics(
                    log_path.read_text(errors="replace")), f"logged step {kill_after_step}", timeout_s, poll_s=1.0)
            elif kill_at_checkpoint is not None:
                root, step = kill_at_checkpoint
                returncode = _kill_when(process, lambda: latest_checkpointed_step(root) == step,
                                        f"marked checkpoint {step} as the latest", timeout_s, poll_s=0.005)
            else:
                returncode = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            logger.warning("pid %d ran past %.0f s; stopping its process group", process.pid, timeout_s)
            _stop_group(process, kill_grace_s)
            returncode = None
    wall_s = time.monotonic() - start
    return RunResult(returncode, wall_s, log_path, parse_console_metrics(log_path.read_text(errors="replace")))


def _kill_when(process: subprocess.Popen[bytes], happened: Callable[[], bool], what: str, timeout_s: float,
               poll_s: float) -> int:
    """Poll ``happened`` every ``poll_s`` until it holds, then SIGKILL the run's whole session; its exit code."""
    deadline = time.monotonic() + timeout_s
    while process.poll() is None:
        if happened():
            logger.info("pid %d %s; killing its session", process.pid, what)
            _kill_session(process.pid, deadline)
            break
        if time.monotonic() > deadline:
            raise subprocess.TimeoutExpired(process.args, timeout_s)
        time.sleep(poll_s)
    return process.wait()


def _session_pids(session_id: int) -> list[int]:
    """Live (not zombie) processes of a session, from /proc."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                # "pid (comm) state ppid pgrp session ...": comm may hold spaces, so split after its ")".
                state, _, _, session = f.read().rsplit(")", 1)[1].split()[:4]
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(session) == session_id and state != "Z":
            pids.append(int(entry))
    return pids


def _stop_group(process: subprocess.Popen[bytes], grace_s: float) -> None:
    """SIGTERM the run's process group, then SIGKILL whatever of its session outlives ``grace_s``: the parent
    exiting does not mean its children have (vLLM engines still holding memory when the next run starts)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while _session_pids(process.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    _kill_session(process.pid, time.monotonic() + grace_s)
    process.wait()


def _kill_session(session_id: int, deadline: float) -> None:
    """SIGKILL every live process of the session until none is left, or ``deadline``. Ray gives each actor its
    own process group, but all stay in the session ``start_new_session`` opened; a process may fork between the
    listing and its parent's death, hence the sweep."""
    while (session := _session_pids(session_id)) and time.monotonic() < deadline:
        for pid in session:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)


# ----------------------------------------------------------------------------------------------------------
# verl's console metrics
# ----------------------------------------------------------------------------------------------------------

# verl.utils.logger.aggregate_logger.concat_dict_to_str: "step:{step} - {key}:{pprint.pformat(value)} - ...",
# numbers only. Ray prefixes actor output with "(TaskRunnerV1 pid=...) "; numpy scalars print as np.float64(x).
_STEP_LINE = re.compile(r"(?:^|\s)step:(\d+) - (.*)$")
_NUMPY_SCALAR = re.compile(r"^np\.\w+\((.*)\)$")


def parse_metric_value(text: str) -> float | None:
    """One console value (``0.5``, ``np.float64(0.5)``, ``nan``, ``True``) as a float; None if not a number."""
    text = _NUMPY_SCALAR.sub(r"\1", text.strip())
    if text in ("True", "False"):
        return float(text == "True")
    try:
        return float(text)
    except ValueError:
        return None


def parse_console_metrics(log_text: str) -> dict[int, dict[str, float]]:
    """Per-step metric dicts from verl's console logger lines, in step order (lines of one step are merged)."""
    steps: dict[int, dict[str, float]] = {}
    for line in log_text.splitlines():
        match = _STEP_LINE.search(line)
        if match is None:
            continue
        metrics = steps.setdefault(int(match.group(1)), {})
        for item in match.group(2).split(" - "):
            key, _, text = item.rpartition(":")
            value = parse_metric_value(text)
            if key and value is not None:
                metrics[key] = value
    return dict(sorted(steps.items()))


def rollout_tokens_per_s(step_metrics: Mapping[str, float], num_sequences: int) -> float | None:
    """Rollout throughput from verl's own metrics (mean response length x sequences / ``timing_s/gen``), the
    same measure for every rollout backend, so respec and stock vLLM compare on equal terms."""
    if "response_length/mean" not in step_metrics or not step_metrics.get("timing_s/gen"):
        return None
    return step_metrics["response_length/mean"] * num_sequences / step_metrics["timing_s/gen"]

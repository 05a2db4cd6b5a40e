"""Everything respec can check about a run before verl builds a worker or an engine: the trainer mixin runs it when
verl constructs its trainer, so a bad value fails within seconds of the command, naming the key (or file), the value
and the fix, instead of minutes later inside a Ray worker or a vLLM engine.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from respec_plugin.compat import check_vllm_supports
from respec_plugin.core.checkpoint_files import (
    LEARNER_STATE_DIR,
    TUNER_STATE_FILE,
    latest_checkpointed_step,
    step_folder,
)
from respec_plugin.core.config import CONFIG_PREFIX, ReSpecConfig, ReSpecConfigError, bad_value
from respec_plugin.core.drafter.checks import check_drafter_checkpoint
from respec_plugin.core.tuner.service import check_no_scheduler_cls

ENGINE_KWARGS = "actor_rollout_ref.rollout.engine_kwargs.vllm"


def check_at_startup(config, respec: ReSpecConfig) -> None:
    """Refuse a run respec cannot serve; ``config`` is verl's whole (resolved) trainer config."""
    rollout = config.actor_rollout_ref.rollout
    engine_kwargs = (rollout.get("engine_kwargs") or {}).get("vllm") or {}
    if engine_kwargs.get("speculative_config"):
        raise ReSpecConfigError(
            f"{ENGINE_KWARGS}.speculative_config is set, but with rollout.name='respec' the drafter comes from "
            f"{CONFIG_PREFIX}.*; remove the engine_kwargs entry.")
    for mtp in (config.actor_rollout_ref.model.get("mtp"), rollout.get("mtp")):
        if mtp and mtp.get("enable") and mtp.get("enable_rollout"):
            raise ReSpecConfigError(
                "actor_rollout_ref.model.mtp.enable_rollout=True conflicts with rollout.name='respec': both set "
                f"vLLM's speculative_config. Turn MTP rollout off, or use {CONFIG_PREFIX}.method to pick a drafter.")
    if respec.tuner.enabled and rollout.get("data_parallel_size", 1) > 1:
        raise bad_value("tuner.mode", respec.tuner.mode, "the tuner needs "
                        "actor_rollout_ref.rollout.data_parallel_size=1 (vLLM switches dynamic speculative "
                        "decoding off under data parallelism); set tuner.mode=off or data_parallel_size=1.")
    if respec.uses_scheduler:
        check_no_scheduler_cls(engine_kwargs, ENGINE_KWARGS)
    if respec.learner.enable:
        from respec_plugin.integrations.verl.learner_driver import check_supported

        check_supported(config)
        if respec.learner.record_dir:
            _check_writable("learner.record_dir", respec.learner.record_dir)
    check_vllm_supports(respec)
    if respec.uses_drafter_checkpoint:
        from transformers import AutoConfig

        actor_config = AutoConfig.from_pretrained(config.actor_rollout_ref.model.path,
                                                  trust_remote_code=config.actor_rollout_ref.model.get(
                                                      "trust_remote_code", False))
        respec.check_against_actor(actor_config)
        check_drafter_checkpoint(respec.drafter_path, actor_config, method=respec.method,
                                 learner=respec.learner.enable)
    _check_resumed_state(config.trainer)


def _check_writable(key: str, directory: str) -> None:
    """The directory exists or can be made, and a file can be written there."""
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory):
            pass
    except OSError as e:
        raise bad_value(key, directory, f"it cannot be written ({e.strerror}); point it at a writable directory.")


def resumed_step_folder(trainer_config) -> Path | None:
    """The ``global_step_<n>`` folder verl will resume from (its own rules: ``resume_mode`` auto reads the
    checkpoint root's latest-iteration file, ``resume_path`` names the folder), or None when it starts afresh."""
    mode = trainer_config.get("resume_mode", "auto")
    if mode == "resume_path" and trainer_config.get("resume_from_path"):
        return Path(os.path.abspath(trainer_config.resume_from_path))
    if mode != "auto":
        return None
    step = latest_checkpointed_step(trainer_config.default_local_dir)
    if step is None:
        return None
    folder = step_folder(trainer_config.default_local_dir, step)
    return folder if folder.is_dir() else None


def _check_resumed_state(trainer_config) -> None:
    """respec's state in the checkpoint verl will resume from must be readable: a resumed run that cannot restore it
    would lose what the tuner and the learner learnt, or fail after every engine has started."""
    folder = resumed_step_folder(trainer_config)
    if folder is None:
        return
    fix = ("delete it to start respec's state afresh (verl's own checkpoint stays), or resume from another "
           "checkpoint (trainer.resume_mode=resume_path, trainer.resume_from_path=.../global_step_<n>).")
    tuner = folder / TUNER_STATE_FILE
    if tuner.exists():
        try:
            json.loads(tuner.read_text())
        except (OSError, ValueError) as e:
            raise ReSpecConfigError(f"respec's tuner state {tuner} cannot be read ({e}): {fix}") from e
    learner = folder / LEARNER_STATE_DIR
    if learner.exists():
        from respec_plugin.core.learner.loop import check_saved_state

        try:
            check_saved_state(learner)
        except (OSError, ValueError, RuntimeError) as e:
            raise ReSpecConfigError(f"respec's learner state {learner} cannot be read ({e}): {fix}") from e

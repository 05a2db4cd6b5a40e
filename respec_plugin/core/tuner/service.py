"""respec's scheduler inside one respec server: its control directory (:class:`EngineControl`, which the tuner and the
acceptance watchdog both steer k through), and the tuner (:class:`EngineTuner`), which collects what each RL step's
rollout measured and installs the next schedule when the trainer asks for an update (between RL steps)."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from typing import Any, Mapping

from respec_plugin.core.config import CONFIG_PREFIX, ReSpecConfig, ReSpecConfigError
from respec_plugin.core.spec_stats import RequestSpecStats
from respec_plugin.core.tuner.channel import (
    CONTROL_DIR_KEY,
    K0_SKIPS_DRAFTER_KEY,
    RECORD_STEPS_KEY,
    SCHEDULER_CLS,
    SPECULATION_OFF_VERSION,
    Schedule,
    StepRecord,
    take_steps,
    write_schedule,
)
from respec_plugin.core.tuner.policy import Tuner

logger = logging.getLogger(__name__)

V2_MODEL_RUNNER_ENV = "VLLM_USE_V2_MODEL_RUNNER"


def check_no_scheduler_cls(engine_kwargs: Mapping[str, Any], key: str = "engine_kwargs.vllm") -> None:
    """A user's own vLLM ``scheduler_cls`` (under ``key``) cannot run beside respec's scheduler."""
    if engine_kwargs.get("scheduler_cls"):
        raise ReSpecConfigError(
            f"{key}.scheduler_cls={engine_kwargs['scheduler_cls']!r} conflicts with respec's scheduler (the tuner's "
            f"k, the watchdog's k = 0): remove it, or set {CONFIG_PREFIX}.tuner.mode=off and "
            f"{CONFIG_PREFIX}.watchdog.enable=False."
        )


class EngineControl:
    """The private control directory of one engine's respec scheduler (created 0700 by ``mkdtemp``, removed by
    :meth:`close` when the run ends): schedules go in, measured steps come out when ``record_steps``."""

    def __init__(self, default_k: int, max_num_seqs: int, *, record_steps: bool, k0_skips_drafter: bool):
        self.max_num_seqs = max_num_seqs
        self.record_steps = record_steps
        self.k0_skips_drafter = k0_skips_drafter
        self.control_dir = tempfile.mkdtemp(prefix="respec-control-")
        self.speculation_off = False
        self.active = False  # whether the engine runs respec's scheduler (configure_engine)
        write_schedule(self.control_dir, [(1, max_num_seqs, default_k)], version=0)

    def configure_engine(self, engine_kwargs: dict) -> None:
        """Point vLLM at respec's scheduler and this control directory (``speculative_config`` is set already)."""
        check_no_scheduler_cls(engine_kwargs)
        engine_kwargs["scheduler_cls"] = SCHEDULER_CLS
        engine_kwargs["additional_config"] = {**(engine_kwargs.get("additional_config") or {}),
                                              CONTROL_DIR_KEY: self.control_dir,
                                              RECORD_STEPS_KEY: self.record_steps,
                                              K0_SKIPS_DRAFTER_KEY: self.k0_skips_drafter}
        self.active = True

    def install(self, schedule: Schedule, version: int, alternate: Schedule | None = None) -> None:
        if not self.speculation_off:
            write_schedule(self.control_dir, schedule, version, alternate)

    def turn_speculation_off(self) -> bool:
        """k = 0 at every batch size from the engine's next step on, for the rest of the run; False where the
        engine does not run respec's scheduler (nothing can change its k)."""
        if not self.active:
            return False
        write_schedule(self.control_dir, [(1, self.max_num_seqs, 0)], version=SPECULATION_OFF_VERSION)
        self.speculation_off = True
        return True

    def take_steps(self) -> list[StepRecord]:
        return take_steps(self.control_dir)

    def close(self) -> None:
        """Remove the control directory (the scheduler keeps its schedule and stops recording)."""
        shutil.rmtree(self.control_dir, ignore_errors=True)


class EngineTuner:
    """One engine's tuner: the :class:`Tuner` policy, fed and obeyed through the engine's :class:`EngineControl`."""

    def __init__(self, respec: ReSpecConfig, control: EngineControl, seed: int = 0):
        assert respec.tuner.enabled
        self.tuner = Tuner(respec.tuner, respec.num_speculative_tokens, max_batch_size=control.max_num_seqs,
                           seed=seed)
        self.control = control
        self._requests: list[RequestSpecStats] = []
        self._install()

    def configure_engine(self, engine_kwargs: dict, data_parallel_size: int) -> None:
        if data_parallel_size > 1:
            raise ReSpecConfigError(
                f"{CONFIG_PREFIX}.tuner.mode={self.tuner.config.mode!r} needs data_parallel_size=1: vLLM switches "
                "dynamic speculative decoding off under data parallelism (ranks choosing different k deadlock). "
                "Set tuner.mode=off (static num_speculative_tokens) or data_parallel_size=1."
            )
        self.control.configure_engine(engine_kwargs)
        use_v1_model_runner()

    def observe_request(self, spec_stats: RequestSpecStats) -> None:
        """One finished request's record (its acceptance per draft position)."""
        self._requests.append(spec_stats)

    def update(self) -> dict[str, float]:
        """Learn from everything since the last update, install the next schedule, return ``respec/tuner/*`` (nothing
        once the watchdog turned speculation off: the engine keeps k = 0)."""
        steps, requests = self.control.take_steps(), self._requests
        self._requests = []
        if self.control.speculation_off:
            return {}
        metrics = self.tuner.observe(steps, requests)
        self.tuner.schedule()
        self._install()
        logger.info("respec tuner: schedule v%d %s, trials %s", self.tuner.version, self.tuner.current_schedule(),
                    self.tuner.alternate_schedule())
        return {**metrics, **self.tuner.schedule_metrics()}

    def _install(self) -> None:
        self.control.install(self.tuner.current_schedule(), self.tuner.version, self.tuner.alternate_schedule())

    def state_dict(self) -> dict[str, Any]:
        return self.tuner.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from a checkpoint: the restored choice (and its trials) serve right away."""
        self.tuner.load_state_dict(state)
        self._install()


def use_v1_model_runner() -> None:
    """Run the engine (started after this, in this process or its children) on vLLM's V1 model runner.

    vLLM picks its V2 model runner where Triton is installed (``VllmConfig.use_v2_model_runner``), whose speculators
    always draft ``num_speculative_tokens`` and ignore the scheduler's per-step k (vllm-project/vllm#51510, fix
    pending in #57053): the tuner's k would change verification only, never drafting, and k = 0 would still draft.
    The V1 runner reads it (``GPUModelRunner.propose_draft_token_ids``). A user's explicit choice stands, with a
    warning."""
    chosen = os.environ.get(V2_MODEL_RUNNER_ENV)
    if chosen is None:
        os.environ[V2_MODEL_RUNNER_ENV] = "0"
    elif chosen.lower() not in ("0", "false"):
        logger.warning("respec tuner: %s=%s keeps vLLM's V2 model runner, which drafts num_speculative_tokens at "
                       "every step whatever k the tuner chooses (vllm-project/vllm#51510); unset it to let k act "
                       "on drafting", V2_MODEL_RUNNER_ENV, chosen)

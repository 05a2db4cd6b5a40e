"""The tuner inside one respec server: wires the scheduler into the engine, collects what each RL step's rollout
measured, and installs the next schedule when the trainer asks for an update (between RL steps)."""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any, Mapping

from respec_plugin.core.config import CONFIG_PREFIX, ReSpecConfig, ReSpecConfigError
from respec_plugin.core.spec_stats import RequestSpecStats
from respec_plugin.core.tuner.channel import (
    CONTROL_DIR_KEY,
    K0_SKIPS_DRAFTER_KEY,
    SCHEDULER_CLS,
    take_steps,
    write_schedule,
)
from respec_plugin.core.tuner.policy import Tuner

logger = logging.getLogger(__name__)

V2_MODEL_RUNNER_ENV = "VLLM_USE_V2_MODEL_RUNNER"


class EngineTuner:
    """One engine's tuner: a control directory shared with its scheduler, and the :class:`Tuner` policy."""

    def __init__(self, respec: ReSpecConfig, max_num_seqs: int, seed: int = 0):
        assert respec.tuner.enabled
        self.tuner = Tuner(respec.tuner, respec.num_speculative_tokens, max_batch_size=max_num_seqs, seed=seed)
        self.control_dir = tempfile.mkdtemp(prefix="respec-tuner-")
        self._requests: list[RequestSpecStats] = []
        write_schedule(self.control_dir, self.tuner.current_schedule(), self.tuner.version)

    def configure_engine(self, engine_kwargs: dict, data_parallel_size: int) -> None:
        """Point vLLM at the tuner's scheduler and control directory (``speculative_config`` is set already)."""
        if data_parallel_size > 1:
            raise ReSpecConfigError(
                f"{CONFIG_PREFIX}.tuner.mode={self.tuner.config.mode!r} needs data_parallel_size=1: vLLM switches "
                "dynamic speculative decoding off under data parallelism (ranks choosing different k deadlock). "
                "Set tuner.mode=off (static num_speculative_tokens) or data_parallel_size=1."
            )
        if engine_kwargs.get("scheduler_cls"):
            raise ReSpecConfigError(
                f"engine_kwargs.vllm.scheduler_cls={engine_kwargs['scheduler_cls']!r} conflicts with "
                f"{CONFIG_PREFIX}.tuner, which brings its own scheduler; remove it or set tuner.mode=off."
            )
        engine_kwargs["scheduler_cls"] = SCHEDULER_CLS
        engine_kwargs["additional_config"] = {**(engine_kwargs.get("additional_config") or {}),
                                              CONTROL_DIR_KEY: self.control_dir,
                                              K0_SKIPS_DRAFTER_KEY: self.tuner.config.k0_skips_drafter}
        use_v1_model_runner()

    def observe_request(self, spec_stats: RequestSpecStats) -> None:
        """One finished request's record (its acceptance per draft position)."""
        self._requests.append(spec_stats)

    def update(self) -> dict[str, float]:
        """Learn from everything since the last update, install the next schedule, return ``respec/tuner/*``."""
        metrics = self.tuner.observe(take_steps(self.control_dir), self._requests)
        self._requests = []
        self.tuner.schedule()
        self._install()
        logger.info("respec tuner: schedule v%d %s, trials %s", self.tuner.version, self.tuner.current_schedule(),
                    self.tuner.alternate_schedule())
        return {**metrics, **self.tuner.schedule_metrics()}

    def _install(self) -> None:
        write_schedule(self.control_dir, self.tuner.current_schedule(), self.tuner.version,
                       self.tuner.alternate_schedule())

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

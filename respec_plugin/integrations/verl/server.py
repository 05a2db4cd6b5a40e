"""The respec vLLM server: verl's ``vLLMHttpServer`` with speculative decoding, per-request stats and
drafter hot-swap, guarded by the acceptance watchdog.

It builds vLLM's ``speculative_config`` from the respec block (the drafter always read from its checkpoint, even
under verl's ``load_format=dummy``), asks vLLM for detailed per-request spec stats, adds them to each
``TokenOutput.extra_fields["respec"]``, and serves numbered drafter versions: version 0 is the checkpoint, pushed
again at start-up through the same validated path as every later version from :meth:`push_drafter`. A push that
fails leaves the previous version serving.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import safetensors.torch
import torch

from verl.workers.rollout.vllm_rollout.vllm_async_server import vLLMHttpServer

from respec_plugin.compat import check_vllm_supports
from respec_plugin.core.config import CONFIG_PREFIX, ReSpecConfig, ReSpecConfigError
from respec_plugin.core.drafter.checkpoint import read_drafter_tensors
from respec_plugin.core.spec_stats import RequestSpecStats
from respec_plugin.core.drafter.watchdog import AcceptanceWatchdog, Action, Verdict
from respec_plugin.core.tuner.service import EngineControl, EngineTuner
from respec_plugin.integrations.verl.engine_proxy import SpecStatsEngine

logger = logging.getLogger(__name__)

WORKER_EXTENSION_CLS = "respec_plugin.integrations.vllm.worker_extension.ReSpecWorkerExtension"


@dataclass(frozen=True)
class WatchdogReport:
    """One engine's watchdog after a rollout: restores so far, whether speculation is off, the rollout's acceptance
    length (None: not judged)."""

    restores: int
    speculation_off: bool
    accept_length: float | None


@dataclass(frozen=True)
class DrafterStatus:
    """What a server reports after a drafter push (or when asked): whether the push loaded, the version now serving
    (-1: none), why a push failed, and how many pushes failed so far."""

    ok: bool
    version: int
    error: str | None
    failures: int


class ReSpecHttpServer(vLLMHttpServer):
    """One respec rollout server (a Ray actor owning an ``AsyncLLM``)."""

    # ----- verl hooks -------------------------------------------------------------------------------------

    def _init_config(self, config):
        config = super()._init_config(config)
        self.respec = ReSpecConfig.from_rollout_config(config)
        check_vllm_supports(self.respec)
        self.drafter_version = -1  # no drafter loaded yet
        self.drafter_push_failures = 0
        self._last_good_drafter: list[tuple[str, torch.Tensor]] | None = None
        # respec's scheduler in the engine, through which the SD configuration tuner (respec.tuner.mode != off) picks
        # k per batch size and the acceptance watchdog turns speculation off.
        self.control = (EngineControl(self.respec.num_speculative_tokens, config.max_num_seqs,
                                      record_steps=self.respec.tuner.enabled,
                                      k0_skips_drafter=self.respec.tuner.k0_skips_drafter)
                        if self.respec.uses_scheduler else None)
        self.tuner = EngineTuner(self.respec, self.control) if self.respec.tuner.enabled else None
        self.watchdog = AcceptanceWatchdog(self.respec.watchdog) if self.respec.watchdog_enabled else None
        return config

    def _validate_configs(self) -> None:
        super()._validate_configs()
        self.respec.check_against_actor(self.model_config.hf_config)
        mtp = getattr(self.config, "mtp", None)
        if mtp is not None and mtp.enable and mtp.enable_rollout:
            raise ReSpecConfigError(
                "actor_rollout_ref.rollout.mtp.enable_rollout=True conflicts with rollout.name='respec': both set "
                f"vLLM's speculative_config. Turn MTP rollout off, or use {CONFIG_PREFIX}.method to pick a drafter."
            )

    def _preprocess_engine_kwargs(self, engine_kwargs: dict) -> None:
        super()._preprocess_engine_kwargs(engine_kwargs)
        if engine_kwargs.get("speculative_config"):
            raise ReSpecConfigError(
                "actor_rollout_ref.rollout.engine_kwargs.vllm.speculative_config is set, but with "
                f"rollout.name='respec' the drafter comes from {CONFIG_PREFIX}.*; remove the engine_kwargs entry."
            )
        speculative_config = self.respec.speculative_config()
        if speculative_config is not None:
            if self.respec.uses_drafter_checkpoint and self.config.load_format == "dummy":
                # verl dummy-initialises the actor and syncs its weights later; the drafter has no such sync, and
                # a dummy-initialised EAGLE head also takes the actor's lm_head in place of its own (vLLM only
                # learns that the checkpoint has one while reading it) and drafts garbage. Read it for real.
                speculative_config["draft_load_config"] = {"load_format": "auto"}
            engine_kwargs["speculative_config"] = speculative_config
            engine_kwargs["per_request_spec_decode_metrics"] = "detailed"
            if self.tuner is not None:
                self.tuner.configure_engine(engine_kwargs, data_parallel_size=self.config.data_parallel_size)
            elif self.control is not None and self.config.data_parallel_size == 1:
                # (vLLM drops per-batch-size schedules under data parallelism: the watchdog can then only restore.)
                self.control.configure_engine(engine_kwargs)

    def _get_worker_extension_cls(self) -> str:
        return WORKER_EXTENSION_CLS

    async def run_server(self, args):
        await super().run_server(args)
        self.engine = SpecStatsEngine(self.engine)
        if self.respec.uses_drafter_checkpoint:
            status = await self.push_drafter(read_drafter_tensors(self.respec.drafter_path), version=0)
            if not status.ok:
                raise ReSpecConfigError(
                    f"{CONFIG_PREFIX}.drafter_path={self.respec.drafter_path!r} could not be loaded into the "
                    f"engine: {status.error}. Check that the checkpoint was built for this actor."
                )

    async def generate(self, prompt_ids, sampling_params, request_id, *args, **kwargs):
        try:
            output = await super().generate(prompt_ids, sampling_params, request_id, *args, **kwargs)
        finally:
            finished = self.engine.pop_finished(request_id) if isinstance(self.engine, SpecStatsEngine) else None
        if finished is not None:
            stats = RequestSpecStats.from_vllm(
                finished.per_step_drafted,
                finished.per_step_accepted,
                num_output_tokens=finished.num_output_tokens,
                num_speculative_tokens=self.respec.num_speculative_tokens,
                drafter_version=self.drafter_version,
                start_time=finished.start_time,
                end_time=finished.end_time,
            )
            output.extra_fields.update(stats.to_extra_fields())
            if self.tuner is not None:
                self.tuner.observe_request(stats)
            if self.watchdog is not None:
                self.watchdog.observe(stats)
        return output

    # ----- drafter versions -------------------------------------------------------------------------------

    async def push_drafter(self, weights: list[tuple[str, torch.Tensor]], version: int) -> DrafterStatus:
        """Load drafter ``version`` into every worker; on failure keep serving the previous version. Never raises
        for a bad drafter, so a broken learner output cannot take down the rollout."""
        if not self.respec.uses_drafter_checkpoint:
            return self._status(False, "this respec server has no drafter weights (ngram or k=0)")
        try:
            payload = safetensors.torch.save({name: tensor.detach().cpu().contiguous() for name, tensor in weights})
            await self.engine.collective_rpc(
                "respec_load_drafter", kwargs={"safetensors_bytes": payload, "version": version}
            )
        except Exception as e:  # a worker rejected it (shape, dtype, NaN...): the rollback already happened
            await self.drafter_push_refused(version, str(e))
            return self._status(False, str(e))
        self._last_good_drafter = weights
        await self.drafter_pushed(version)
        return self._status(True, None)

    async def drafter_pushed(self, version: int) -> None:
        """An actor rank loaded drafter ``version`` into this engine's workers (the learner's push)."""
        self.drafter_version = version
        await self.engine.reset_prefix_cache()  # cached prefix blocks hold drafter KV of the old weights
        logger.info("drafter v%d serving", version)

    async def drafter_push_refused(self, version: int, error: str) -> None:
        self.drafter_push_failures += 1
        logger.error("drafter v%d rejected, still serving v%d: %s", version, self.drafter_version, error)

    async def restore_drafter_after_weight_sync(self) -> None:
        """Re-push the serving drafter when sleep discarded it (verl's level-2 sleep frees all weights and the
        actor sync restores only the actor's)."""
        if self._last_good_drafter is None or not (self.config.enable_sleep_mode and self.config.free_cache_engine):
            return
        status = await self.push_drafter(self._last_good_drafter, self.drafter_version)
        if not status.ok:
            raise RuntimeError(f"could not restore drafter v{self.drafter_version} after sleep: {status.error}")

    async def drafter_status(self) -> DrafterStatus:
        return self._status(self.drafter_version >= 0, None)

    def _status(self, ok: bool, error: str | None) -> DrafterStatus:
        return DrafterStatus(ok, self.drafter_version, error, self.drafter_push_failures)

    # ----- acceptance watchdog ----------------------------------------------------------------------------

    async def watchdog_check(self) -> WatchdogReport:
        """Between RL steps: judge the last rollout's acceptance; restore the last good drafter on a collapse, turn
        speculation off on a second one in a row. Never raises: the rollout goes on either way."""
        if self.watchdog is None:
            return WatchdogReport(0, False, None)
        verdict = self.watchdog.judge()
        try:
            if verdict.action is Action.MARK_GOOD:
                await self.engine.collective_rpc("respec_mark_drafter_good", kwargs={"version": self.drafter_version})
            elif verdict.action is Action.RESTORE:
                await self._restore_drafter(verdict)
            elif verdict.action is Action.SPECULATION_OFF:
                self._turn_speculation_off(f"acceptance length {verdict.accept_length:.3f} again right after the "
                                           "last good drafter was restored")
        except Exception:
            logger.exception("respec watchdog: %s failed", verdict.action.value)
        return WatchdogReport(self.watchdog.restores, self.watchdog.speculation_off, verdict.accept_length)

    async def _restore_drafter(self, verdict: Verdict) -> None:
        logger.warning("respec watchdog: drafter v%d served with acceptance length %.3f (this engine reached %.3f): "
                       "restoring the last good drafter", self.drafter_version, verdict.accept_length,
                       verdict.reference)
        try:
            results = await self.engine.collective_rpc("respec_restore_drafter")
        except Exception as e:
            self.watchdog.restore_failed()
            self._turn_speculation_off(f"the last good drafter could not be restored ({e})")
            return
        await self.drafter_pushed(results[0]["version"])

    def _turn_speculation_off(self, why: str) -> None:
        if self.control is not None and self.control.turn_speculation_off():
            logger.error("respec watchdog: %s; speculation is off (k = 0) in this engine for the rest of the run", why)
        else:
            logger.error("respec watchdog: %s; this engine cannot turn speculation off (no respec scheduler under "
                         "data parallelism) and keeps drafting", why)

    # ----- SD configuration tuner -------------------------------------------------------------------------

    async def tuner_update(self) -> dict[str, float]:
        """Between RL steps: learn from the last rollout, install the next schedule, return its metrics."""
        return self.tuner.update() if self.tuner is not None else {}

    async def tuner_state(self) -> dict[str, Any] | None:
        return self.tuner.state_dict() if self.tuner is not None else None

    async def load_tuner_state(self, state: dict[str, Any]) -> None:
        if self.tuner is not None:
            self.tuner.load_state_dict(state)

    async def close_control(self) -> None:
        """The run is over: remove the scheduler's control directory."""
        if self.control is not None:
            self.control.close()

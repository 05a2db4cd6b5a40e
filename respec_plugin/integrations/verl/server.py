"""The respec vLLM server: verl's ``vLLMHttpServer`` with speculative decoding, per-request stats and
drafter hot-swap.

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
from respec_plugin.core.tuner.service import EngineTuner
from respec_plugin.integrations.verl.engine_proxy import SpecStatsEngine

logger = logging.getLogger(__name__)

WORKER_EXTENSION_CLS = "respec_plugin.integrations.vllm.worker_extension.ReSpecWorkerExtension"


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
        # The SD configuration tuner (respec.tuner.mode != off): its scheduler picks k per batch size.
        self.tuner = EngineTuner(self.respec, config.max_num_seqs) if self.respec.tuner.enabled else None
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

    # ----- SD configuration tuner -------------------------------------------------------------------------

    async def tuner_update(self) -> dict[str, float]:
        """Between RL steps: learn from the last rollout, install the next schedule, return its metrics."""
        return self.tuner.update() if self.tuner is not None else {}

    async def tuner_state(self) -> dict[str, Any] | None:
        return self.tuner.state_dict() if self.tuner is not None else None

    async def load_tuner_state(self, state: dict[str, Any]) -> None:
        if self.tuner is not None:
            self.tuner.load_state_dict(state)

"""Worker-side respec rollout adapter (verl's ``_ROLLOUT_REGISTRY`` entry), living in each actor rank's process.

verl's vLLM ``ServerAdapter`` already finds servers by ``f"{rollout.name}_"`` and syncs the actor's weights into the
co-located vLLM worker. After that sync the drafter must be in the engine too: with the online learner on, the actor
rank pushes the learner's drafter itself (:meth:`ReSpecServerAdapter.push_drafter`, the same bucketed transport on a
socket of its own); without it, the server re-loads its drafter checkpoint if sleep discarded it.
"""

from __future__ import annotations

import logging

import torch

from verl.workers.rollout.vllm_rollout import ServerAdapter
from verl.workers.rollout.vllm_rollout.bucketed_weight_transfer import BucketedWeightSender

from respec_plugin.integrations.vllm.drafter_transfer import drafter_ipc_handle

logger = logging.getLogger(__name__)


class ReSpecServerAdapter(ServerAdapter):
    # Set by respec's actor worker when its learner owns the drafter (it pushes after every sync itself).
    drafter_from_learner: bool = False

    async def update_weights(self, weights, global_steps: int = None, wire_format: str = "named_tensors", **kwargs):
        await super().update_weights(weights, global_steps=global_steps, wire_format=wire_format, **kwargs)
        if not self.drafter_from_learner and self._ensure_server_handle():
            await self.server_handle.restore_drafter_after_weight_sync.remote()

    async def push_drafter(self, weights: list[tuple[str, torch.Tensor]], version: int) -> str | None:
        """Send drafter ``version`` to this rank's co-located vLLM worker, which loads it all or nothing; the
        server then serves it. Every actor rank calls this (each feeds its own vLLM worker); the rank that owns the
        server also issues the engine-wide call. Returns None on success, else why the engine refused it (on the
        other ranks: None, they cannot tell)."""
        future = await self._execute_method("respec_update_drafter_from_ipc", non_block=True,
                                            kwargs={"version": version, "use_shm": self.use_shm})
        sender = BucketedWeightSender(zmq_handle=drafter_ipc_handle(self.zmq_handle),
                                      bucket_size_mb=self.config.checkpoint_engine.update_weights_bucket_megabytes,
                                      use_shm=self.use_shm)
        await sender.async_send_weights(iter(weights))
        if future is None:
            return None
        try:
            await future
        except Exception as e:  # the engine rolled the push back; the previous version keeps serving
            error = str(e)
            await self.server_handle.drafter_push_refused.remote(version, error)
            return error
        await self.server_handle.drafter_pushed.remote(version)
        return None

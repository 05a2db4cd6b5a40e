"""Worker-side respec rollout adapter (verl's ``_ROLLOUT_REGISTRY`` entry).

verl's vLLM ``ServerAdapter`` already finds servers by ``f"{rollout.name}_"`` and syncs the actor's weights;
after that sync the respec server re-pushes its drafter if sleep discarded it.
"""

from __future__ import annotations

from verl.workers.rollout.vllm_rollout import ServerAdapter


class ReSpecServerAdapter(ServerAdapter):
    async def update_weights(self, weights, global_steps: int = None, wire_format: str = "named_tensors", **kwargs):
        await super().update_weights(weights, global_steps=global_steps, wire_format=wire_format, **kwargs)
        if self._ensure_server_handle():
            await self.server_handle.restore_drafter_after_weight_sync.remote()

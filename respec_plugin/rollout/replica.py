"""Driver-side respec replica: verl's ``vLLMReplica`` launching :class:`ReSpecHttpServer` actors.

It also validates the respec block in the trainer process, so a bad value fails before any engine starts,
and names the server actors ``respec_server_*``: verl's worker-side ``ServerAdapter`` looks servers up by
``f"{rollout.name}_"``, while ``vLLMReplica`` hard-codes ``"vllm_"``.
"""

from __future__ import annotations

import ray

from verl.workers.rollout.vllm_rollout.vllm_async_server import vLLMReplica

from respec_plugin.config import ReSpecConfig, check_vllm_supports
from respec_plugin.rollout.server import ReSpecHttpServer

ROLLOUT_NAME = "respec"


class ReSpecReplica(vLLMReplica):
    """A vLLM replica whose servers speculate with the respec drafter."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        check_vllm_supports(ReSpecConfig.from_rollout_config(self.config))
        self.server_class = ray.remote(ReSpecHttpServer)

    def _get_server_name_prefix(self) -> str:
        return f"{ROLLOUT_NAME}_"

    @property
    def engine_server(self):
        """The server that owns this replica's ``AsyncLLM`` (node rank 0; other nodes run headless)."""
        return self.servers[0]

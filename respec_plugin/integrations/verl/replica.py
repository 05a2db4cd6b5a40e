"""Driver-side respec replica: verl's ``vLLMReplica`` launching :class:`ReSpecHttpServer` actors.

It also validates the respec block in the trainer process, so a bad value fails before any engine starts,
and names the server actors ``respec_server_*``: verl's worker-side ``ServerAdapter`` looks servers up by
``f"{rollout.name}_"``, while ``vLLMReplica`` hard-codes ``"vllm_"``. Callers reach the server that owns the
replica's ``AsyncLLM`` through verl's own ``replica.server_handle``.
"""

from __future__ import annotations

import ray

from verl.workers.rollout.vllm_rollout.vllm_async_server import vLLMReplica

from respec_plugin import ROLLOUT_NAME
from respec_plugin.compat import check_vllm_supports
from respec_plugin.core.config import ReSpecConfig
from respec_plugin.integrations.verl.server import ReSpecHttpServer


class ReSpecReplica(vLLMReplica):
    """A vLLM replica whose servers speculate with the respec drafter."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        check_vllm_supports(ReSpecConfig.from_rollout_config(self.config))
        self.server_class = ray.remote(ReSpecHttpServer)

    def _get_server_name_prefix(self) -> str:
        return f"{ROLLOUT_NAME}_"

"""The ``verl.plugins`` entry point: importing it registers respec with verl, and says so loudly when that fails.

verl loads entry points inside ``import verl``, in every process, and logs their errors only at DEBUG level, which
would turn a broken install into a puzzling "Rollout respec not found" much later; so a failure is logged as an error
with its traceback (and re-raised) here.
"""

from __future__ import annotations

import logging
import os

from respec_plugin import ROLLOUT_NAME

logger = logging.getLogger("respec_plugin")

ADAPTER_CLS = "respec_plugin.integrations.verl.adapter.ReSpecServerAdapter"
_registered = False


def register() -> None:
    """Add rollout ``respec`` to verl's worker-side ``_ROLLOUT_REGISTRY`` and driver-side ``RolloutReplicaRegistry``
    and hook the v1 trainers. Idempotent."""
    global _registered
    if _registered:
        return
    # verl leaves the root logger at WARNING and sets its own to VERL_LOGGING_LEVEL (default INFO); respec's follow
    # verl's, so that its INFO lines (a resume's "respec learner restored from ...") reach the run's log.
    logger.setLevel(os.environ.get("VERL_LOGGING_LEVEL", "INFO"))

    from respec_plugin.compat import check_verl_version

    check_verl_version()

    from verl.workers.rollout.base import _ROLLOUT_REGISTRY
    from verl.workers.rollout.replica import RolloutReplicaRegistry

    _ROLLOUT_REGISTRY[(ROLLOUT_NAME, "async")] = ADAPTER_CLS
    RolloutReplicaRegistry.register(ROLLOUT_NAME, _load_replica)

    from respec_plugin.integrations.verl.trainer import hook_v1_trainers

    hook_v1_trainers()
    _registered = True


def _load_replica():
    from respec_plugin.integrations.verl.replica import ReSpecReplica

    return ReSpecReplica


try:
    register()
except Exception:
    logger.exception("respec-plugin failed to register with verl; rollout.name=respec will not be available")
    raise

"""respec-plugin: speculative-decoding rollouts for verl (``actor_rollout_ref.rollout.name=respec``).

``register()`` is what verl's ``verl.plugins`` entry point runs in every process. Importing this package
stays cheap: heavy modules (vLLM, the trainer) load only when verl asks for the respec backend.
"""

__version__ = "0.1.0"

ROLLOUT_NAME = "respec"

_registered = False


def register() -> None:
    """Add rollout ``respec`` to verl's worker- and driver-side registries and hook the v1 trainers.

    Idempotent. With ``VERL_PLATFORM=cpu`` it also activates the lab's CPU platform.
    """
    global _registered
    if _registered:
        return
    import logging
    import os

    # verl leaves the root logger at WARNING and sets its own to VERL_LOGGING_LEVEL (default INFO); respec's follow
    # verl's, so that its INFO lines (a resume's "respec learner restored from ...") reach the run's log.
    logging.getLogger(__name__).setLevel(os.environ.get("VERL_LOGGING_LEVEL", "INFO"))

    if os.environ.get("VERL_PLATFORM", "").lower() == "cpu":
        from respec_plugin.lab import cpu_platform

        cpu_platform.activate()

    from verl.workers.rollout.base import _ROLLOUT_REGISTRY
    from verl.workers.rollout.replica import RolloutReplicaRegistry

    _ROLLOUT_REGISTRY[(ROLLOUT_NAME, "async")] = "respec_plugin.rollout.adapter.ReSpecServerAdapter"
    RolloutReplicaRegistry.register(ROLLOUT_NAME, _load_replica)

    from respec_plugin.trainer import hook_v1_trainers

    hook_v1_trainers()
    _registered = True


def _load_replica():
    from respec_plugin.rollout.replica import ReSpecReplica

    return ReSpecReplica

"""respec-plugin: speculative-decoding rollouts for verl (``actor_rollout_ref.rollout.name=respec``).

Layout: ``core/`` holds everything that knows no framework (config, statistics, the tuner's policy, the learner's
losses and loop, the drafter model and its files); ``integrations/verl`` and ``integrations/vllm`` are the only places
that touch verl, vLLM, Ray or TransferQueue, and ``compat`` says which of their versions are supported.
Importing this package stays cheap: :func:`register` (verl's ``verl.plugins`` entry point) loads the verl side only.
"""

__version__ = "0.1.0"

# The rollout name users set (``actor_rollout_ref.rollout.name=respec``).
ROLLOUT_NAME = "respec"


def register() -> None:
    """Add rollout ``respec`` to verl's registries and hook its v1 trainers (idempotent)."""
    from respec_plugin.integrations.verl.plugin import register as register_with_verl

    register_with_verl()

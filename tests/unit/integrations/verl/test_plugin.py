"""Registration through verl's ``verl.plugins`` entry point: in the driver, in a Ray worker, and loudly broken."""

import subprocess
import sys

import ray


def _registrations() -> dict:
    import verl  # noqa: F401  (loads the entry point)
    from verl.trainer.ppo.v1 import get_trainer_cls
    from verl.workers.rollout.base import _ROLLOUT_REGISTRY
    from verl.workers.rollout.replica import RolloutReplicaRegistry

    from respec_plugin.integrations.verl.trainer import ReSpecTrainerMixin

    return {
        "adapter": _ROLLOUT_REGISTRY.get(("respec", "async")),
        "replica": RolloutReplicaRegistry.get("respec").__name__,
        "sync_trainer_hooked": issubclass(get_trainer_cls("sync"), ReSpecTrainerMixin),
    }


EXPECTED = {
    "adapter": "respec_plugin.integrations.verl.adapter.ReSpecServerAdapter",
    "replica": "ReSpecReplica",
    "sync_trainer_hooked": True,
}


def test_registered_in_driver():
    assert _registrations() == EXPECTED


def test_registered_in_ray_worker():
    ray.init(num_cpus=1, include_dashboard=False)
    try:
        assert ray.get(ray.remote(_registrations).remote()) == EXPECTED
    finally:
        ray.shutdown()


def test_hooked_trainer_is_verls_own_class_underneath():
    from verl.trainer.ppo.v1 import get_trainer_cls
    from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

    hooked = get_trainer_cls("sync")
    assert hooked.__mro__[2] is PPOTrainerSync
    # verl's training loop and step pipeline are untouched; respec only extends its hooks (and calls super() in each,
    # ``_update_actor`` included: the overlapped learner starts there).
    assert hooked.fit is PPOTrainerSync.fit and hooked._step_once is PPOTrainerSync._step_once


def test_broken_registration_is_logged_loudly():
    # verl swallows plugin errors at DEBUG level; ours must reach stderr with the reason.
    code = "import sys; sys.modules['verl.workers.rollout.replica'] = None; import verl"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "respec-plugin failed to register with verl" in proc.stderr
    assert "verl.workers.rollout.replica" in proc.stderr

"""Python API to publish a new drafter version to every respec replica (used by the online learner).

Runs in the trainer process, between RL steps. A version is applied by a replica only after it loaded
completely; a replica that rejects it keeps serving its previous version, and the report says so.
"""

from __future__ import annotations

import logging

import ray
import torch

from respec_plugin.core.learner.loop import PublishReport

logger = logging.getLogger(__name__)


def publish_drafter(replicas, weights: list[tuple[str, torch.Tensor]], version: int) -> PublishReport:
    """Push drafter ``weights`` (checkpoint names, CPU tensors) as ``version`` to all ``ReSpecReplica``s."""
    weights = [(name, tensor.detach().cpu().contiguous()) for name, tensor in weights]
    weights_ref = ray.put(weights)
    reports = ray.get([replica.server_handle.push_drafter.remote(weights_ref, version) for replica in replicas])
    errors = tuple(r.error for r in reports if not r.ok)
    report = PublishReport(
        version=version,
        accepted=len(reports) - len(errors),
        rejected=len(errors),
        errors=errors,
        serving_versions=tuple(r.version for r in reports),
    )
    if errors:
        logger.error("drafter v%d rejected by %d replica(s): %s", version, len(errors), errors[0])
    return report


def drafter_versions(replicas) -> list[int]:
    """The drafter version each replica is serving (-1: none loaded)."""
    return [r.version for r in ray.get([replica.server_handle.drafter_status.remote() for replica in replicas])]

"""Driver-side calls to every respec replica's acceptance watchdog (after each rollout) and to its scheduler's control
directory (closed when the run ends)."""

from __future__ import annotations

import ray

RESTORES_KEY = "respec/drafter_restores"
SPECULATION_OFF_KEY = "respec/speculation_off_engines"


def check_drafters(replicas) -> dict[str, float]:
    """Let every replica judge its last rollout; ``respec/drafter_restores`` (so far, over the engines) and
    ``respec/speculation_off_engines`` (engines the watchdog turned to k = 0)."""
    reports = ray.get([replica.server_handle.watchdog_check.remote() for replica in replicas])
    return {RESTORES_KEY: float(sum(report.restores for report in reports)),
            SPECULATION_OFF_KEY: float(sum(report.speculation_off for report in reports))}


def close_controls(replicas) -> None:
    ray.get([replica.server_handle.close_control.remote() for replica in replicas])

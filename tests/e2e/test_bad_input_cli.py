"""Bad input through verl's real command line (``python -m verl.trainer.main_ppo``, as the lab launches it): the run
exits non-zero before verl builds a worker or an engine, within seconds (printed), with respec's error naming the
key (or file), the bad value and the fix.

One case per kind of check, in the order the trainer runs them: each launch starts Ray, which takes most of its time.
Every case of ``tests/bad_inputs.py`` goes through the same checks in process, on the same composed config, in
tests/unit/integrations/verl/test_startup_checks.py."""

import time

import pytest

pytest.importorskip("vllm")

from respec_lab.launch import run_logged  # noqa: E402
from tests.bad_inputs import CASES, bad_input_command  # noqa: E402

# Markers of a worker or an engine being built: none may appear before the refusal.
BUILT = ("WorkerDict", "EngineCore", "ReSpecHttpServer", "init_model")
TIMEOUT_S = 240
# The respec block's parsing, the checks of the block against verl's config, the learner's checks of verl's trainer,
# the drafter checkpoint, and respec's state in the checkpoint the run resumes from.
CLI_CASES = ("k_not_an_integer", "speculative_config_too", "learner_with_async_trainer", "drafter_nan",
             "resumed_learner_state_truncated")


@pytest.mark.parametrize("name", CLI_CASES)
def test_bad_input_fails_fast_through_verls_cli(name, tiny_lab, tmp_path):
    case = CASES[name]
    argv, env = bad_input_command(case, tiny_lab, tmp_path)
    start = time.monotonic()
    result = run_logged(argv, env, tmp_path / "verl.log", timeout_s=TIMEOUT_S)
    elapsed = time.monotonic() - start
    log = result.log_path.read_text(errors="replace")
    print(f"{name}: exit {result.returncode} after {elapsed:.1f} s")
    assert result.returncode not in (0, None), f"{name} not refused (exit {result.returncode}); log {result.log_path}"
    assert "ReSpecConfigError" in log, log[-3000:]
    for phrase in case.expect:
        assert phrase in log, f"{name}: {phrase!r} not in the error; log {result.log_path}"
    built = [marker for marker in BUILT if marker in log]
    assert not built, f"{name}: refused only after {built} started; log {result.log_path}"

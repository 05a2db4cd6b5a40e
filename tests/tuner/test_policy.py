"""The tuner's policy against a simulated engine with a known cost and acceptance: safe default until calibrated,
convergence to the best k per batch bucket (deep in the long tail, off when saturated), bounded exploration,
static mode, and a checkpoint round trip."""

import json

import pytest

from respec_plugin.config import ReSpecConfigError, TunerConfig
from respec_plugin.tuner.channel import StepRecord
from respec_plugin.tuner.policy import Estimate, Tuner, bucket_ranges

ALPHA = 0.7  # per-position acceptance of the simulated drafter
BATCH_SIZES = (1, 2, 3, 6, 12, 24, 48, 96, 200)


def step_time(batch_size, k):
    """A saturating accelerator: verifying batch·(k+1) tokens dominates at large batch, drafting at small."""
    return 0.01 + 0.0004 * batch_size * (k + 1) + 0.0008 * k


def expected_tokens(k):
    return (1 - ALPHA ** (k + 1)) / (1 - ALPHA)


def goodput(batch_size, k):
    return batch_size * expected_tokens(k) / step_time(batch_size, k)


def best_static_k(batch_size, k_max=6):
    return max(range(k_max + 1), key=lambda k: goodput(batch_size, k))


def simulate(tuner, steps_per_batch=12):
    """One RL step of the simulated engine under the tuner's installed schedule: steps and request stats."""
    lookup = {}
    for start, end, k in tuner.current_schedule():
        lookup.update({b: k for b in range(start, end + 1)})
    steps, requests = [], []
    for batch_size in BATCH_SIZES:
        k = lookup.get(batch_size, tuner.current_schedule()[-1][2])
        for _ in range(steps_per_batch):
            steps.append(StepRecord(batch_size=batch_size, k=k, num_draft_tokens=batch_size * k,
                                    num_scheduled_tokens=batch_size * (k + 1),
                                    num_generated_tokens=round(batch_size * expected_tokens(k)),
                                    duration_s=step_time(batch_size, k), end_time=0.0,
                                    schedule_version=tuner.version))
        if k:
            drafted = [100 * batch_size] * k
            requests.append({"drafted_per_pos": drafted,
                             "accepted_per_pos": [round(d * ALPHA ** (i + 1)) for i, d in enumerate(drafted)]})
    return steps, requests


def run(tuner, rl_steps):
    metrics = {}
    for _ in range(rl_steps):
        steps, requests = simulate(tuner)
        metrics = tuner.observe(steps, requests)
        tuner.schedule()
    return metrics


def chosen_k(tuner, batch_size):
    return next(k for start, end, k in tuner.current_schedule() if start <= batch_size <= end)


def test_bucket_ranges():
    assert bucket_ranges((1, 2, 4, 8), 6) == [(1, 1), (2, 2), (3, 4), (5, 6)]
    assert bucket_ranges((1, 4), 256) == [(1, 1), (2, 256)]


def test_safe_default_then_one_sd_off_anchor_then_the_best_k_without_exploring():
    tuner = Tuner(TunerConfig(mode="adaptive", explore=0.0, min_steps=8), default_k=3, max_batch_size=256)
    assert tuner.schedule() == [(1, 256, 3)]  # nothing measured: the configured k
    run(tuner, 1)  # only k=3 measured: no SD-off estimate to compare with, so the buckets that ran measure it
    ran = {i for i, (start, end) in enumerate(tuner.ranges) if any(start <= b <= end for b in BATCH_SIZES)}
    assert all((k == 0) == (bucket in ran) for bucket, k in enumerate(tuner.choice))
    assert all(k == 3 for bucket, k in enumerate(tuner.choice) if bucket not in ran)  # never seen: the default
    run(tuner, 3)  # two ks measured: the model predicts the rest, each choice is measured and corrected
    for batch_size in BATCH_SIZES:
        k = chosen_k(tuner, batch_size)
        assert goodput(batch_size, k) >= 0.95 * goodput(batch_size, best_static_k(batch_size)), (batch_size, k)


def test_converges_to_the_best_k_per_bucket():
    # The simulated engine makes SD win big at batch 1 and lose at batch 200.
    assert best_static_k(1) >= 4 and best_static_k(200) == 0
    tuner = Tuner(TunerConfig(mode="adaptive", explore=0.2, min_steps=8), default_k=3, max_batch_size=256, seed=1)
    tuner.schedule()
    run(tuner, 40)
    tuner.config = TunerConfig(mode="adaptive", explore=0.0, min_steps=8)
    tuner.schedule()
    for batch_size in BATCH_SIZES:
        k = chosen_k(tuner, batch_size)
        # Within 5% of the best static k, and never below SD-off.
        assert goodput(batch_size, k) >= 0.95 * goodput(batch_size, best_static_k(batch_size)), (batch_size, k)
        assert goodput(batch_size, k) >= goodput(batch_size, 0)


def test_a_prediction_must_beat_the_best_measured_k_by_more_than_the_models_error():
    tuner = Tuner(TunerConfig(mode="adaptive"), default_k=3, max_batch_size=256)
    tuner.model_error = 0.05
    measured = {0: Estimate(100.0, True), 2: Estimate(120.0, True)}
    assert tuner._best_k({**measured, 1: Estimate(125.0, False)}) == 2  # 4% better: within the model's error
    assert tuner._best_k({**measured, 1: Estimate(127.0, False)}) == 1  # 6% better
    assert tuner._best_k({**measured, 3: Estimate(90.0, True)}) == 2
    tuner.model_error = 0.0
    assert tuner._best_k({**measured, 1: Estimate(121.0, False)}) == 1


def test_exploration_is_bounded_and_reported():
    tuner = Tuner(TunerConfig(mode="adaptive", explore=0.1), default_k=3, max_batch_size=256, seed=0)
    tuner.schedule()
    fractions = []
    for _ in range(30):
        steps, requests = simulate(tuner)
        fractions.append(tuner.observe(steps, requests)["respec/tuner/explore_frac"])
        tuner.schedule()
    assert 0.02 < sum(fractions) / len(fractions) < 0.25


def test_metrics():
    tuner = Tuner(TunerConfig(mode="adaptive", explore=0.2), default_k=3, max_batch_size=256, seed=0)
    tuner.schedule()
    metrics = run(tuner, 10)
    assert 0 <= metrics["respec/tuner/k_mean"] <= 6
    assert metrics["respec/tuner/step_time_error"] < 0.01  # the simulated cost is exactly linear
    by_bucket = tuner.schedule_metrics()
    assert set(by_bucket) == {f"respec/tuner/k_by_bucket/{s}-{e}" for s, e in tuner.ranges}


def test_static_mode_keeps_k():
    tuner = Tuner(TunerConfig(mode="static", explore=0.5), default_k=2, max_batch_size=64)
    tuner.schedule()
    metrics = run(tuner, 5)
    assert tuner.current_schedule() == [(1, 64, 2)]
    assert metrics["respec/tuner/k_mean"] == 2 and metrics["respec/tuner/explore_frac"] == 0


def test_state_round_trip():
    config = TunerConfig(mode="adaptive", explore=0.2)
    tuner = Tuner(config, default_k=3, max_batch_size=256, seed=3)
    tuner.schedule()
    run(tuner, 15)
    restored = Tuner(config, default_k=3, max_batch_size=256)
    restored.load_state_dict(tuner.state_dict())
    assert restored.current_schedule() == tuner.current_schedule()
    for bucket in range(len(tuner.ranges)):
        assert restored.goodput_estimates(bucket) == tuner.goodput_estimates(bucket)
    # The exploration coin carries on: both explore the same buckets from here (JSON, as in the checkpoint).
    restored.load_state_dict(json.loads(json.dumps(tuner.state_dict())))
    for _ in range(5):
        run(tuner, 1)
        run(restored, 1)
        assert restored.current_schedule() == tuner.current_schedule()
        assert restored.exploring == tuner.exploring


def test_config_errors_name_the_key():
    with pytest.raises(ReSpecConfigError, match="tuner.buckets"):
        TunerConfig(buckets=(4, 2))
    with pytest.raises(ReSpecConfigError, match="tuner.mode"):
        TunerConfig(mode="auto")

"""The tuner's policy against a simulated engine with a known cost and acceptance: safe default until calibrated,
convergence to the best k per batch bucket (deep in the long tail, off when saturated), bounded exploration,
static mode, and a checkpoint round trip."""

import json

import pytest

from respec_plugin.core.config import ReSpecConfigError, TunerConfig
from respec_plugin.core.tuner.channel import StepRecord
from respec_plugin.core.tuner.policy import STATE_FORMAT, Estimate, Tuner, bucket_ranges
from respec_plugin.core.tuner.throughput import Throughput, Trial
from tests.unit.core.tuner.records import request

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


def lookup(schedule):
    """Batch size -> k; batch sizes past the schedule's end run its last k (as vLLM clamps to max_num_seqs)."""
    table = {b: k for start, end, k in schedule for b in range(start, end + 1)}
    return {b: table.get(b, schedule[-1][2]) for b in BATCH_SIZES} if schedule else {}


def simulate(tuner, steps_per_batch=24, block=4):
    """One RL step of the simulated engine under the tuner's installed schedules (the alternate one in every other
    block of steps, as the scheduler runs trials): steps and request stats."""
    main, alternate = lookup(tuner.current_schedule()), lookup(tuner.alternate_schedule() or [])
    steps, requests = [], []
    for batch_size in BATCH_SIZES:
        ks = set()
        for index in range(steps_per_batch):
            on_alternate = bool(alternate) and (index // block) % 2 == 1
            k = (alternate if on_alternate else main)[batch_size]
            ks.add(k)
            steps.append(StepRecord(batch_size=batch_size, k=k, num_draft_tokens=batch_size * k,
                                    num_scheduled_tokens=batch_size * (k + 1),
                                    num_generated_tokens=round(batch_size * expected_tokens(k)),
                                    duration_s=step_time(batch_size, k), end_time=0.0,
                                    schedule_version=tuner.version, alternate=on_alternate))
        for k in ks - {0}:
            drafted = [100 * batch_size] * k
            requests.append(request(drafted, [round(d * ALPHA ** (i + 1)) for i, d in enumerate(drafted)]))
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
    assert tuner.alternate_schedule() is None
    run(tuner, 1)  # only k=3 measured: no SD-off estimate to compare with, so the buckets that ran try it
    ran = {i for i, (start, end) in enumerate(tuner.ranges) if any(start <= b <= end for b in BATCH_SIZES)}
    assert tuner.choice == [3] * len(tuner.ranges)  # the choice changes by trials only
    assert all((k == 0) == (bucket in ran) for bucket, k in enumerate(tuner.challengers) if k is not None)
    assert all(tuner.challengers[bucket] is None for bucket in range(len(tuner.ranges)) if bucket not in ran)
    metrics = run(tuner, 1)  # the trials against SD-off settle: it wins at large batch sizes only
    assert metrics["respec/tuner/trials_settled"] == len(ran)
    assert [tuner.choice[tuner.bucket(step)] for step in simulate(tuner)[0][::24]] == [
        0 if goodput(b, 0) > goodput(b, 3) else 3 for b in BATCH_SIZES]
    run(tuner, 4)  # two ks measured: the model proposes the rest, one trial per bucket and rollout
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


def trial_step(k, alternate, seconds, batch_size=6, version=0):
    """A decode step of a trial at 5-8 requests that generates two tokens per request."""
    return StepRecord(batch_size=batch_size, k=k, num_draft_tokens=batch_size * k,
                      num_scheduled_tokens=batch_size * (k + 1), num_generated_tokens=2 * batch_size,
                      duration_s=seconds, end_time=0.0, schedule_version=version, alternate=alternate)


def test_a_trial_compares_the_two_ks_on_the_same_steps_only():
    """Steps of another schedule version, and the first step of each block, are no evidence for the trial."""
    tuner = Tuner(TunerConfig(mode="adaptive", explore=0.0, min_steps=2), default_k=2, max_batch_size=8)
    tuner.trials = [None, None, None, Trial(challenger=1)]  # buckets 1, 2, 3-4, 5-8: k=1 against k=2 at 5-8
    # k=2 takes 1 s per step, k=1 2 s; the block starts (0.1 s, and 10 s) and another version (0.01 s) would
    # turn the verdict around if they counted.
    blocks = [trial_step(2, False, 0.1), trial_step(2, False, 1.0), trial_step(2, False, 1.0),
              trial_step(1, True, 10.0), trial_step(1, True, 2.0), trial_step(1, True, 2.0),
              trial_step(1, True, 0.01, version=-1)]
    metrics = tuner.observe(blocks, [])
    assert metrics["respec/tuner/trials_settled"] == 1 and metrics["respec/tuner/trials_won"] == 0
    assert tuner.choice[3] == 2 and tuner.beaten[3] == {1} and tuner.trials[3] is None
    assert tuner.alternate_schedule() is None


def test_a_trial_compares_the_two_ks_at_the_batch_sizes_both_ran():
    """As a rollout drains through a bucket, the later block runs fewer requests: the sides are compared batch size
    by batch size, and batch sizes only one side ran are no evidence."""
    tuner = Tuner(TunerConfig(mode="adaptive", explore=0.0, min_steps=3), default_k=2, max_batch_size=8)
    tuner.trials = [None, None, None, Trial(challenger=1)]
    # At every batch size k=1 takes 0.9 s per step where k=2 takes 1 s, and both generate the same tokens; but k=2
    # ran most of its steps at 8 requests, k=1 at 6: over the whole bucket k=2 made 14.9 tokens/s, k=1 13.7.
    incumbent = [trial_step(2, False, 1.0, batch_size=b) for b in (8, 8, 8, 8, 8, 8, 8, 7)]
    challenger = [trial_step(1, True, 0.9, batch_size=b) for b in (7, 7, 6, 6, 6, 6, 6, 6)]
    drained = [trial_step(2, False, 1.0, batch_size=6) for _ in range(3)]
    metrics = tuner.observe(incumbent + challenger + drained, [])
    assert metrics["respec/tuner/trials_won"] == 1 and tuner.choice[3] == 1


def test_the_challenger_is_the_best_estimate_that_has_not_lost_to_the_incumbent():
    tuner = Tuner(TunerConfig(mode="adaptive", explore=0.0), default_k=2, max_batch_size=1)
    estimates = {0: Estimate(100.0, True), 1: Estimate(125.0, False), 2: Estimate(120.0, True),
                 3: Estimate(110.0, False)}
    tuner.goodput_estimates = lambda bucket: estimates
    assert tuner._next_challenger(0, explore=False) == 1  # predicted 4% above the incumbent: worth a trial
    tuner.beaten[0] = {1}
    assert tuner._next_challenger(0, explore=False) is None  # nothing else beats the incumbent's 120
    tuner.measured[(0, 0)] = Throughput(tokens=2000.0, seconds=20.0, steps=20.0, batch_sum=20.0)
    tuner.measured[(0, 1)] = Throughput(tokens=1250.0, seconds=10.0, steps=10.0, batch_sum=10.0)
    assert tuner._next_challenger(0, explore=True) == 3  # a neighbour or SD-off: the least measured one
    estimates[3] = Estimate(130.0, False)
    assert tuner._next_challenger(0, explore=False) == 3


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
    assert {key for key in by_bucket if "/k_by_bucket/" in key} == {
        f"respec/tuner/k_by_bucket/{s}-{e}" for s, e in tuner.ranges}
    assert {key for key in by_bucket if "/trial_k_by_bucket/" in key} == {
        f"respec/tuner/trial_k_by_bucket/{s}-{e}"
        for (s, e), k in zip(tuner.ranges, tuner.challengers) if k is not None}


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
        assert restored.trials == tuner.trials


def test_a_trial_under_way_round_trips_through_json():
    tuner = Tuner(TunerConfig(mode="adaptive", explore=0.0, min_steps=100), default_k=2, max_batch_size=8)
    tuner.trials = [None, None, None, Trial(challenger=1)]
    tuner.observe([trial_step(2, False, 1.0)] * 3 + [trial_step(1, True, 0.9)] * 3, [])  # too few steps to settle
    assert tuner.trials[3].evidence[6].challenger.steps == 2  # the first step of each block is no evidence
    restored = Tuner(tuner.config, default_k=2, max_batch_size=8)
    restored.load_state_dict(json.loads(json.dumps(tuner.state_dict())))
    assert restored.trials == tuner.trials and restored.measured == tuner.measured


def test_a_state_of_another_format_is_refused():
    tuner = Tuner(TunerConfig(mode="adaptive"), default_k=2, max_batch_size=8)
    state = tuner.state_dict()
    assert state["format"] == STATE_FORMAT
    with pytest.raises(ValueError, match=f"format 0.*format {STATE_FORMAT}"):
        tuner.load_state_dict({**state, "format": 0})
    with pytest.raises(ValueError, match=f"format None.*format {STATE_FORMAT}"):
        tuner.load_state_dict({key: value for key, value in state.items() if key != "format"})


def test_with_other_buckets_only_the_cost_model_carries_over():
    config = TunerConfig(mode="adaptive", explore=0.2)
    tuner = Tuner(config, default_k=3, max_batch_size=256, seed=3)
    tuner.schedule()
    run(tuner, 5)
    other = Tuner(TunerConfig(mode="adaptive", explore=0.2, buckets=(1, 4, 16)), default_k=3, max_batch_size=256)
    other.load_state_dict(tuner.state_dict())
    assert other.time_model.state_dict() == tuner.time_model.state_dict() and not other.measured
    assert other.choice == [3] * len(other.ranges) and other.challengers == [None] * len(other.ranges)


def test_config_errors_name_the_key():
    with pytest.raises(ReSpecConfigError, match="tuner.buckets"):
        TunerConfig(buckets=(4, 2))
    with pytest.raises(ReSpecConfigError, match="tuner.mode"):
        TunerConfig(mode="auto")

"""The cost model on hand-made measurements: the step-time fit recovers a known cost, acceptance per position
gives E(k), and the state survives a round trip."""

import math

import numpy as np
import pytest

from respec_plugin.core.tuner.channel import StepRecord
from respec_plugin.core.tuner.cost_model import AcceptanceModel, StepTimeModel, predicted_goodput, step_features
from tests.unit.core.tuner.records import request

TRUE_COEFFICIENTS = np.array([0.004, 0.0002, 0.0003, 0.001])


def step(batch_size, k, duration_s=None, num_generated_tokens=None):
    verified = batch_size * (k + 1)
    if duration_s is None:
        duration_s = float(step_features(batch_size, k) @ TRUE_COEFFICIENTS)
    return StepRecord(batch_size=batch_size, k=k, num_draft_tokens=batch_size * k, num_scheduled_tokens=verified,
                      num_generated_tokens=num_generated_tokens or batch_size, duration_s=duration_s, end_time=0.0,
                      schedule_version=0)


def test_step_time_fit_recovers_the_cost():
    model = StepTimeModel.empty()
    model.observe([step(b, k) for b in (1, 3, 8, 30, 100) for k in (0, 1, 3, 5)])
    assert model.calibrated(min_steps=8)
    for b, k in [(2, 2), (64, 4), (250, 0)]:
        truth = float(step_features(b, k) @ TRUE_COEFFICIENTS)
        assert model.predict(b, k) == pytest.approx(truth, rel=1e-3)


def test_noisy_steps_fit_within_noise():
    rng = np.random.default_rng(0)
    model = StepTimeModel.empty()
    steps = [step(b, k) for b in range(1, 65, 3) for k in range(5)] * 4
    model.observe([step(s.batch_size, s.k, s.duration_s * rng.uniform(0.9, 1.1)) for s in steps])
    for b, k in [(4, 3), (60, 1)]:
        assert model.predict(b, k) == pytest.approx(float(step_features(b, k) @ TRUE_COEFFICIENTS), rel=0.05)


def test_one_k_only_is_not_calibrated():
    model = StepTimeModel.empty()
    model.observe([step(b, 3) for b in (1, 2, 4, 8, 16)] * 4)
    assert not model.calibrated(min_steps=8)
    model.observe([step(b, 0) for b in (1, 16)])
    assert model.calibrated(min_steps=8)


def test_forgetting_follows_a_changed_cost():
    model = StepTimeModel.empty()
    grid = [(b, k) for b in (1, 4, 16, 64) for k in (0, 2, 4)]
    model.observe([step(b, k) for b, k in grid])
    for _ in range(20):  # the engine got twice as slow
        model.observe([step(b, k, 2 * float(step_features(b, k) @ TRUE_COEFFICIENTS)) for b, k in grid], forget=0.5)
    assert model.predict(16, 2) == pytest.approx(2 * float(step_features(16, 2) @ TRUE_COEFFICIENTS), rel=1e-3)


def _record(drafted_per_pos, accepted_per_pos):
    return request(drafted_per_pos, accepted_per_pos)


def test_expected_tokens_from_positions():
    acceptance = AcceptanceModel.empty()
    assert not acceptance.calibrated
    # 100 verify steps at k=3: prefix acceptance 0.8, 0.6, 0.4.
    acceptance.observe([_record([60, 60, 60], [48, 36, 24]), _record([40, 40, 40], [32, 24, 16])])
    assert acceptance.calibrated
    assert acceptance.expected_tokens(0) == 1.0
    assert acceptance.expected_tokens(2) == pytest.approx(1 + 0.8 + 0.6)
    assert acceptance.expected_tokens(3) == pytest.approx(1 + 0.8 + 0.6 + 0.4)
    # Beyond the drafted positions the last per-position rate (0.4 / 0.6) continues geometrically.
    assert acceptance.expected_tokens(5) == pytest.approx(2.8 + 0.4 * (2 / 3) + 0.4 * (2 / 3) ** 2)


def test_expected_tokens_match_the_geometric_formula():
    alpha = 0.7
    acceptance = AcceptanceModel.empty()
    acceptance.observe([_record([1000, 1000], [round(1000 * alpha), round(1000 * alpha**2)])])
    for k in range(7):
        assert acceptance.expected_tokens(k) == pytest.approx((1 - alpha ** (k + 1)) / (1 - alpha), rel=1e-6)


def test_goodput_and_state_round_trip():
    model, acceptance = StepTimeModel.empty(), AcceptanceModel.empty()
    model.observe([step(b, k) for b in (1, 8, 64) for k in (0, 2, 4)])
    acceptance.observe([_record([10, 10], [7, 5])])
    goodput = predicted_goodput(model, acceptance, 8, 2)
    assert goodput == pytest.approx(8 * (1 + 0.7 + 0.5) / float(step_features(8, 2) @ TRUE_COEFFICIENTS), rel=1e-3)
    restored = predicted_goodput(StepTimeModel.from_state_dict(model.state_dict()),
                                 AcceptanceModel.from_state_dict(acceptance.state_dict()), 8, 2)
    assert math.isclose(goodput, restored)

"""Per-request speculation records, their trip through ``extra_fields`` (multi-turn included) and their per-step
aggregation, on hand-computed cases."""

import dataclasses

import pytest

from respec_plugin.core.spec_stats import RequestSpecStats, aggregate_step_metrics


def _record(drafted, accepted, tokens, start=0.0, end=1.0, k=3, version=2) -> RequestSpecStats:
    return RequestSpecStats.from_vllm(
        drafted,
        accepted,
        num_output_tokens=tokens,
        num_speculative_tokens=k,
        drafter_version=version,
        start_time=start,
        end_time=end,
    )


def test_request_counts_accepted_prefix_per_position():
    rec = _record([3, 3, 3, 2], [3, 0, 1, 2], tokens=10)
    assert rec.num_verify_steps == 4
    assert rec.num_draft_tokens == 11 and rec.num_accepted_tokens == 6
    assert rec.drafted_per_pos == (4, 4, 3)
    assert rec.accepted_per_pos == (3, 2, 1)


def test_request_rejects_more_accepted_than_drafted():
    with pytest.raises(ValueError, match="accepted 3 of 2"):
        _record([2], [3], tokens=4)


def test_extra_fields_round_trip_and_carry_verls_counts():
    rec = _record([3, 3, 3, 2], [3, 0, 1, 2], tokens=10)
    fields = rec.to_extra_fields()
    assert (fields["spec_num_draft_tokens"], fields["spec_num_accepted_tokens"], fields["spec_num_verify_steps"]) == (
        11, 6, 4)
    assert isinstance(fields["respec"]["drafted_per_pos"], list)  # plain values through TransferQueue
    assert RequestSpecStats.from_extra_fields(fields) == rec
    assert RequestSpecStats.from_extra_fields({}) is None and RequestSpecStats.from_extra_fields(None) is None


def test_a_multi_turn_trajectory_counts_every_turn():
    """verl's tool agent loop keeps the first turn's extra fields and sums the ``spec_num_*`` counts over turns."""
    first, second = _record([3, 3], [3, 1], tokens=7), _record([3], [2], tokens=3)
    fields = first.to_extra_fields()
    for key, value in second.to_extra_fields().items():
        if key.startswith("spec_num_"):
            fields[key] += value
    parsed = RequestSpecStats.from_extra_fields(fields)
    assert (parsed.num_draft_tokens, parsed.num_accepted_tokens, parsed.num_verify_steps) == (9, 6, 3)
    assert parsed.drafted_per_pos == first.drafted_per_pos  # per position: the first turn's
    assert aggregate_step_metrics([parsed])["respec/accept_length"] == pytest.approx(1 + 6 / 3)


def test_step_metrics_are_token_weighted_over_requests():
    a = _record([3, 3], [3, 1], tokens=7, start=10.0, end=11.0)  # 2 steps, 4 accepted of 6
    b = _record([3], [0], tokens=1, start=10.5, end=12.0)  # 1 step, 0 of 3
    m = aggregate_step_metrics([a, b])
    assert m["respec/accept_length"] == pytest.approx(1 + 4 / 3)
    assert m["respec/accept_rate"] == pytest.approx(4 / 9)
    assert m["respec/accepted_per_pos/0"] == pytest.approx(2 / 3)
    assert m["respec/accepted_per_pos/1"] == pytest.approx(1 / 3)
    assert m["respec/accepted_per_pos/2"] == pytest.approx(1 / 3)
    assert m["respec/rollout_tokens_per_s"] == pytest.approx(8 / 2.0)
    assert m["respec/k"] == 3 and m["respec/drafter_version"] == 2


def test_speculation_off_still_reports_throughput():
    m = aggregate_step_metrics([_record([], [], tokens=5, k=0)])
    assert m["respec/accept_length"] == 1.0 and m["respec/accept_rate"] == 0.0
    assert m["respec/rollout_tokens_per_s"] == pytest.approx(5.0)
    assert not any(key.startswith("respec/accepted_per_pos") for key in m)


def test_no_records_no_metrics():
    assert aggregate_step_metrics([]) == {}


def test_records_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        _record([1], [1], tokens=2).num_output_tokens = 3

"""The dashboard draws a valid PNG from per-step metrics, whatever subset of the metrics the runs recorded."""

import math
import struct
import zlib

import pytest

from respec_plugin.core.report import (
    ACCEPT_LENGTH,
    LEARNER_LOSS,
    REWARD,
    ROLLOUT_TOKENS_PER_S,
    STEP_TIME,
    TUNER_K,
    draw_dashboard,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path) -> tuple[int, int]:
    """Width and height of a PNG, after checking its signature and that every chunk's CRC matches and it ends."""
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    offset, chunks = len(PNG_SIGNATURE), []
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset:offset + 4])
        kind, body = data[offset + 4:offset + 8], data[offset + 8:offset + 8 + length]
        (crc,) = struct.unpack(">I", data[offset + 8 + length:offset + 12 + length])
        assert zlib.crc32(kind + body) == crc, kind
        chunks.append((kind, body))
        offset += 12 + length
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    return struct.unpack(">II", chunks[0][1][:8])


def respec_steps(num_steps: int, k: float | None, loss: bool) -> dict[int, dict[str, float]]:
    steps = {}
    for step in range(1, num_steps + 1):
        metrics = {ACCEPT_LENGTH: 2.0 + 0.1 * step, ROLLOUT_TOKENS_PER_S: 300.0 + step, REWARD: 0.1 * step,
                   STEP_TIME: 6.0}
        if k is not None:
            metrics[TUNER_K] = k
        if loss:
            metrics[LEARNER_LOSS] = 1.0 / step
        steps[step] = metrics
    return steps


ALL_PANELS = {"Acceptance length", "Rollout throughput", "Chosen k (tuner mean, else static k)",
              "Drafter learner loss", "Reward", "RL step time"}


def test_dashboard_of_runs_against_a_baseline(tmp_path):
    baseline = {step: {ROLLOUT_TOKENS_PER_S: 250.0, REWARD: 0.05 * step, STEP_TIME: 7.0} for step in range(1, 6)}
    runs = {"vllm": baseline, "static": respec_steps(5, None, loss=False), "full": respec_steps(5, 2.5, loss=True)}
    dashboard = draw_dashboard(runs, tmp_path / "out" / "dash.png", baseline="vllm", title="test")
    width, height = png_size(dashboard.path)
    assert width > 800 and height > 500
    assert dashboard.not_recorded == ()


def test_a_drawn_dashboard_leaves_no_figure_behind(tmp_path):
    """The trainer draws one at every checkpoint; a figure left for a full collection is memory that grows per save."""
    import gc

    from matplotlib.figure import Figure

    runs = {"full": respec_steps(5, 2.5, loss=True)}
    gc.collect()
    gc.disable()
    try:
        for i in range(3):
            draw_dashboard(runs, tmp_path / f"dash{i}.png")
        alive = [o for o in gc.get_objects() if isinstance(o, Figure)]
    finally:
        gc.enable()
    assert alive == []


@pytest.mark.parametrize(
    ("runs", "recorded"),
    [
        ({}, set()),  # nothing at all
        ({"respec": {}}, set()),  # a run that logged no step
        ({"respec": {1: {REWARD: 0.5}}}, {"Reward"}),  # only verl's own metrics
        ({"respec": {1: {ACCEPT_LENGTH: math.nan, LEARNER_LOSS: math.inf}, 2: {ACCEPT_LENGTH: 2.5}}},
         {"Acceptance length"}),  # non-finite values are gaps, not points
        ({"respec": respec_steps(3, None, loss=False)}, ALL_PANELS - {"Chosen k (tuner mean, else static k)",
                                                                      "Drafter learner loss"}),
    ],
    ids=["no-runs", "no-steps", "only-reward", "non-finite", "no-tuner-no-learner"],
)
def test_missing_metrics_draw_not_recorded_panels(tmp_path, runs, recorded):
    dashboard = draw_dashboard(runs, tmp_path / "dash.png")
    assert png_size(dashboard.path)[0] > 0
    assert set(dashboard.not_recorded) == ALL_PANELS - recorded


def test_baseline_without_throughput_leaves_the_speedup_panel_empty(tmp_path):
    runs = {"vllm": {1: {REWARD: 0.1}}, "respec": respec_steps(3, 3.0, loss=True)}
    dashboard = draw_dashboard(runs, tmp_path / "dash.png", baseline="vllm")
    assert png_size(dashboard.path)[0] > 0
    assert dashboard.not_recorded == ("Rollout speedup vs vllm",)


def test_unknown_baseline_is_named(tmp_path):
    with pytest.raises(ValueError, match="baseline='vllm'"):
        draw_dashboard({"static": respec_steps(3, None, loss=False)}, tmp_path / "dash.png", baseline="vllm")

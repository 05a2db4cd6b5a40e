"""The tuner's plumbing without an engine: the respec block turns into vLLM's dynamic schedule and scheduler,
the file channel carries schedules in and step records out, and a server-side update installs a schedule."""

import os

import pytest

from respec_plugin.core.config import ReSpecConfig, ReSpecConfigError
from respec_plugin.core.tuner.channel import (
    CONTROL_DIR_KEY,
    K0_SKIPS_DRAFTER_KEY,
    RECORD_STEPS_KEY,
    SCHEDULER_CLS,
    SPECULATION_OFF_VERSION,
    StepRecord,
    append_steps,
    read_schedule,
    schedule_stamp,
    take_steps,
)
from respec_plugin.core.tuner.service import V2_MODEL_RUNNER_ENV, EngineControl, EngineTuner
from tests.unit.core.tuner.records import request


def _config(**tuner):
    return ReSpecConfig.from_mapping({"method": "ngram", "num_speculative_tokens": 2,
                                      "tuner": {"mode": "adaptive", **tuner}})


def _tuner(config: ReSpecConfig, max_num_seqs: int = 64) -> EngineTuner:
    control = EngineControl(config.num_speculative_tokens, max_num_seqs, record_steps=True,
                            k0_skips_drafter=config.tuner.k0_skips_drafter)
    return EngineTuner(config, control)


def _step(batch_size, k, duration_s=0.01):
    return StepRecord(batch_size=batch_size, k=k, num_draft_tokens=batch_size * k,
                      num_scheduled_tokens=batch_size * (k + 1), num_generated_tokens=batch_size,
                      duration_s=duration_s, end_time=0.0, schedule_version=0)


def test_tuner_block_asks_vllm_for_a_dynamic_schedule():
    config = _config(k_max=5, buckets=[1, 8, 64])
    spec = config.speculative_config()
    # The engine may draft up to k_max; the default k serves every batch size until the tuner knows better.
    assert spec["num_speculative_tokens"] == 5
    assert spec["num_speculative_tokens_per_batch_size"] == [(1, 1, 2)]
    assert config.tuner.buckets == (1, 8, 64)
    static = ReSpecConfig.from_mapping({"method": "ngram"}).speculative_config()
    assert "num_speculative_tokens_per_batch_size" not in static


@pytest.mark.parametrize("block, key", [
    ({"num_speculative_tokens": 0, "tuner": {"mode": "adaptive"}}, "tuner.mode"),
    ({"num_speculative_tokens": 5, "tuner": {"mode": "static", "k_max": 4}}, "num_speculative_tokens"),
    ({"tuner": {"explore": 1.5}}, "tuner.explore"),
    ({"tuner": {"k_mx": 4}}, "tuner.k_mx"),
])
def test_bad_tuner_blocks_name_the_key(block, key):
    with pytest.raises(ReSpecConfigError, match=key.replace(".", r"\.")):
        ReSpecConfig.from_mapping({"method": "ngram", **block})


def test_channel_round_trip(tmp_path):
    directory = str(tmp_path)
    assert schedule_stamp(directory) is None and take_steps(directory) == []
    tuner = _tuner(_config())
    assert read_schedule(tuner.control.control_dir) == ([(1, 64, 2)], 0, None)
    stamp = schedule_stamp(tuner.control.control_dir)
    append_steps(directory, [_step(4, 2), _step(1, 2)])
    append_steps(directory, [_step(2, 0)])
    assert [s.batch_size for s in take_steps(directory)] == [4, 1, 2]
    assert take_steps(directory) == []
    tuner.update()
    assert schedule_stamp(tuner.control.control_dir) != stamp


def test_engine_kwargs_and_data_parallel(monkeypatch):
    monkeypatch.setenv(V2_MODEL_RUNNER_ENV, "")  # so that monkeypatch restores the variable the tuner sets
    monkeypatch.delenv(V2_MODEL_RUNNER_ENV)
    tuner = _tuner(_config())
    kwargs = {"additional_config": {"other": 1}}
    tuner.configure_engine(kwargs, data_parallel_size=1)
    assert kwargs["scheduler_cls"] == SCHEDULER_CLS
    assert kwargs["additional_config"] == {"other": 1, CONTROL_DIR_KEY: tuner.control.control_dir,
                                            RECORD_STEPS_KEY: True, K0_SKIPS_DRAFTER_KEY: True}
    kept = {}
    _tuner(_config(k0_skips_drafter=False)).configure_engine(kept, data_parallel_size=1)
    assert kept["additional_config"][K0_SKIPS_DRAFTER_KEY] is False
    # vLLM's V2 model runner ignores the per-step k when drafting: the engine gets the V1 runner, unless the user chose.
    assert os.environ[V2_MODEL_RUNNER_ENV] == "0"
    monkeypatch.setenv(V2_MODEL_RUNNER_ENV, "1")
    tuner.configure_engine({}, data_parallel_size=1)
    assert os.environ[V2_MODEL_RUNNER_ENV] == "1"
    with pytest.raises(ReSpecConfigError, match="data_parallel_size=1"):
        tuner.configure_engine({}, data_parallel_size=2)


def test_a_users_own_scheduler_cls_is_refused():
    with pytest.raises(ReSpecConfigError, match=r"engine_kwargs\.vllm\.scheduler_cls='my\.Scheduler' conflicts with "
                                                r"respec's scheduler"):
        _tuner(_config()).configure_engine({"scheduler_cls": "my.Scheduler"}, data_parallel_size=1)


def test_update_learns_from_steps_and_requests():
    tuner = _tuner(_config(explore=0.0, min_steps=2))
    steps = [_step(b, k, 0.01 + 0.001 * b * (k + 1)) for b in (1, 8, 32) for k in (0, 2) for _ in range(3)]
    append_steps(tuner.control.control_dir, steps)
    tuner.observe_request(request([10, 10], [9, 8]))
    metrics = tuner.update()
    assert metrics["respec/tuner/k_mean"] == pytest.approx(1.0)
    assert any(key.startswith("respec/tuner/k_by_bucket/") for key in metrics)
    schedule, version, alternate = read_schedule(tuner.control.control_dir)
    assert version == 1 and schedule == tuner.tuner.current_schedule()
    assert alternate == tuner.tuner.alternate_schedule() is not None  # two ks measured, the model proposes a trial
    state = tuner.state_dict()
    resumed = _tuner(_config())
    resumed.load_state_dict(state)
    assert read_schedule(resumed.control.control_dir) == (schedule, 1, alternate)


def test_watchdog_alone_gets_a_static_schedule_without_records(tmp_path):
    drafter = tmp_path / "drafter"
    drafter.mkdir()
    (drafter / "config.json").write_text("{}")
    config = ReSpecConfig.from_mapping({"drafter_path": str(drafter), "num_speculative_tokens": 3})
    assert config.watchdog_enabled and config.uses_scheduler and not config.tuner.enabled
    spec = config.speculative_config()
    assert spec["num_speculative_tokens"] == 3 and spec["num_speculative_tokens_per_batch_size"] == [(1, 1, 3)]
    off = ReSpecConfig.from_mapping({"drafter_path": str(drafter), "watchdog": {"enable": False}})
    assert not off.uses_scheduler and "num_speculative_tokens_per_batch_size" not in off.speculative_config()
    control = EngineControl(3, 32, record_steps=False, k0_skips_drafter=True)
    kwargs = {}
    control.configure_engine(kwargs)
    assert kwargs["additional_config"][RECORD_STEPS_KEY] is False
    assert read_schedule(control.control_dir) == ([(1, 32, 3)], 0, None)


def test_control_directory_is_private_and_removed_at_close():
    control = EngineControl(2, 64, record_steps=True, k0_skips_drafter=True)
    assert os.stat(control.control_dir).st_mode & 0o777 == 0o700
    control.close()
    assert not os.path.exists(control.control_dir)


def test_speculation_off_stays_off():
    tuner = _tuner(_config(explore=0.0, min_steps=2))
    assert not EngineControl(2, 64, record_steps=False, k0_skips_drafter=True).turn_speculation_off()  # no engine
    tuner.configure_engine({}, data_parallel_size=1)
    assert tuner.control.turn_speculation_off()
    assert read_schedule(tuner.control.control_dir) == ([(1, 64, 0)], SPECULATION_OFF_VERSION, None)
    append_steps(tuner.control.control_dir, [_step(8, 2)] * 4)
    assert tuner.update() == {}  # the tuner no longer schedules, and its records are taken away
    assert read_schedule(tuner.control.control_dir) == ([(1, 64, 0)], SPECULATION_OFF_VERSION, None)
    assert take_steps(tuner.control.control_dir) == []

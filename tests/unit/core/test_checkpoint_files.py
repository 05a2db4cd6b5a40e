"""Where respec's state is restored from and how it is written: the fallback to an earlier step when verl's latest
checkpoint lacks it (a run killed between verl's save and respec's), and all-or-nothing writes."""

import pytest

from respec_plugin.core.checkpoint_files import (
    ACTOR_DIR,
    LATEST_STEP_FILE,
    LEARNER_STATE_DIR,
    TUNER_STATE_FILE,
    latest_checkpointed_step,
    prune_orphaned_state,
    restore_folder,
    step_folder,
    written_atomically,
)

NAME = "respec_learner"


def _step(tmp_path, step, with_state):
    folder = tmp_path / f"global_step_{step}"
    folder.mkdir()
    if with_state:
        (folder / NAME).mkdir()
    return folder


def test_the_resumed_folder_when_it_has_the_state(tmp_path):
    _step(tmp_path, 2, True)
    resumed = _step(tmp_path, 4, True)
    assert restore_folder(step_folder(tmp_path, 4), 4, NAME) == resumed


def test_falls_back_to_the_newest_earlier_step_with_the_state(tmp_path, caplog):
    _step(tmp_path, 2, True)
    three = _step(tmp_path, 3, True)
    _step(tmp_path, 4, False)  # killed after verl's save, before respec's
    _step(tmp_path, 10, True)  # a later step (of an earlier, longer run) is never used
    with caplog.at_level("WARNING"):
        assert restore_folder(step_folder(tmp_path, 4), 4, NAME) == three
    assert "restoring it from step 3" in caplog.text


def test_none_from_scratch_or_without_any_state(tmp_path):
    assert restore_folder(None, 0, NAME) is None
    _step(tmp_path, 1, False)
    _step(tmp_path, 2, False)
    assert restore_folder(step_folder(tmp_path, 2), 2, NAME) is None


def test_a_folder_resumed_from_elsewhere_looks_beside_itself(tmp_path):
    one = _step(tmp_path, 1, True)
    two = _step(tmp_path, 2, False)
    assert restore_folder(two, 2, NAME) == one


def test_written_atomically_replaces_or_leaves_the_old_state(tmp_path):
    target = tmp_path / "state.json"
    with written_atomically(target) as partial:
        partial.write_text("v1")
    with pytest.raises(RuntimeError):
        with written_atomically(target) as partial:
            partial.write_text("half of v2")
            raise RuntimeError("killed mid-save")
    assert target.read_text() == "v1"
    directory = tmp_path / NAME
    for version in ("v1", "v2"):  # a directory, saved twice (the same step saved again)
        with written_atomically(directory) as partial:
            partial.mkdir()
            (partial / "drafter").write_text(version)
    assert (directory / "drafter").read_text() == "v2"
    # The killed save's leftover is cleared by the next save; the directory saves left none.
    assert sorted(p.name for p in tmp_path.iterdir()) == [NAME, "state.json", "state.json.partial"]


def test_respec_state_is_pruned_with_the_trainers_checkpoint(tmp_path):
    for step in (10, 20, 30):
        folder = tmp_path / f"global_step_{step}"
        (folder / ACTOR_DIR).mkdir(parents=True)
        (folder / LEARNER_STATE_DIR).mkdir()
        (folder / TUNER_STATE_FILE).write_text("[]")
    # The trainer kept two checkpoints: it removed step 10's actor folder; step 20 also holds a file of someone else.
    (tmp_path / "global_step_10" / ACTOR_DIR).rmdir()
    (tmp_path / "global_step_20" / ACTOR_DIR).rmdir()
    (tmp_path / "global_step_20" / "data.pt").write_text("x")
    assert sorted(p.name for p in prune_orphaned_state(tmp_path)) == ["global_step_10", "global_step_20"]
    assert not (tmp_path / "global_step_10").exists()
    assert sorted(p.name for p in (tmp_path / "global_step_20").iterdir()) == ["data.pt"]
    assert (tmp_path / "global_step_30" / LEARNER_STATE_DIR).is_dir()
    assert prune_orphaned_state(tmp_path) == []


def test_latest_checkpointed_step_reads_verls_marker(tmp_path):
    assert latest_checkpointed_step(tmp_path) is None
    (tmp_path / LATEST_STEP_FILE).write_text("30\n")
    assert latest_checkpointed_step(tmp_path) == 30
    (tmp_path / LATEST_STEP_FILE).write_text("partial")
    assert latest_checkpointed_step(tmp_path) is None

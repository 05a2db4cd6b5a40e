"""One rank's learner session between RL steps, with a stand-in for the co-located engine: a trained candidate is
pushed in the weight sync and serves; one the engine refuses is reverted and the serving drafter pushed again; after
a sleep the serving drafter is pushed again; a step whose features were lost, or whose training fails, never pushes a
candidate and never raises; a candidate pending at a checkpoint is published after the resume."""

import asyncio
import threading

import pytest
import torch

from respec_plugin.core.learner.loop import OnlineLearner
from respec_plugin.core.learner.session import LearnerSession
from tests.unit.core.learner.test_data_parallel import CONFIG, _drafter, _rows


class Engine:
    """Stands in for the co-located vLLM engine: records the versions pushed, refuses the ones in ``refuse``."""

    def __init__(self, refuse=()):
        self.pushed: list[int] = []
        self.refuse = set(refuse)

    async def push_drafter(self, weights, version):
        assert all(torch.isfinite(t).all() for _, t in weights if t.is_floating_point())
        self.pushed.append(version)
        return "shape mismatch" if version in self.refuse else None


def _session():
    config = CONFIG.__class__(**{**CONFIG.__dict__, "learning_rate": 3e-3})
    return LearnerSession(OnlineLearner(config, _drafter(), serving_version=0))


def _step(session, engine, resync=False, rows=None):
    session.begin_capture()
    session.add_captured(rows if rows is not None else _rows())
    train_metrics = session.train({row.row: row.weight for row in _rows()}, step=1)
    asyncio.run(session.publish(engine, resync=resync))
    return train_metrics, session.status()


def _accepting(session):
    """Make every candidate pass its held-out check (this test is about publication, not learning)."""
    session.learner._held_out_scores = lambda drafter, held_out: {"greedy_acceptance": 0.5, "tv": 0.5,
                                                                 "greedy_acceptance_ceiling": 0.9}


def test_a_candidate_is_published_in_the_weight_sync():
    session, engine = _session(), Engine()
    _accepting(session)
    train_metrics, status = _step(session, engine)
    assert engine.pushed == [1]
    assert status["respec/learner/published_version"] == 1 and status["respec/learner/engine_version"] == 1
    assert train_metrics["respec/learner/tokens"] > 0 and train_metrics["respec/learner/train_s"] > 0
    _, status = _step(session, engine)
    assert engine.pushed == [1, 2] and status["respec/learner/rejected_versions"] == 0


def test_a_refused_candidate_is_reverted_and_the_serving_one_pushed_again():
    session, engine = _session(), Engine(refuse={2})
    _accepting(session)
    _step(session, engine)
    serving = {n: t.clone() for n, t in session.learner.serving.state_dict().items()}
    _, status = _step(session, engine)
    assert engine.pushed == [1, 2, 1]  # the refused version 2, then version 1 again (every engine agrees)
    assert status["respec/learner/published_version"] == 1 and status["respec/learner/rejected_versions"] == 1
    assert status["respec/learner/engine_version"] == 1
    assert all(torch.equal(serving[n], t) for n, t in session.learner.drafter.state_dict().items())


def test_after_a_sleep_the_serving_drafter_is_pushed_again():
    session, engine = _session(), Engine()
    _accepting(session)
    _step(session, engine)
    asyncio.run(session.publish(engine, resync=True))  # a weight sync without a new candidate, after a sleep
    assert engine.pushed == [1, 1]
    asyncio.run(session.publish(engine, resync=False))  # nothing new, nothing lost: no push
    assert engine.pushed == [1, 1]


@pytest.mark.parametrize("failure", ["lost_features", "training_error"])
def test_a_failed_step_pushes_nothing_and_counts(failure):
    session, engine = _session(), Engine()
    if failure == "lost_features":
        session.begin_capture()
        session.capture_failed()
        session.train({}, step=1)
    else:
        session.learner._train = lambda start: (_ for _ in ()).throw(RuntimeError("learner bug"))
        session.begin_capture()
        session.add_captured(_rows())
        session.train({row.row: row.weight for row in _rows()}, step=1)
    asyncio.run(session.publish(engine, resync=False))
    assert engine.pushed == []
    status = session.status()
    assert status["respec/learner/rejected_versions"] == 1 and status["respec/learner/published_version"] == 0


def test_a_pending_candidate_is_published_after_a_resume(tmp_path):
    session, engine = _session(), Engine()
    _accepting(session)
    session.begin_capture()
    session.add_captured(_rows())
    session.train({row.row: row.weight for row in _rows()}, step=1)
    session.save(tmp_path)  # verl's checkpoint comes between the training and the weight sync
    resumed = _session()
    resumed.restore(tmp_path)
    asyncio.run(resumed.publish(engine, resync=False))
    assert engine.pushed == [1]
    assert resumed.status()["respec/learner/published_version"] == 1
    assert all(torch.equal(a, b) for a, b in zip(resumed.learner.serving.state_dict().values(),
                                                 session.learner.drafter.state_dict().values()))


def _learner_threads(started_before: frozenset = frozenset()) -> set[threading.Thread]:
    return {thread for thread in threading.enumerate() if thread.name == "respec-learner"} - started_before


def test_overlapped_training_runs_after_the_weight_sync_and_publishes_a_step_later():
    session, engine = _session(), Engine()
    _accepting(session)
    other_sessions = frozenset(_learner_threads())
    rows = {row.row: row.weight for row in _rows()}
    session.begin_capture()
    session.add_captured(_rows())
    assert session.train(rows, step=1, overlap=True) == {}  # kept, not trained: the RL step does not wait
    asyncio.run(session.publish(engine, resync=False))  # step 1's sync: nothing to publish yet, training starts
    assert engine.pushed == []
    session.join()  # the next old-log-prob forward waits for it
    assert session._pending is not None  # step 1's candidate, trained in the background
    learner_threads = _learner_threads(other_sessions)
    session.begin_capture()
    session.add_captured(_rows())
    session.train(rows, step=2, overlap=True)
    asyncio.run(session.publish(engine, resync=False))  # step 2's sync publishes step 1's candidate
    assert engine.pushed == [1]
    # One thread trains every step: a thread per step left per-thread native state behind (benchmarks/README.md).
    assert len(learner_threads) == 1 and _learner_threads(other_sessions) == learner_threads
    status = session.status()
    assert status["respec/learner/published_version"] == 1 and status["respec/learner/train_s"] > 0
    assert status["respec/learner/wait_s"] >= 0
    session.join()
    assert session._pending is not None and session._pending.rejection is None  # step 2's, for step 3's sync

"""The online learner on the tiny lab's actor, on one rank: it raises the acceptance of a day-0 drafter on fixed actor
outputs and publishes numbered versions; a bad candidate (worse on held-out prompts, a NaN loss, an exception, running
out of memory, refused by the engine) never serves and the training copy reverts; its state round-trips, a candidate
waiting for publication included."""

import copy
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from respec_lab.data import read_problems
from respec_lab.models import chat_prompt_ids, sample_responses
from respec_plugin.core.config import LearnerConfig
from respec_plugin.core.drafter.io import load_drafter
from respec_plugin.core.learner.loop import OnlineLearner
from respec_plugin.core.learner.losses import trajectory_weights
from tests.unit.core.learner.lab_features import step_features

NUM_SEQUENCES = 32


@pytest.fixture(scope="module")
def lab_step(tiny_lab):
    """One step's worth of actor rollouts (temperature 1), with 0/1-like rewards weighted as the driver weighs them."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_lab.actor_dir)
    actor = AutoModelForCausalLM.from_pretrained(tiny_lab.actor_dir, dtype=torch.float32).eval()
    prompts = [chat_prompt_ids(tokenizer, p.question) for p in read_problems(tiny_lab.train_parquet)[:NUM_SEQUENCES]]
    responses = sample_responses(actor, prompts, temperature=1.0, max_new_tokens=48, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id, seed=0)
    rewards = torch.tensor([float(i % 2) for i in range(NUM_SEQUENCES)])
    weights = trajectory_weights(rewards, torch.zeros(NUM_SEQUENCES), "reward", 0.2).tolist()
    drafter, _ = load_drafter(tiny_lab.day0_drafter_dir)
    return step_features(actor, drafter, prompts, responses, weights)


def _learner(tiny_lab, drafter_dir=None, **overrides):
    drafter, version = load_drafter(drafter_dir or tiny_lab.day0_drafter_dir)
    config = LearnerConfig(**{"enable": True, "steps_per_rl_step": 12, "learning_rate": 3e-3, **overrides})
    return OnlineLearner(config, drafter, version)


def _step(learner, sequences, refused=None):
    """One RL step's learning and publication; returns (published version or None, the step's metrics)."""
    candidate = learner.train_candidate(sequences)
    version = learner.next_version(candidate)
    metrics = {**learner.candidate_metrics(candidate), **learner.settle(candidate, refused if version else None)}
    return version, metrics


def _state(drafter):
    return {name: t.clone() for name, t in drafter.state_dict().items()}


def _equal(state, drafter) -> bool:
    return all(torch.equal(state[name], t) for name, t in drafter.state_dict().items())


def test_learner_raises_acceptance_and_publishes_versions(tiny_lab, lab_step):
    learner = _learner(tiny_lab)
    learner.initial = copy.deepcopy(learner.drafter)  # compare_with_initial: the day-0 drafter, scored alongside
    published, tvs = [], []
    for _ in range(3):
        version, metrics = _step(learner, lab_step)
        published.append(version)
        tvs.append(metrics["respec/learner/tv"])
        assert math.isfinite(metrics["respec/learner/loss"])
        assert metrics["respec/learner/weight_mean"] == pytest.approx(0.2 + 0.8 * 0.5)  # 0/1 rewards, floor 0.2
    assert published == [1, 2, 3]
    assert metrics["respec/learner/published_version"] == 3 and metrics["respec/learner/rejected_versions"] == 0
    # Day-0 held-out acceptance (1 - TV) is close to 0; a few steps of KD raise it well above that.
    assert 1 - tvs[-1] > 0.2, tvs
    assert metrics["respec/learner/held_out_acceptance"] > 2 * metrics["respec/learner/held_out_acceptance_initial"]
    # No drafter beats one equal to the actor: p(argmax q) <= max p.
    assert metrics["respec/learner/held_out_acceptance"] <= metrics["respec/learner/held_out_acceptance_ceiling"] <= 1


def test_a_candidate_worse_on_held_out_prompts_is_not_published(tiny_lab, lab_step):
    """A warm drafter on its own actor's rollouts has little to gain; an aggressive learning rate overfits the
    step's prompts, and the held-out prompts show it."""
    learner = _learner(tiny_lab, tiny_lab.drafter_dir, learning_rate=5e-2)
    serving = _state(learner.drafter)
    version, metrics = _step(learner, lab_step)
    assert version is None and metrics["respec/learner/rejected_versions"] == 1
    assert metrics["respec/learner/published_version"] == learner.serving_version
    assert _equal(serving, learner.serving) and _equal(serving, learner.drafter)  # goes on from the serving weights
    assert 0.0 < metrics["respec/learner/held_out_acceptance"] <= 1.0


def _nan_drafter(learner):
    with torch.no_grad():
        learner.drafter.fc.weight.fill_(float("nan"))


def _raising_drafter(error):
    def corrupt(learner):
        def forward_fails(*args, **kwargs):
            raise error
        learner.drafter.fc.forward = forward_fails
    return corrupt


@pytest.mark.parametrize("corrupt", [_nan_drafter, _raising_drafter(RuntimeError("learner bug")),
                                     _raising_drafter(torch.OutOfMemoryError("simulated: out of memory"))],
                         ids=["nan_loss", "exception", "out_of_memory"])
def test_a_failing_step_keeps_the_serving_drafter(tiny_lab, lab_step, corrupt):
    learner = _learner(tiny_lab, reward_weighting="uniform")
    assert _step(learner, lab_step)[0] == 1
    good = _state(learner.drafter)
    corrupt(learner)
    version, metrics = _step(learner, lab_step)
    assert version is None
    assert metrics["respec/learner/rejected_versions"] == 1 and metrics["respec/learner/published_version"] == 1
    learner.drafter.fc.__dict__.pop("forward", None)
    assert _equal(good, learner.drafter)  # reverted to the serving weights


def test_a_refused_candidate_is_counted_and_state_round_trips(tiny_lab, lab_step, tmp_path):
    learner = _learner(tiny_lab, reward_weighting="uniform")
    assert _step(learner, lab_step)[0] == 1
    good = _state(learner.drafter)
    version, metrics = _step(learner, lab_step, refused="shape mismatch")
    assert version == 2  # the number is spent, never reused
    assert metrics["respec/learner/rejected_versions"] == 1 and metrics["respec/learner/published_version"] == 1
    assert _equal(good, learner.drafter)

    pending = learner.train_candidate(lab_step)  # trained, checked, not yet published when the checkpoint is taken
    learner.save(tmp_path, pending)
    restored = _learner(tiny_lab, reward_weighting="uniform")
    restored_pending = restored.load(tmp_path)
    assert restored_pending is not None and restored_pending.rejection is None
    assert (restored.serving_version, restored.latest_version, restored.rejected_versions) == (1, 2, 1)
    assert _equal(good, restored.serving)
    assert _equal(_state(learner.drafter), restored.drafter)  # the candidate is the training copy again
    assert restored.optimizer.state_dict()["state"].keys() == learner.optimizer.state_dict()["state"].keys()
    assert restored.next_version(restored_pending) == learner.next_version(pending) == 3

"""The online learner on the tiny lab's actor, without verl: it raises acceptance of a day-0 drafter on fixed actor
outputs and publishes numbered versions; a bad candidate never reaches the publisher; its state round-trips."""

import copy
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from respec_plugin.core.config import LearnerConfig
from respec_plugin.core.drafter.io import load_drafter
from respec_lab.data import read_problems
from respec_lab.models import chat_prompt_ids, sample_responses
from respec_plugin.integrations.verl.learner_features import Trajectories, refreshed_features, step_features
from respec_plugin.core.learner.loop import OnlineLearner
from respec_plugin.integrations.verl.hotswap import PublishReport

NUM_SEQUENCES = 32


@pytest.fixture(scope="module")
def lab_step(tiny_lab):
    """One step's worth of actor rollouts (temperature 1) with 0/1-like rewards, as the trainer would read them."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_lab.actor_dir)
    actor = AutoModelForCausalLM.from_pretrained(tiny_lab.actor_dir, dtype=torch.float32).eval()
    prompts = [chat_prompt_ids(tokenizer, p.question) for p in read_problems(tiny_lab.train_parquet)[:NUM_SEQUENCES]]
    responses = sample_responses(actor, prompts, temperature=1.0, max_new_tokens=48, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id, seed=0)
    trajectories = Trajectories(
        token_ids=[torch.tensor(p + r) for p, r in zip(prompts, responses)],
        prompt_lengths=[len(p) for p in prompts],
        response_masks=[torch.ones(len(r)) for r in responses],
        rewards=torch.tensor([float(i % 2) for i in range(NUM_SEQUENCES)]),
        advantages=torch.zeros(NUM_SEQUENCES),
    )
    return actor, trajectories


class _Publisher:
    """Stands in for the replicas' push endpoint: records what was published, accepts it."""

    def __init__(self):
        self.versions = []

    def __call__(self, weights, version):
        assert all(torch.isfinite(t).all() for _, t in weights)
        self.versions.append(version)
        return PublishReport(version, accepted=1, rejected=0, errors=(), serving_versions=(version,))


def _learner(tiny_lab, actor, **overrides):
    drafter, version = load_drafter(tiny_lab.day0_drafter_dir, actor.get_input_embeddings().weight)
    config = LearnerConfig(enable=True, steps_per_rl_step=12, learning_rate=3e-3, **overrides)
    return OnlineLearner(config, drafter, version), config


def test_learner_raises_acceptance_and_publishes_versions(tiny_lab, lab_step):
    actor, trajectories = lab_step
    learner, config = _learner(tiny_lab, actor)
    learner.initial = copy.deepcopy(learner.drafter)  # compare_with_initial: the day-0 drafter, scored alongside
    publish = _Publisher()
    tvs = []
    for _ in range(3):
        sequences = step_features(actor, learner.drafter, trajectories, top_k=config.top_k,
                                  reward_weighting=config.reward_weighting, weight_floor=config.weight_floor)
        metrics = learner.step(sequences, publish)
        tvs.append(metrics["respec/learner/tv"])
        assert math.isfinite(metrics["respec/learner/loss"])
        assert metrics["respec/learner/weight_mean"] == pytest.approx(0.2 + 0.8 * 0.5)  # 0/1 rewards, floor 0.2
    assert publish.versions == [1, 2, 3]
    assert metrics["respec/learner/published_version"] == 3 and metrics["respec/learner/rejected_versions"] == 0
    # Day-0 held-out acceptance (1 - TV) is ~0.03; a few steps of KD raise it well above that.
    assert 1 - tvs[-1] > 0.2, tvs
    assert metrics["respec/learner/held_out_acceptance"] > 2 * metrics["respec/learner/held_out_acceptance_initial"]
    # No drafter beats one equal to the actor: p(argmax q) <= max p.
    assert metrics["respec/learner/held_out_acceptance"] <= metrics["respec/learner/held_out_acceptance_ceiling"] <= 1


def test_replayed_targets_are_recomputed_with_the_current_actor(tiny_lab, lab_step):
    actor, trajectories = lab_step
    learner, config = _learner(tiny_lab, actor, reward_weighting="uniform")
    sequences = step_features(actor, learner.drafter, trajectories, top_k=config.top_k,
                              reward_weighting=config.reward_weighting, weight_floor=config.weight_floor)
    same = refreshed_features(actor, learner.drafter, sequences, top_k=config.top_k)
    assert all(torch.allclose(a.target_probs, b.target_probs, atol=1e-5) and torch.equal(a.target_ids, b.target_ids)
               for a, b in zip(sequences, same))

    moved = copy.deepcopy(actor)  # an actor update: the last layer's MLP changes
    with torch.no_grad():
        moved.model.layers[-1].mlp.down_proj.weight.mul_(1.5)
    learner.step(sequences, _Publisher())
    learner.refresh_targets(lambda replayed: refreshed_features(moved, learner.drafter, replayed, top_k=config.top_k))
    expected = refreshed_features(moved, learner.drafter, sequences, top_k=config.top_k)
    by_tokens = {tuple(s.token_ids.tolist()): s for s in expected}
    replayed = learner.buffer.sequences + learner._held_out_last
    assert len(replayed) == len(sequences)
    for s in replayed:
        want = by_tokens[tuple(s.token_ids.tolist())]
        assert torch.allclose(s.target_probs, want.target_probs, atol=1e-5) and s.weight == want.weight
        assert torch.equal(s.loss_mask, want.loss_mask)
    assert not all(torch.allclose(s.target_probs, by_tokens[tuple(s.token_ids.tolist())].target_probs, atol=1e-3)
                   for s in sequences)  # the targets did move


def test_a_candidate_worse_on_held_out_prompts_is_not_published(tiny_lab, lab_step):
    """A warm drafter on its own actor's rollouts has little to gain; an aggressive learning rate overfits the
    step's prompts, and the held-out prompts show it."""
    actor, trajectories = lab_step
    drafter, version = load_drafter(tiny_lab.drafter_dir, actor.get_input_embeddings().weight)
    serving = {name: t.clone() for name, t in drafter.state_dict().items()}
    config = LearnerConfig(enable=True, steps_per_rl_step=12, learning_rate=5e-2, reward_weighting="uniform")
    learner = OnlineLearner(config, drafter, version)
    sequences = step_features(actor, learner.drafter, trajectories, top_k=config.top_k,
                              reward_weighting=config.reward_weighting, weight_floor=config.weight_floor)
    publish = _Publisher()
    metrics = learner.step(sequences, publish)
    assert publish.versions == [] and metrics["respec/learner/rejected_versions"] == 1
    assert metrics["respec/learner/published_version"] == version
    for drafter in (learner.serving, learner.drafter):  # the learner goes on from the serving weights
        assert all(torch.equal(serving[name], t) for name, t in drafter.state_dict().items())
    assert 0.0 < metrics["respec/learner/held_out_acceptance"] <= 1.0


def test_bad_candidates_are_not_published_and_state_round_trips(tiny_lab, lab_step, tmp_path):
    actor, trajectories = lab_step
    learner, config = _learner(tiny_lab, actor, reward_weighting="uniform")
    sequences = step_features(actor, learner.drafter, trajectories, top_k=config.top_k,
                              reward_weighting=config.reward_weighting, weight_floor=config.weight_floor)
    publish = _Publisher()
    learner.step(sequences, publish)
    good = {name: t.clone() for name, t in learner.drafter.state_dict().items()}

    with torch.no_grad():  # a corrupted drafter: its loss is NaN
        learner.drafter.fc.weight.fill_(float("nan"))
    metrics = learner.step(sequences, publish)
    assert publish.versions == [1]
    assert metrics["respec/learner/rejected_versions"] == 1 and metrics["respec/learner/published_version"] == 1
    assert all(torch.equal(good[name], t) for name, t in learner.drafter.state_dict().items())  # reverted

    refused = lambda weights, version: PublishReport(version, 0, 1, ("shape mismatch",), (1,))  # noqa: E731
    metrics = learner.step(sequences, refused)
    assert metrics["respec/learner/rejected_versions"] == 2 and metrics["respec/learner/published_version"] == 1

    learner.save(tmp_path)
    restored = OnlineLearner.restore(config, tmp_path, actor.get_input_embeddings().weight)
    assert (restored.serving_version, restored.latest_version, restored.rejected_versions) == (1, 2, 2)
    assert all(torch.equal(good[name], t) for name, t in restored.drafter.state_dict().items())
    assert restored.optimizer.state_dict()["state"].keys() == learner.optimizer.state_dict()["state"].keys()
    learner.step(sequences, publish)
    restored.step(sequences, publish)
    assert publish.versions == [1, 3, 3]

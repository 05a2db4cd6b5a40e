"""Data-parallel learning: one step of 2-rank training (gloo, two processes, each holding half of the rows) makes the
same drafter update and the same held-out check as 1-rank training on all the rows; and the ranks agree when one of
them fails."""

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from respec_plugin.core.config import LearnerConfig
from respec_plugin.core.drafter.eagle3 import Eagle3Config, init_from_actor
from respec_plugin.core.learner.buffer import SequenceFeatures
from respec_plugin.core.learner.loop import OnlineLearner

VOCAB, DRAFT_VOCAB, HIDDEN, TOP_K = 64, 32, 32, 8
# float32: the comparison is of the update itself, not of bfloat16 rounding.
CONFIG = LearnerConfig(enable=True, steps_per_rl_step=3, batch_size=64, learning_rate=1e-2, num_draft_steps=2,
                       top_k=TOP_K, precision="float32")


def _drafter():
    config = Eagle3Config(hidden_size=HIDDEN, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
                          head_dim=16, vocab_size=VOCAB, draft_vocab_size=DRAFT_VOCAB,
                          eagle_aux_hidden_state_layer_ids=(1, 2))
    generator = torch.Generator().manual_seed(0)
    return init_from_actor(config, torch.randn(VOCAB, HIDDEN, generator=generator), torch.arange(0, VOCAB, 2), seed=0)


def _rows(count: int = 12) -> list[SequenceFeatures]:
    """Trajectories with different prompt and response lengths and weights; every fourth held out."""
    generator = torch.Generator().manual_seed(1)
    rows = []
    for i in range(count):
        prompt, response = 3 + i % 4, 5 + (i * 3) % 7
        n = prompt + response
        loss_mask = torch.cat([torch.zeros(prompt), torch.ones(response)])
        probs = torch.rand(n, TOP_K, generator=generator).softmax(-1)
        rows.append(SequenceFeatures(
            token_ids=torch.randint(VOCAB, (n,), generator=generator), loss_mask=loss_mask,
            input_embeds=torch.randn(n, HIDDEN, generator=generator),
            aux_hidden_states=torch.randn(n, 2 * HIDDEN, generator=generator), target_probs=probs,
            target_ids=torch.randperm(DRAFT_VOCAB, generator=generator)[:TOP_K].expand(n, TOP_K).clone(),
            weight=0.2 + 0.1 * (i % 5), row=i, held_out=i % 4 == 0))
    return rows


def _train(rows, process_group=None, fail_on_rank: int | None = None):
    learner = OnlineLearner(CONFIG, _drafter(), serving_version=0, process_group=process_group)
    if fail_on_rank is not None and dist.get_rank() == fail_on_rank:
        def fail(*args, **kwargs):
            raise torch.OutOfMemoryError("simulated on one rank")
        learner.drafter.fc.forward = fail
    candidate = learner.train_candidate(rows)
    return learner, candidate


def _rank_main(rank: int, world: int, port: int, out: str, fail_on_rank: int | None) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        group = dist.new_group()
        learner, candidate = _train(_rows()[rank::world], group, fail_on_rank)
        if rank == 0:
            torch.save({"state": learner.drafter.state_dict(), "loss": candidate.loss, "scores": candidate.scores,
                        "serving": candidate.serving, "rejection": candidate.rejection,
                        "tokens": candidate.tokens}, out)
    finally:
        dist.destroy_process_group()


def _two_ranks(tmp_path: Path, fail_on_rank: int | None = None) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "rank0.pt")
    mp.start_processes(_rank_main, args=(2, port, out, fail_on_rank), nprocs=2, start_method="spawn")
    return torch.load(out, weights_only=False)


def test_two_ranks_make_the_update_one_rank_makes_on_all_rows(tmp_path):
    single, candidate = _train(_rows())
    assert candidate.rejection is None or "held-out" in candidate.rejection
    both = _two_ranks(tmp_path)
    assert both["tokens"] == candidate.tokens
    assert both["loss"] == pytest.approx(candidate.loss, rel=1e-5)
    for name, tensor in single.drafter.state_dict().items():
        # Adam divides by the gradient size, so float rounding in small gradients shows; the update itself is ~3e-2.
        torch.testing.assert_close(both["state"][name], tensor, rtol=1e-4, atol=2e-5, msg=name)
    for scores, expected in ((both["scores"], candidate.scores), (both["serving"], candidate.serving)):
        assert scores.keys() == expected.keys()
        for name in scores:
            assert scores[name] == pytest.approx(expected[name], rel=1e-5, abs=1e-7), name
    assert both["rejection"] == candidate.rejection


def test_a_failure_on_one_rank_rejects_the_candidate_on_every_rank(tmp_path):
    result = _two_ranks(tmp_path, fail_on_rank=1)
    assert result["rejection"] is not None and "simulated on one rank" in result["rejection"]
    untouched = _drafter().state_dict()
    assert all(torch.equal(result["state"][name], t) for name, t in untouched.items())  # no step was taken


def test_an_optimizer_step_over_length_groups_equals_one_over_the_whole_minibatch(monkeypatch):
    """The learner pads each group of similar lengths on its own; the gradients add up to the whole minibatch's."""
    from respec_plugin.core.learner import buffer, loop

    monkeypatch.setattr(buffer, "MIN_GROUP_TOKENS", 0)  # these short rows would otherwise make one group
    assert len(buffer.length_groups(_rows())) > 1
    grouped_learner, grouped = _train(_rows())
    monkeypatch.setattr(loop, "length_groups", lambda sequences: [sequences])
    whole_learner, whole = _train(_rows())
    assert grouped.loss == pytest.approx(whole.loss, rel=1e-5)
    for (name, a), b in zip(grouped_learner.drafter.state_dict().items(), whole_learner.drafter.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5, msg=name)

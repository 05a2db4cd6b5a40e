"""The one KD objective: with the full draft vocabulary as target it is the warm-up's former full-vocabulary forward
KL (loss, gradients and per-step acceptances), the learner's statistics are its per-step ones averaged, and a
minibatch without a drafted token is a programming error, not a config error."""

import pytest
import torch
import torch.nn.functional as F

from respec_plugin.core.config import ReSpecConfigError
from respec_plugin.core.drafter.eagle3 import Eagle3Config, init_from_actor
from respec_plugin.core.drafter.warmup import TargetFeatures, warmup_loss
from respec_plugin.core.learner.buffer import Minibatch
from respec_plugin.core.learner.losses import topk_target
from respec_plugin.core.learner.objective import kd_loss, kd_loss_by_step, step_weight_totals

TARGET_VOCAB, DRAFT_VOCAB, HIDDEN, LENGTH = 40, 20, 32, 14


@pytest.fixture
def case():
    """A drafter, 3 sequences with a 5-token prompt (not learned) and responses of different lengths."""
    generator = torch.Generator().manual_seed(0)
    config = Eagle3Config(hidden_size=HIDDEN, intermediate_size=64, num_attention_heads=2, num_key_value_heads=2,
                          head_dim=16, vocab_size=TARGET_VOCAB, draft_vocab_size=DRAFT_VOCAB,
                          eagle_aux_hidden_state_layer_ids=(0, 1))
    embedding = torch.randn(TARGET_VOCAB, HIDDEN, generator=generator)
    drafter = init_from_actor(config, torch.randn(TARGET_VOCAB, HIDDEN, generator=generator),
                              torch.arange(1, TARGET_VOCAB, 2), seed=1)
    input_ids = torch.randint(TARGET_VOCAB, (3, LENGTH), generator=generator)
    features = TargetFeatures(F.embedding(input_ids, embedding),
                              torch.randn(3, LENGTH, 2 * HIDDEN, generator=generator),
                              (2 * torch.randn(3, LENGTH, DRAFT_VOCAB, generator=generator)).log_softmax(-1))
    response_mask = torch.zeros(3, LENGTH, dtype=torch.bool)
    response_mask[:, 5:] = True
    response_mask[1, 10:] = False
    return drafter, input_ids, features, response_mask


def _full_vocabulary_forward_kl(drafter, input_ids, features, response_mask, num_draft_steps):
    """The warm-up's former loss, written out: step j at anchor t, teacher-forced with x_{t+j+1}, against the
    actor's full log-probs at t + j + 1, weighted by the response mask at t + j + 2, for the anchors from two before
    the first response token on; and its per-step metrics."""
    first_anchor = int(response_mask.any(0).nonzero()[0]) - 2
    teacher = [F.pad(features.input_embeds[:, j + 1 :], (0, 0, 0, j + 1)) for j in range(1, num_draft_steps)]
    steps = drafter.unroll(features.input_embeds, features.aux_hidden_states, num_draft_steps,
                           step_input_embeds=teacher)
    loss, metrics = torch.zeros(()), []
    for j, logits in enumerate(steps.logits):
        p_log = F.pad(features.draft_logprobs[:, j + 1 :], (0, 0, 0, j + 1))
        weights = F.pad(response_mask[:, j + 2 :].float(), (0, j + 2))
        weights[:, :first_anchor] = 0.0
        q_log = logits.log_softmax(-1)
        kl = (p_log.exp() * (p_log - q_log)).sum(-1)
        loss = loss + (kl * weights).sum() / weights.sum()
        greedy_draft = q_log.argmax(-1, keepdim=True)
        per_token = {"kl": kl, "greedy_draft_accepted": p_log.gather(-1, greedy_draft).exp()[..., 0],
                     "sampled_draft_accepted": torch.minimum(p_log.exp(), q_log.exp()).sum(-1)}
        metrics.append({name: float((value.detach() * weights).sum() / weights.sum())
                        for name, value in per_token.items()})
    return loss, metrics


@pytest.mark.parametrize("num_draft_steps", [1, 3])
def test_full_vocabulary_target_gives_the_former_forward_kl(case, num_draft_steps):
    drafter, input_ids, features, response_mask = case
    expected_loss, expected = _full_vocabulary_forward_kl(drafter, input_ids, features, response_mask, num_draft_steps)
    expected_loss.backward()
    expected_grads = [p.grad.clone() for p in drafter.parameters()]
    drafter.zero_grad()

    loss, by_step = warmup_loss(drafter, input_ids, features, response_mask, num_draft_steps)
    loss.backward()
    assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-5)
    for grad, parameter in zip(expected_grads, drafter.parameters()):
        torch.testing.assert_close(parameter.grad, grad, rtol=1e-4, atol=1e-5)
    assert len(by_step) == num_draft_steps
    for step, old in zip((step.means() for step in by_step), expected):
        assert step["divergence"] == pytest.approx(old["kl"], rel=1e-5)
        assert step["greedy_acceptance"] == pytest.approx(old["greedy_draft_accepted"], rel=1e-5)
        assert 1 - step["tv"] == pytest.approx(old["sampled_draft_accepted"], rel=1e-4)
        assert step["negative_feedback"] == 0.0


def test_kd_loss_reports_the_per_step_statistics_averaged(case):
    drafter, input_ids, features, response_mask = case
    mask = response_mask.float()
    batch = Minibatch(input_ids, features.input_embeds, features.aux_hidden_states,
                      topk_target(features.draft_logprobs, 4), mask, mask * torch.tensor([[1.0], [0.0], [0.5]]))
    options = dict(divergence="forward_kl", negative_feedback_coef=0.5, num_draft_steps=3)
    loss, stats = kd_loss(drafter, batch, **options)
    by_step_loss, by_step = kd_loss_by_step(drafter, batch, **options)
    by_step = [step.means() for step in by_step]
    assert torch.equal(loss, by_step_loss)
    assert set(stats) == {"divergence", "tv", "greedy_acceptance", "greedy_acceptance_ceiling", "negative_feedback"}
    for name, value in stats.items():
        assert value == pytest.approx(sum(step[name] for step in by_step) / 3)
    assert stats["negative_feedback"] > 0.0
    assert all(step["greedy_acceptance"] <= step["greedy_acceptance_ceiling"] for step in by_step)


def test_a_minibatch_without_drafted_tokens_is_a_value_error(case):
    drafter, input_ids, features, response_mask = case
    with pytest.raises(ValueError, match="loss_mask is all zero") as raised:
        warmup_loss(drafter, input_ids, features, torch.zeros_like(response_mask), num_draft_steps=2)
    assert not isinstance(raised.value, ReSpecConfigError)


def test_a_row_counts_the_same_whatever_rows_share_its_batch(case):
    """Each row's anchors start from its own first learned token, and the means can take summed totals: two halves
    of a batch, with their weight totals added, give the loss of the whole batch (what data-parallel ranks do)."""
    drafter, input_ids, features, response_mask = case
    response_mask[0, 5:8] = False  # rows now start learning at different positions
    mask = response_mask.float()
    weights = mask * torch.tensor([[1.0], [0.3], [0.5]])
    target = topk_target(features.draft_logprobs, 4)

    def rows(index):
        return Minibatch(input_ids[index], features.input_embeds[index], features.aux_hidden_states[index],
                         target.map(lambda x: x[index]), mask[index], weights[index])

    options = dict(divergence="tv", negative_feedback_coef=0.2, num_draft_steps=3)
    whole, _ = kd_loss_by_step(drafter, rows(slice(0, 3)), **options)
    first, second = rows(slice(0, 1)), rows(slice(1, 3))
    totals = step_weight_totals(first, 3) + step_weight_totals(second, 3)
    torch.testing.assert_close(step_weight_totals(rows(slice(0, 3)), 3), totals)
    halves = sum(kd_loss_by_step(drafter, half, weight_totals=totals, **options)[0] for half in (first, second))
    torch.testing.assert_close(halves, whole)

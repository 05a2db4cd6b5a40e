"""The drafter's features taken by hooks during the actor's own forward equal what an HF ``output_hidden_states``
forward gives, for verl's padded and packed micro-batches, selected rows only, in the order verl ran them; without
logits (fused kernels) the teacher comes from the final-norm state and the LM head's draft rows."""

import pytest
import torch
from tensordict import TensorDict
from transformers import Qwen2Config, Qwen2ForCausalLM

from respec_plugin.core.learner.losses import topk_target
from respec_plugin.integrations.verl.feature_capture import (
    HELD_OUT,
    NOT_SELECTED,
    ROW_FIELD,
    SELECT_FIELD,
    TRAINING,
    ActorForwardCapture,
    CaptureSpec,
    row_slots,
)

AUX = (1, 2, 3)
DRAFT_IDS = torch.tensor([0, 3, 5, 7, 11, 13, 17, 19, 23, 29])
TOP_K = 4
TEMPERATURE = 0.7
WHOLE_PROMPT = 64  # learner.context_tokens beyond every prompt here


@pytest.fixture(scope="module")
def actor():
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         attn_implementation="sdpa")
    return Qwen2ForCausalLM(config).eval()


def _micro_batch(lengths, response_lengths, select, rows):
    """A micro-batch as verl's engine gets it: nested input ids, the response-length loss mask, respec's fields."""
    generator = torch.Generator().manual_seed(1)
    sequences = [torch.randint(0, 32, (n,), generator=generator) for n in lengths]
    masks = [torch.ones(r, dtype=torch.int64) for r in response_lengths]
    masks[0][-1] = 0  # e.g. a tool-output token inside the response
    return TensorDict({
        "input_ids": torch.nested.as_nested_tensor(sequences, layout=torch.jagged),
        "loss_mask": torch.nested.as_nested_tensor(masks, layout=torch.jagged),
        ROW_FIELD: torch.tensor(rows),
        SELECT_FIELD: torch.tensor(select),
        "temperature": torch.full((len(lengths),), TEMPERATURE),
    }, batch_size=[len(lengths)]), sequences


def _forward(actor, sequences, packed: bool):
    """The actor forward verl's FSDP engine runs: right-padded with an attention mask, or packed as (1, nnz)."""
    if packed:
        input_ids = torch.cat(sequences)[None]
        position_ids = torch.cat([torch.arange(len(s)) for s in sequences])[None]
        return actor(input_ids=input_ids, position_ids=position_ids, use_cache=False, output_hidden_states=True)
    length = max(len(s) for s in sequences)
    input_ids = torch.zeros(len(sequences), length, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, s in enumerate(sequences):
        input_ids[i, :len(s)], attention_mask[i, :len(s)] = s, 1
    return actor(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, output_hidden_states=True)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_captured_features_equal_the_hf_hidden_states(actor, packed):
    lengths, responses = [9, 6, 11], [4, 2, 5]
    micro_batch, sequences = _micro_batch(lengths, responses, select=[TRAINING, NOT_SELECTED, HELD_OUT],
                                          rows=[7, 3, 12])
    capture = ActorForwardCapture(actor, CaptureSpec(AUX, DRAFT_IDS, TOP_K, WHOLE_PROMPT))
    slots = row_slots(micro_batch, packed)
    assert [(s.row, s.held_out) for s in slots] == [(7, False), (12, True)]
    with torch.no_grad(), capture.installed(), capture.rows(slots, packed) as captured:
        reference = _forward(actor, sequences, packed)
    assert [row.row for row in captured] == [7, 12]
    offsets = [0, 9, 15]
    for row, index in zip(captured, (0, 2)):
        length = lengths[index]

        def of_row(t):
            return t[0, offsets[index]:offsets[index] + length] if packed else t[index, :length]

        expected_aux = torch.cat([of_row(reference.hidden_states[i]) for i in AUX], dim=-1)
        torch.testing.assert_close(row.aux_hidden_states, expected_aux)
        torch.testing.assert_close(row.input_embeds, of_row(reference.hidden_states[0]))
        expected = topk_target((of_row(reference.logits)[:, DRAFT_IDS] / TEMPERATURE).log_softmax(-1), TOP_K)
        torch.testing.assert_close(row.target_probs, expected.probs)
        assert torch.equal(row.target_ids, expected.ids)
        assert torch.equal(row.token_ids, sequences[index])
        # The loss mask covers the response only, with the response mask's own zeros.
        response = responses[index]
        assert row.loss_mask[:length - response].sum() == 0
        assert row.loss_mask[length - response:].tolist() == micro_batch["loss_mask"][index].float().tolist()


def test_a_short_context_keeps_the_response_and_the_tokens_just_before_it(actor):
    lengths, responses = [9, 11], [4, 5]
    micro_batch, sequences = _micro_batch(lengths, responses, select=[TRAINING, TRAINING], rows=[0, 1])

    def captured(context_tokens):
        capture = ActorForwardCapture(actor, CaptureSpec(AUX, DRAFT_IDS, TOP_K, context_tokens))
        with torch.no_grad(), capture.installed(), capture.rows(row_slots(micro_batch, False), False) as rows:
            _forward(actor, sequences, packed=False)
        return rows

    for whole, window, length, response in zip(captured(WHOLE_PROMPT), captured(2), lengths, responses):
        kept = slice(length - response - 2, length)
        assert window.token_ids.numel() == response + 2
        for field in ("token_ids", "loss_mask", "input_embeds", "aux_hidden_states", "target_probs", "target_ids"):
            assert torch.equal(getattr(window, field), getattr(whole, field)[kept]), field


def test_without_logits_the_teacher_comes_from_the_lm_head_rows(actor):
    """verl's fused kernels compute no logits: the final-norm state times the LM head's draft rows gives them."""
    micro_batch, sequences = _micro_batch([8], [3], select=[TRAINING], rows=[0])
    capture = ActorForwardCapture(actor, CaptureSpec(AUX, DRAFT_IDS, TOP_K, WHOLE_PROMPT))
    lm_head_rows = actor.lm_head.weight[DRAFT_IDS].detach()
    handle = actor.register_forward_hook(lambda module, args, output: output.__setitem__("logits", None))
    try:
        with torch.no_grad(), capture.installed(lm_head_rows), capture.rows(row_slots(micro_batch, False),
                                                                               False) as captured:
            without_logits = _forward(actor, sequences, packed=False)
    finally:
        handle.remove()
    assert without_logits.logits is None
    with torch.no_grad():
        reference = _forward(actor, sequences, packed=False)
    expected = topk_target((reference.logits[0][:, DRAFT_IDS] / TEMPERATURE).log_softmax(-1), TOP_K)
    torch.testing.assert_close(captured[0].target_probs, expected.probs, rtol=1e-4, atol=1e-5)


def test_hooks_act_only_inside_a_capture(actor):
    micro_batch, sequences = _micro_batch([6], [2], select=[TRAINING], rows=[0])
    capture = ActorForwardCapture(actor, CaptureSpec(AUX, DRAFT_IDS, TOP_K, WHOLE_PROMPT))
    with torch.no_grad(), capture.installed():
        _forward(actor, sequences, packed=False)  # another forward (e.g. verl's actor update) takes nothing
        with capture.rows([], False) as nothing:
            _forward(actor, sequences, packed=False)
    assert nothing == []
    assert not actor.model.layers[1]._forward_pre_hooks and not actor._forward_hooks


def test_aux_layers_must_fit_the_actor(actor):
    with pytest.raises(ValueError, match="do not fit an actor of 4 layers"):
        ActorForwardCapture(actor, CaptureSpec((1, 4), DRAFT_IDS, TOP_K, WHOLE_PROMPT))

"""The torch EAGLE-3 head on its own: config checks (user errors) and argument checks (programming errors), day-0
init, the vLLM checkpoint layout and weight names, a causal unroll (no anchor sees its future), and distillation
lowering the KL to the actor."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from respec_plugin.core.config import ReSpecConfigError
from respec_plugin.core.drafter.eagle3 import (
    Eagle3Config,
    Eagle3Drafter,
    draft_vocab_from_counts,
    init_from_actor,
    vllm_weights,
)
from respec_plugin.core.drafter.io import load_drafter, save_drafter
from respec_plugin.core.drafter.warmup import DistillSpec, TargetFeatures, distill, warmup_loss

VOCAB, HIDDEN, DRAFT_VOCAB = 96, 64, 48


def _config(**overrides) -> Eagle3Config:
    fields = dict(hidden_size=HIDDEN, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                  vocab_size=VOCAB, draft_vocab_size=DRAFT_VOCAB, eagle_aux_hidden_state_layer_ids=(1, 2, 3))
    return Eagle3Config(**(fields | overrides))


@pytest.fixture
def actor_weights():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(VOCAB, HIDDEN, generator=generator), torch.randn(VOCAB, HIDDEN, generator=generator)


@pytest.fixture
def drafter(actor_weights):
    _, lm_head = actor_weights
    draft_ids = torch.arange(0, VOCAB, 2)  # every other target token
    return init_from_actor(_config(), lm_head, draft_ids, seed=0).eval()


@pytest.fixture
def embed(actor_weights):
    """The target's embedding lookup, which vLLM shares with the drafter (for greedy feeding)."""
    return lambda token_ids: F.embedding(token_ids, actor_weights[0])


def _features(seed: int, embed, batch: int = 2, length: int = 12) -> tuple[torch.Tensor, TargetFeatures]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(VOCAB, (batch, length), generator=generator)
    aux = torch.randn(batch, length, 3 * HIDDEN, generator=generator)
    logprobs = (3 * torch.randn(batch, length, DRAFT_VOCAB, generator=generator)).log_softmax(-1)
    return input_ids, TargetFeatures(embed(input_ids), aux, logprobs)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"eagle_aux_hidden_state_layer_ids": (3, 1, 2)}, "eagle_aux_hidden_state_layer_ids"),
        ({"eagle_aux_hidden_state_layer_ids": ()}, "eagle_aux_hidden_state_layer_ids"),
        ({"draft_vocab_size": VOCAB}, "draft_vocab_size=96"),
        ({"num_key_value_heads": 3}, "num_key_value_heads=3"),
    ],
)
def test_bad_config_names_value_and_fix(overrides, message):
    with pytest.raises(ReSpecConfigError, match=message):
        _config(**overrides)


def test_day0_copies_the_actors_lm_head_rows_of_the_draft_vocab(drafter, actor_weights):
    _, lm_head = actor_weights
    assert torch.equal(drafter.lm_head.weight, lm_head[0::2])
    assert torch.equal(drafter.draft_token_ids + 0, torch.arange(0, VOCAB, 2))
    assert torch.equal(drafter.d2t, torch.arange(DRAFT_VOCAB))  # target id = i + d2t[i] = 2 i
    assert drafter.t2d.sum() == DRAFT_VOCAB and drafter.t2d[0] and not drafter.t2d[1]


def test_draft_vocab_takes_the_most_frequent_tokens_in_id_order():
    counts = torch.tensor([5, 0, 9, 9, 1, 7])
    assert draft_vocab_from_counts(counts, 3).tolist() == [2, 3, 5]
    with pytest.raises(ValueError, match="draft_vocab_size=6") as raised:
        draft_vocab_from_counts(counts, 6)
    assert not isinstance(raised.value, ReSpecConfigError)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: Eagle3Drafter(_config(), torch.arange(DRAFT_VOCAB).flip(0)), "draft_token_ids"),
        (lambda: Eagle3Drafter(_config(), torch.arange(DRAFT_VOCAB - 1)), "draft_token_ids"),
    ],
    ids=["draft_ids_not_ascending", "draft_ids_too_few"],
)
def test_bad_arguments_are_value_errors_not_config_errors(build, message):
    with pytest.raises(ValueError, match=message) as raised:
        build()
    assert not isinstance(raised.value, ReSpecConfigError)


def test_unroll_needs_a_draft_step_and_inputs_for_later_steps(drafter, embed):
    _, features = _features(seed=5, embed=embed)
    with pytest.raises(ValueError, match="num_steps=0") as raised:
        drafter.unroll(features.input_embeds, features.aux_hidden_states, 0)
    assert not isinstance(raised.value, ReSpecConfigError)
    with pytest.raises(ValueError, match="step_input_embeds .* or embed"):
        drafter.unroll(features.input_embeds, features.aux_hidden_states, 2)


def test_saved_layout_is_what_vllm_loads_and_round_trips(drafter, embed, tmp_path):
    save_drafter(drafter, tmp_path, drafter_version=7)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"]
    assert config["num_hidden_layers"] == 1 and config["draft_vocab_size"] == DRAFT_VOCAB
    assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 2, 3]
    assert config["drafter_version"] == 7
    tensors = load_file(tmp_path / "model.safetensors")
    assert not any("embed_tokens" in name for name in tensors)  # vLLM then shares the target's embedding
    assert set(tensors) == {name for name, _ in vllm_weights(drafter)} | {"t2d"}
    assert tensors["midlayer.self_attn.q_proj.weight"].shape == (HIDDEN, 2 * HIDDEN)
    assert tensors["fc.weight"].shape == (HIDDEN, 3 * HIDDEN)

    loaded, version = load_drafter(tmp_path)
    assert version == 7
    _, features = _features(seed=1, embed=embed)
    with torch.no_grad():
        expected = drafter.unroll(features.input_embeds, features.aux_hidden_states, 3, embed=embed).logits
        actual = loaded.unroll(features.input_embeds, features.aux_hidden_states, 3, embed=embed).logits
    assert all(torch.equal(a, b) for a, b in zip(expected, actual))


def test_vllm_weight_names_are_the_checkpoint_names_vllm_maps():
    names = {name for name, _ in vllm_weights(init_from_actor(_config(), torch.zeros(VOCAB, HIDDEN),
                                                              torch.arange(DRAFT_VOCAB), 0))}
    midlayer = {f"midlayer.self_attn.{p}_proj.weight" for p in "qkvo"} | {
        f"midlayer.mlp.{p}_proj.weight" for p in ("gate", "up", "down")} | {
        f"midlayer.{n}.weight" for n in ("input_layernorm", "hidden_norm", "post_attention_layernorm")}
    assert names == midlayer | {"fc.weight", "norm.weight", "lm_head.weight", "d2t"}


def test_load_rejects_a_directory_without_a_drafter(tmp_path):
    with pytest.raises(ReSpecConfigError, match="no config.json"):
        load_drafter(tmp_path)


def test_load_rejects_a_drafter_with_a_damaged_vocabulary_map(drafter, tmp_path):
    """The checkpoint is the user's: a damaged d2t is a config error that names the fix."""
    save_drafter(drafter, tmp_path, drafter_version=0)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["d2t"] = tensors["d2t"].flip(0)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ReSpecConfigError, match="cannot be loaded: draft_token_ids"):
        load_drafter(tmp_path)


def test_unroll_is_causal_and_propose_matches_it(drafter, embed, actor_weights):
    """Anchor t's drafts depend only on tokens <= t + 1 and features <= t: proposing from a prefix equals
    the full-sequence greedy unroll at that anchor, for every draft step."""
    input_ids, features = _features(seed=2, embed=embed, batch=1, length=16)
    with torch.no_grad():
        full = drafter.unroll(features.input_embeds, features.aux_hidden_states, 3, embed=embed)
    for anchor in (3, 9, 13):
        context = anchor + 2
        proposed = drafter.propose(input_ids[0, :context], features.aux_hidden_states[0, : context - 1], 3,
                                   actor_weights[0])
        assert proposed == [int(drafter.draft_token_ids[logits[0, anchor].argmax()]) for logits in full.logits]


def test_teacher_forcing_with_the_greedy_drafts_equals_greedy_feeding(drafter, embed):
    _, features = _features(seed=3, embed=embed)
    with torch.no_grad():
        greedy = drafter.unroll(features.input_embeds, features.aux_hidden_states, 3, embed=embed)
        drafts = [embed(drafter.draft_token_ids[logits.argmax(-1)]) for logits in greedy.logits[:-1]]
        forced = drafter.unroll(features.input_embeds, features.aux_hidden_states, 3, step_input_embeds=drafts)
    assert all(torch.allclose(a, b) for a, b in zip(greedy.logits, forced.logits))


def test_distillation_lowers_the_kl_and_raises_predicted_acceptance(drafter, embed):
    input_ids, features = _features(seed=4, embed=embed, batch=8, length=12)
    response_mask = torch.ones_like(input_ids, dtype=torch.bool)
    _, before = warmup_loss(drafter, input_ids, features, response_mask, num_draft_steps=2)
    distill(drafter, input_ids, features, response_mask,
            DistillSpec(steps=40, batch_size=8, learning_rate=3e-3, num_draft_steps=2, seed=0))
    _, after = warmup_loss(drafter, input_ids, features, response_mask, num_draft_steps=2)
    for step_before, step_after in zip((step.means() for step in before), (step.means() for step in after)):
        assert step_after["divergence"] < 0.7 * step_before["divergence"]
        assert step_after["tv"] < step_before["tv"]

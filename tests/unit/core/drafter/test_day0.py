"""The day-0 drafter built from an actor directory on the tiny lab: the layout vLLM serves (the lab's own day-0
drafter, which tests/drafter/test_eagle3_vllm.py runs in vLLM), weights copied from the actor, sharded and tied
actors read tensor by tensor, and bad input failing with the fix."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from respec_plugin.core.config import ReSpecConfig, ReSpecConfigError
from respec_plugin.core.drafter.day0 import build_day0_drafter, default_aux_layer_ids, main
from respec_plugin.core.drafter.io import CONFIG_FILE, WEIGHTS_FILE, load_drafter

DRAFT_VOCAB_SIZE = 256


def _header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name -> (dtype, shape) of a safetensors file, without reading the tensors."""
    with safe_open(path, framework="pt") as f:
        return {name: (str(f.get_slice(name).get_dtype()), tuple(f.get_slice(name).get_shape())) for name in f.keys()}


@pytest.fixture(scope="module")
def actor(tiny_lab):
    return AutoModelForCausalLM.from_pretrained(tiny_lab.actor_dir)


def test_day0_drafter_has_the_served_layout_and_the_actors_weights(tiny_lab, actor, tmp_path):
    out = tmp_path / "drafter_day0"
    config = build_day0_drafter(tiny_lab.actor_dir, out, DRAFT_VOCAB_SIZE, seed=0)

    # Same config.json and tensor names / shapes as the lab's day-0 drafter that vLLM serves in the vLLM tests.
    lab_day0 = Path(tiny_lab.day0_drafter_dir)
    assert json.loads((out / CONFIG_FILE).read_text()) == json.loads((lab_day0 / CONFIG_FILE).read_text())
    assert _header(out / WEIGHTS_FILE) == _header(lab_day0 / WEIGHTS_FILE)

    embedding, lm_head = actor.get_input_embeddings().weight, actor.get_output_embeddings().weight
    drafter, version = load_drafter(out)
    assert version == 0 and drafter.config == config
    assert config.eagle_aux_hidden_state_layer_ids == (1, 2, 3)
    assert torch.equal(drafter.draft_token_ids, torch.arange(DRAFT_VOCAB_SIZE))
    assert torch.equal(drafter.lm_head.weight, lm_head[:DRAFT_VOCAB_SIZE].float())
    assert not torch.equal(lm_head[:DRAFT_VOCAB_SIZE], embedding[:DRAFT_VOCAB_SIZE])  # the untied head was read
    assert not any("embed" in name for name in drafter.state_dict())  # vLLM shares the actor's embedding
    # Untrained elsewhere: Llama's init, seeded.
    assert 0.015 < drafter.fc.weight.std().item() < 0.025
    assert torch.equal(drafter.midlayer.hidden_norm.weight, torch.ones(config.hidden_size))

    respec = ReSpecConfig(method="eagle3", drafter_path=str(out))
    respec.check_against_actor(AutoConfig.from_pretrained(tiny_lab.actor_dir))


def test_cli_defaults_to_a_draft_vocab_below_the_actors(tiny_lab, tmp_path, capsys):
    out = tmp_path / "drafter_day0"
    main(["--actor", tiny_lab.actor_dir, "--out", str(out), "--seed", "1"])
    assert str(out) in capsys.readouterr().out
    saved = json.loads((out / CONFIG_FILE).read_text())
    assert saved["vocab_size"] == 512 and saved["draft_vocab_size"] == 511


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_sharded_actor_is_read_tensor_by_tensor(tiny_lab, tmp_path, tied):
    """Shards holding neither the embedding nor the LM head are overwritten with garbage: the build never opens
    them, as it must not for a 28 GB actor."""
    actor_dir = tmp_path / "actor"
    actor = AutoModelForCausalLM.from_pretrained(tiny_lab.actor_dir)
    if tied:
        actor.config.tie_word_embeddings = True
        actor.lm_head.weight = actor.model.embed_tokens.weight
    actor.save_pretrained(actor_dir, max_shard_size="300KB")
    weight_map = json.loads((actor_dir / "model.safetensors.index.json").read_text())["weight_map"]
    assert ("lm_head.weight" in weight_map) != tied
    needed = {weight_map[name] for name in ("model.embed_tokens.weight", "lm_head.weight") if name in weight_map}
    unread = set(weight_map.values()) - needed
    assert len(unread) > 1
    for shard in unread:
        (actor_dir / shard).write_bytes(b"not a safetensors file")

    out = tmp_path / "drafter_day0"
    build_day0_drafter(actor_dir, out, DRAFT_VOCAB_SIZE)
    drafter, _ = load_drafter(out)
    assert torch.equal(drafter.lm_head.weight, actor.get_output_embeddings().weight[:DRAFT_VOCAB_SIZE])
    if tied:
        assert torch.equal(drafter.lm_head.weight, actor.get_input_embeddings().weight[:DRAFT_VOCAB_SIZE])


@pytest.mark.parametrize(
    ("num_hidden_layers", "expected"),
    [(36, (2, 18, 33)), (28, (2, 14, 25)), (48, (2, 24, 45)), (7, (2, 3, 4)), (6, (1, 3, 5)), (4, (1, 2, 3)),
     (2, (1,))],
)
def test_aux_layers_are_vllms_default_when_it_is_valid(num_hidden_layers, expected):
    assert default_aux_layer_ids(num_hidden_layers) == expected


def _actor_copy(tiny_lab, tmp_path: Path, weights: bool = True, **config_changes) -> Path:
    """The tiny actor's config.json with some fields changed (None deletes one), and its weights if asked."""
    actor_dir = tmp_path / "actor"
    actor_dir.mkdir()
    config = json.loads((Path(tiny_lab.actor_dir) / "config.json").read_text()) | config_changes
    (actor_dir / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    if weights:
        (actor_dir / WEIGHTS_FILE).symlink_to(Path(tiny_lab.actor_dir) / WEIGHTS_FILE)
    return actor_dir


def test_older_config_layouts_shape_the_head(tiny_lab, tmp_path):
    """Hub configs written by transformers 4 (Qwen2.5's) keep rope_theta at the top level; Qwen3's set head_dim."""
    actor_dir = _actor_copy(tiny_lab, tmp_path, rope_parameters=None, rope_theta=1e6, head_dim=32,
                            num_key_value_heads=None)
    config = build_day0_drafter(actor_dir, tmp_path / "out", DRAFT_VOCAB_SIZE)
    assert (config.rope_theta, config.head_dim, config.num_key_value_heads) == (1e6, 32, config.num_attention_heads)


@pytest.mark.parametrize(
    ("make_actor", "draft_vocab_size", "message"),
    [
        (lambda lab, tmp: tmp / "missing", 256, "does not exist"),
        (lambda lab, tmp: tmp, 256, "has no config.json"),
        (lambda lab, tmp: _actor_copy(lab, tmp, weights=False), 256, "has neither model.safetensors nor"),
        (lambda lab, tmp: _actor_copy(lab, tmp, architectures=["T5ForConditionalGeneration"], is_encoder_decoder=True),
         256, "decoder-only causal LM"),
        (lambda lab, tmp: _actor_copy(lab, tmp, architectures=["Qwen2Model"]), 256, "decoder-only causal LM"),
        (lambda lab, tmp: _actor_copy(lab, tmp, hidden_size=None), 256, "lacks hidden_size"),
        (lambda lab, tmp: _actor_copy(lab, tmp, tie_word_embeddings=True, vocab_size=1024), 256, "does not fit"),
        (lambda lab, tmp: Path(lab.actor_dir), 512, "draft_vocab_size=512 is invalid"),
    ],
    ids=["missing_dir", "no_config", "no_safetensors", "encoder_decoder", "no_lm_head_class", "missing_key",
         "config_disagrees_with_weights", "draft_vocab_not_below_vocab"],
)
def test_bad_actor_fails_with_the_fix(tiny_lab, tmp_path, make_actor, draft_vocab_size, message):
    out = tmp_path / "out"
    with pytest.raises(ReSpecConfigError, match=message):
        build_day0_drafter(make_actor(tiny_lab, tmp_path), out, draft_vocab_size)
    assert not (out / CONFIG_FILE).exists()


def test_an_existing_drafter_is_never_overwritten(tiny_lab, tmp_path):
    out = tmp_path / "drafter"
    build_day0_drafter(tiny_lab.actor_dir, out, DRAFT_VOCAB_SIZE, seed=0)
    before = (out / WEIGHTS_FILE).read_bytes()
    with pytest.raises(ReSpecConfigError, match="already holds a drafter"):
        build_day0_drafter(tiny_lab.actor_dir, out, DRAFT_VOCAB_SIZE, seed=1)
    assert (out / WEIGHTS_FILE).read_bytes() == before

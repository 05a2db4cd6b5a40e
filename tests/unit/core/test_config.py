"""The respec block: defaults, speculative_config building, and a clear error for every bad value."""

import json

import pytest

from respec_plugin.compat import check_vllm_supports
from respec_plugin.core.config import ReSpecConfig, ReSpecConfigError


@pytest.fixture
def drafter_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 512, "target_hidden_size": 64}))
    return str(tmp_path)


class _Actor:
    vocab_size = 512
    hidden_size = 64


def test_eagle3_block_builds_vllm_speculative_config(drafter_dir):
    cfg = ReSpecConfig.from_mapping({"drafter_path": drafter_dir, "num_speculative_tokens": 4})
    # The watchdog's scheduler (on by default) needs vLLM's per-batch-size schedule: one entry, the configured k.
    assert cfg.speculative_config() == {"method": "eagle3", "num_speculative_tokens": 4, "model": drafter_dir,
                                        "draft_sample_method": "greedy",
                                        "num_speculative_tokens_per_batch_size": [(1, 1, 4)]}
    cfg.check_against_actor(_Actor())


def test_probabilistic_drafts_reach_vllm(drafter_dir):
    cfg = ReSpecConfig.from_mapping({"drafter_path": drafter_dir, "draft_sampling": "probabilistic"})
    assert cfg.speculative_config()["draft_sample_method"] == "probabilistic"


def test_ngram_needs_no_checkpoint_and_zero_k_turns_speculation_off():
    ngram = ReSpecConfig.from_mapping({"method": "ngram", "prompt_lookup_max": 3})
    assert ngram.speculative_config() == {
        "method": "ngram",
        "num_speculative_tokens": 3,
        "prompt_lookup_max": 3,
        "prompt_lookup_min": 1,
    }
    assert ReSpecConfig.from_mapping({"num_speculative_tokens": 0}).speculative_config() is None


def test_reads_block_from_rollout_custom(drafter_dir):
    class Rollout:
        custom = {"respec": {"drafter_path": drafter_dir}}

    assert ReSpecConfig.from_rollout_config(Rollout()).drafter_path == drafter_dir


@pytest.mark.parametrize(
    "block, key, fix",
    [
        ({"method": "medusa2"}, "method='medusa2'", "eagle3, draft_model, ngram"),
        ({"method": "ngram", "num_speculative_tokens": -1}, "num_speculative_tokens=-1", "[0, 16]"),
        ({"method": "ngram", "num_speculative_tokens": 17}, "num_speculative_tokens=17", "[0, 16]"),
        ({"method": "ngram", "num_speculative_tokens": "3"}, "num_speculative_tokens='3'", "integer"),
        ({"method": "eagle3"}, "drafter_path=None", "needs a drafter checkpoint"),
        ({"drafter_path": "/no/such/dir"}, "drafter_path='/no/such/dir'", "no config.json"),
        ({"method": "ngram", "prompt_lookup_min": 5, "prompt_lookup_max": 2}, "prompt_lookup_min", "<="),
        ({"method": "ngram", "k": 3}, "respec.k=3", "unknown key"),
        ({"method": "ngram", "draft_sampling": "probabilistic"}, "draft_sampling='probabilistic'", "greedy"),
        ({"method": "ngram", "draft_sampling": "top_k"}, "draft_sampling='top_k'", "greedy, probabilistic"),
    ],
)
def test_bad_values_name_key_value_and_fix(block, key, fix):
    with pytest.raises(ReSpecConfigError) as err:
        ReSpecConfig.from_mapping(block)
    assert key in str(err.value) and fix in str(err.value)
    assert "actor_rollout_ref.rollout.custom.respec." in str(err.value)


def test_drafter_for_another_vocab_is_refused(drafter_dir):
    class OtherActor(_Actor):
        vocab_size = 151936

    cfg = ReSpecConfig.from_mapping({"drafter_path": drafter_dir})
    with pytest.raises(ReSpecConfigError, match="vocab_size is 512 but the actor's is 151936"):
        cfg.check_against_actor(OtherActor())


def test_eagle3_drafter_for_another_hidden_size_is_refused(drafter_dir):
    class WiderActor(_Actor):
        hidden_size = 128

    with pytest.raises(ReSpecConfigError, match="hidden size 64 but the actor's is 128"):
        ReSpecConfig.from_mapping({"drafter_path": drafter_dir}).check_against_actor(WiderActor())


def test_installed_vllm_supports_every_respec_method(drafter_dir):
    pytest.importorskip("vllm")
    for method in ("eagle3", "draft_model"):
        check_vllm_supports(ReSpecConfig.from_mapping({"method": method, "drafter_path": drafter_dir}))
    check_vllm_supports(ReSpecConfig.from_mapping({"method": "ngram"}))


def test_a_speculators_drafter_for_another_actor_is_refused(tmp_path):
    # The speculators format keeps the layer's sizes under transformer_layer_config, its top-level ones are null.
    (tmp_path / "config.json").write_text(json.dumps({
        "speculators_model_type": "eagle3", "target_hidden_size": None,
        "transformer_layer_config": {"vocab_size": 512, "hidden_size": 64}}))
    cfg = ReSpecConfig.from_mapping({"drafter_path": str(tmp_path)})
    cfg.check_against_actor(_Actor())

    class OtherActor(_Actor):
        vocab_size = 151936

    with pytest.raises(ReSpecConfigError, match="vocab_size is 512 but the actor's is 151936"):
        cfg.check_against_actor(OtherActor())

    class WiderActor(_Actor):
        hidden_size = 128

    with pytest.raises(ReSpecConfigError, match="hidden size 64 but the actor's is 128"):
        cfg.check_against_actor(WiderActor())

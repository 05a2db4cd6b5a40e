"""The drafter checks respec runs before any engine starts: the tiny lab's drafter passes, and each damaged copy is
refused naming the file or tensor and the value (the same copies go through verl's CLI in
tests/e2e/test_bad_input_cli.py)."""

import pytest
from transformers import AutoConfig

from respec_plugin.core.config import ReSpecConfig, ReSpecConfigError
from respec_plugin.core.drafter.checks import check_drafter_checkpoint
from tests.damaged_drafters import damaged_drafter

EXPECTED = {
    "truncated": "model.safetensors cannot be read",
    "nan": "NaN or inf values in tensor 'fc.weight'",
    "inf": "NaN or inf values in tensor 'norm.weight'",
    "missing_tensor": "has no tensor 'fc.weight'",
    "wrong_dtype": "'fc.weight' of dtype torch.int32",
    "other_vocab": "the drafter's vocab_size is 1024 but the actor's is 512",
    "other_hidden": "target hidden size 256 but the actor's is 128",
    "aux_out_of_range": "eagle_aux_hidden_state_layer_ids=[1, 2, 7], but the actor has 4 layers",
    "draft_vocab_above": "beyond the actor's vocabulary (512)",
}


def _check(tiny_lab, path: str) -> None:
    actor = AutoConfig.from_pretrained(tiny_lab.actor_dir)
    respec = ReSpecConfig.from_mapping({"drafter_path": path})
    respec.check_against_actor(actor)
    check_drafter_checkpoint(path, actor, method="eagle3", learner=False)


def test_the_labs_drafters_pass(tiny_lab):
    _check(tiny_lab, tiny_lab.drafter_dir)
    _check(tiny_lab, tiny_lab.day0_drafter_dir)


@pytest.mark.parametrize("damage", sorted(EXPECTED))
def test_a_damaged_drafter_is_refused_by_name(damage, tiny_lab, tmp_path):
    path = damaged_drafter(tiny_lab.drafter_dir, damage, tmp_path / "drafter")
    with pytest.raises(ReSpecConfigError, match="use a" if damage.startswith("other") else "drafter checkpoint") as e:
        _check(tiny_lab, path)
    assert EXPECTED[damage] in str(e.value)

"""The drafter checkpoint formats (vLLM's layout, speculators', the EAGLE authors'): each loads into the same head,
is saved back in the format it came in (same files, tensor names, dtypes and config), pushes the names vLLM's loader
maps for that format, and a checkpoint the head cannot represent is refused with the file, the field and the fix."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from respec_plugin.core.config import ReSpecConfigError
from respec_plugin.core.drafter.checkpoint import read_drafter_tensors
from respec_plugin.core.drafter.eagle3 import Eagle3Config, init_from_actor, vllm_weights
from respec_plugin.core.drafter.io import load_drafter, save_drafter
from tests.unit.core.drafter.checkpoint_formats import write_eagle, write_speculators

VOCAB, HIDDEN, DRAFT_VOCAB = 96, 64, 48
FORMATS = ("vllm", "speculators", "eagle")
WEIGHTS_FILES = {"vllm": "model.safetensors", "speculators": "model.safetensors", "eagle": "pytorch_model.bin"}


@pytest.fixture
def embedding():
    return torch.randn(VOCAB, HIDDEN, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def drafter(embedding):
    config = Eagle3Config(hidden_size=HIDDEN, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1,
                          head_dim=32, vocab_size=VOCAB, draft_vocab_size=DRAFT_VOCAB,
                          eagle_aux_hidden_state_layer_ids=(1, 2, 3))
    return init_from_actor(config, torch.randn(VOCAB, HIDDEN), torch.arange(0, VOCAB, 2), seed=0).eval()


def _write(fmt, drafter, embedding, out, **options):
    if fmt == "speculators":
        return write_speculators(drafter, out, "/actor", embedding, **options)
    if fmt == "eagle":
        return write_eagle(drafter, out, **options)
    save_drafter(drafter, out, drafter_version=0)
    return out


def _tensors(path):
    return dict(read_drafter_tensors(path))


def _logits(drafter, embedding):
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(VOCAB, (2, 12), generator=generator)
    aux = torch.randn(2, 12, 3 * HIDDEN, generator=generator)
    with torch.no_grad():
        return drafter.unroll(F.embedding(input_ids, embedding), aux, 3,
                              embed=lambda ids: F.embedding(ids, embedding)).logits


def _same_head(a, b, embedding) -> bool:
    return all(torch.equal(x, y) for x, y in zip(_logits(a, embedding), _logits(b, embedding)))


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_loads_and_is_saved_back_in_that_format(fmt, drafter, embedding, tmp_path):
    source = _write(fmt, drafter, embedding, tmp_path / "source")
    loaded, version = load_drafter(source)
    assert loaded.format.name == fmt and version == 0
    expected = copy.deepcopy(drafter)
    if fmt == "eagle":  # float16 weights, converted on load
        expected.load_state_dict({name: t.half().float() for name, t in drafter.state_dict().items()
                                  if t.is_floating_point()}, strict=False)
    assert _same_head(loaded, expected, embedding)

    save_drafter(loaded, tmp_path / "saved", drafter_version=5)
    files = {path.name for path in (tmp_path / "saved").iterdir()}
    assert files == {"config.json", WEIGHTS_FILES[fmt]}
    source_config = json.loads((source / "config.json").read_text())
    assert json.loads((tmp_path / "saved" / "config.json").read_text()) == source_config | {"drafter_version": 5}
    before, after = _tensors(source), _tensors(tmp_path / "saved")
    before.pop("embed_tokens.weight", None)  # the speculators copy of the actor's: vLLM then shares the actor's
    assert {name: t.dtype for name, t in after.items()} == {name: t.dtype for name, t in before.items()}
    assert all(torch.equal(after[name], before[name]) for name in before)

    reloaded, version = load_drafter(tmp_path / "saved")
    assert reloaded.format.name == fmt and version == 5
    assert _same_head(reloaded, loaded, embedding)


@pytest.mark.parametrize("fmt", FORMATS)
def test_pushed_weights_carry_the_names_of_the_format_the_engine_loaded(fmt, drafter, embedding, tmp_path):
    """vLLM's loader maps the checkpoint's own names; the push sends those (no embedding: vLLM shares the actor's,
    no t2d: vLLM skips it)."""
    source = _write(fmt, drafter, embedding, tmp_path)
    loaded, _ = load_drafter(source)
    pushed = dict(vllm_weights(loaded))
    assert set(pushed) == set(_tensors(source)) - {"embed_tokens.weight", "t2d"}
    layer = "layers.0." if fmt == "speculators" else "midlayer."
    assert f"{layer}self_attn.q_proj.weight" in pushed and f"{layer}hidden_norm.weight" in pushed
    assert all(t.dtype == torch.float32 for t in pushed.values() if t.is_floating_point())


@pytest.mark.parametrize("fmt", ("speculators", "eagle"))
def test_unset_aux_layers_take_vllms_default_for_the_actor_and_are_saved_explicitly(fmt, drafter, embedding, tmp_path):
    source = _write(fmt, drafter, embedding, tmp_path / "source", aux_layer_ids=False)
    with pytest.raises(ReSpecConfigError, match=r"config.json'? has eagle_aux_hidden_state_layer_ids=None.*actor's N"):
        load_drafter(source)
    loaded, _ = load_drafter(source, target_num_hidden_layers=10)
    assert loaded.config.eagle_aux_hidden_state_layer_ids == (2, 5, 7)
    save_drafter(loaded, tmp_path / "saved", drafter_version=1)
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["eagle_aux_hidden_state_layer_ids"] == [2, 5, 7]
    assert load_drafter(tmp_path / "saved")[0].config == loaded.config


def test_speculators_heads_without_the_flag_norm_before_the_residual_as_vllm_reads_them(drafter, embedding, tmp_path):
    source = write_speculators(drafter, tmp_path, "/actor", embedding)
    config = json.loads((source / "config.json").read_text())
    del config["norm_before_residual"]
    (source / "config.json").write_text(json.dumps(config))
    loaded, _ = load_drafter(source)
    assert loaded.config.norm_before_residual
    assert not _same_head(loaded, drafter, embedding)


def _edit_config(path, edit):
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "fmt, edit, field",
    [
        ("speculators", lambda c: c.update(speculators_model_type="dflash"), "speculators_model_type='dflash'"),
        ("speculators", lambda c: c["transformer_layer_config"].update(model_type="qwen3"),
         "transformer_layer_config.model_type='qwen3'"),
        ("speculators", lambda c: c["transformer_layer_config"].update(num_hidden_layers=2),
         "transformer_layer_config.num_hidden_layers=2"),
        ("speculators", lambda c: c.update(norm_before_fc=True), "norm_before_fc=True"),
        ("speculators", lambda c: c.update(embed_requires_grad=True), "embed_requires_grad=True"),
        ("vllm", lambda c: c.update(architectures=["Qwen2ForCausalLM"]), r"architectures=\['Qwen2ForCausalLM'\]"),
        ("vllm", lambda c: c.update(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}),
         "rope_type='llama3'"),
        ("eagle", lambda c: c.update(target_hidden_size=2 * HIDDEN), f"target_hidden_size={2 * HIDDEN}"),
    ],
    ids=["other_speculator", "qwen3_layer", "two_layers", "norm_before_fc", "trained_embedding", "not_eagle3",
         "scaled_rope", "wider_target"],
)
def test_a_head_respec_cannot_train_is_refused_naming_file_field_and_fix(fmt, edit, field, drafter, embedding,
                                                                         tmp_path):
    source = _write(fmt, drafter, embedding, tmp_path)
    _edit_config(source, edit)
    with pytest.raises(ReSpecConfigError, match=f"{tmp_path / 'config.json'}' has {field}") as raised:
        load_drafter(source)
    assert "learner.enable=false" in str(raised.value)


def test_a_tensor_the_head_does_not_have_is_refused(drafter, embedding, tmp_path):
    """speculators' norm_before_fc heads carry an input_norm; a checkpoint whose config hides it is still refused."""
    source = write_speculators(drafter, tmp_path, "/actor", embedding)
    tensors = load_file(source / "model.safetensors") | {"input_norm.weight": torch.ones(3 * HIDDEN)}
    save_file(tensors, source / "model.safetensors")
    with pytest.raises(ReSpecConfigError, match=r"has tensors \['input_norm.weight'\] that respec's head does not"):
        load_drafter(source)

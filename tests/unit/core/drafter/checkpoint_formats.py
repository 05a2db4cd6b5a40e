"""Tiny EAGLE-3 checkpoints in the formats users bring, written from a respec drafter with plain json + safetensors /
torch, independently of respec's writer, so the tests check respec's reader against the real layouts:

- the ``speculators`` format as speculators 0.9.0's ``Eagle3DraftModel.save_pretrained`` writes it (config keys and
  tensor names compared with a checkpoint that library saved; its auto_map ``config.py`` copy is left out);
- the EAGLE authors' layout (SafeAILab/EAGLE ``traineagle3``, published as yuhuili/EAGLE3-*): their config.json with
  the vLLM architecture name, and deepspeed's ``save_16bit_model`` output, a float16 ``pytorch_model.bin`` of the
  trainable weights and the d2t / t2d buffers (no embedding: it is frozen).
"""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from respec_plugin.core.drafter.eagle3 import Eagle3Drafter


def _layer_tensors(drafter: Eagle3Drafter, prefix: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    tensors = {name.replace("midlayer.", prefix, 1): tensor.detach().to(dtype).clone()
               for name, tensor in drafter.named_parameters()}
    return tensors | {"d2t": drafter.d2t.clone(), "t2d": drafter.t2d.clone()}


def write_speculators(drafter: Eagle3Drafter, out: Path, verifier: str, embedding: torch.Tensor,
                      aux_layer_ids: bool = True, **overrides) -> Path:
    """``drafter`` as a speculators checkpoint for the verifier at ``verifier`` (whose input ``embedding`` it carries,
    as speculators copies it); ``aux_layer_ids=False`` leaves the ids to vLLM's default, ``overrides`` replace
    top-level config fields."""
    c = drafter.config
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["Eagle3DraftModel"],
        "auto_map": {"": "config.Eagle3SpeculatorConfig"},
        "draft_vocab_size": c.draft_vocab_size,
        "dtype": "float32",
        "eagle_aux_hidden_state_layer_ids": list(c.eagle_aux_hidden_state_layer_ids) if aux_layer_ids else None,
        "embed_requires_grad": False,
        "fc_norm": False,
        "norm_before_fc": False,
        "norm_before_residual": c.norm_before_residual,
        "norm_output": False,
        "speculators_config": {
            "algorithm": "eagle3",
            "default_proposal_method": "greedy",
            "proposal_methods": [{"accept_tolerance": 0.0, "proposal_type": "greedy", "speculative_tokens": 3,
                                  "verifier_accept_k": 1}],
            "verifier": {"architectures": ["Qwen2ForCausalLM"], "name_or_path": verifier},
        },
        "speculators_model_type": "eagle3",
        "speculators_version": "0.9.0",
        "target_hidden_size": None,
        "tie_word_embeddings": False,
        "transformer_layer_config": {
            "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
            "head_dim": c.head_dim, "hidden_act": "silu", "hidden_size": c.hidden_size, "initializer_range": 0.02,
            "intermediate_size": c.intermediate_size, "max_position_embeddings": c.max_position_embeddings,
            "mlp_bias": False, "model_type": "llama", "num_attention_heads": c.num_attention_heads,
            "num_hidden_layers": 1, "num_key_value_heads": c.num_key_value_heads, "pad_token_id": None,
            "pretraining_tp": 1, "rms_norm_eps": c.rms_norm_eps,
            "rope_parameters": {"rope_theta": c.rope_theta, "rope_type": "default"}, "tie_word_embeddings": False,
            "use_cache": True, "vocab_size": c.vocab_size,
        },
        "transformers_version": "5.10.4",
    } | overrides
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    tensors = _layer_tensors(drafter, "layers.0.", torch.float32) | {"embed_tokens.weight": embedding.float().clone()}
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def write_eagle(drafter: Eagle3Drafter, out: Path, aux_layer_ids: bool = True) -> Path:
    """``drafter`` in the EAGLE authors' layout. Their configs set no aux layer ids (vLLM then takes (2, N // 2, N - 3)
    of the target); ``aux_layer_ids=True`` adds vLLM's field, which a target shallower than 7 layers needs."""
    c = drafter.config
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["LlamaForCausalLMEagle3"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
        "hidden_size": c.hidden_size, "initializer_range": 0.02, "intermediate_size": c.intermediate_size,
        "max_position_embeddings": c.max_position_embeddings, "model_type": "llama",
        "num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads,
        "num_hidden_layers": 1, "pad_token_id": 0, "rms_norm_eps": c.rms_norm_eps, "tie_word_embeddings": False,
        "torch_dtype": "float16", "transformers_version": "4.28.1", "use_cache": True, "vocab_size": c.vocab_size,
        "draft_vocab_size": c.draft_vocab_size,
    }
    assert c.head_dim * c.num_attention_heads == c.hidden_size and c.rope_theta == 10000.0  # their fixed choices
    if aux_layer_ids:
        config["eagle_aux_hidden_state_layer_ids"] = list(c.eagle_aux_hidden_state_layer_ids)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    torch.save(_layer_tensors(drafter, "midlayer.", torch.float16), out / "pytorch_model.bin")
    return out

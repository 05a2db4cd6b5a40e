"""Save and load EAGLE-3 drafters in the exact layout vLLM's ``eagle3`` method loads (config.json with
``LlamaForCausalLMEagle3`` + model.safetensors, no embed_tokens), with the drafter version stored in the config
so a hot-swapped engine and the learner agree on which drafter is live.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from respec_plugin.core.config import ReSpecConfigError
from respec_plugin.core.drafter.checkpoint import read_drafter_tensors
from respec_plugin.core.drafter.eagle3 import Eagle3Config, Eagle3Drafter, vllm_weights

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# vLLM 0.31 maps both "LlamaForCausalLMEagle3" and "Eagle3LlamaForCausalLM" to its Eagle3LlamaForCausalLM.
ARCHITECTURE = "LlamaForCausalLMEagle3"


def vllm_config(config: Eagle3Config, drafter_version: int) -> dict:
    """config.json for vLLM: a one-layer Llama with the EAGLE-3 fields (the aux layer ids set explicitly, since
    vLLM's default (2, N // 2, N - 3) does not fit shallow targets)."""
    return {
        "architectures": [ARCHITECTURE],
        "model_type": "llama",
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": 1,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_parameters": {"rope_theta": config.rope_theta, "rope_type": "default"},
        "attention_bias": False,
        "tie_word_embeddings": False,
        "vocab_size": config.vocab_size,
        "draft_vocab_size": config.draft_vocab_size,
        "target_hidden_size": config.hidden_size,
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": list(config.eagle_aux_hidden_state_layer_ids)},
        "dtype": "float32",
        "drafter_version": drafter_version,
    }


def save_drafter(drafter: Eagle3Drafter, path: str | os.PathLike, drafter_version: int) -> None:
    """Writes the checkpoint (weights named as :func:`vllm_weights` + ``t2d``), the weights first and the config
    last through a rename, so a reader that sees the new config also sees the new weights."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.float().contiguous() if tensor.is_floating_point() else tensor.contiguous()
               for name, tensor in vllm_weights(drafter)}
    tensors["t2d"] = drafter.t2d
    save_file(tensors, path / WEIGHTS_FILE)
    with tempfile.NamedTemporaryFile("w", dir=path, suffix=".json", delete=False) as f:
        json.dump(vllm_config(drafter.config, drafter_version), f, indent=2)
    os.replace(f.name, path / CONFIG_FILE)


def load_drafter(path: str | os.PathLike) -> tuple[Eagle3Drafter, int]:
    """The drafter saved at ``path`` and its version (0 when the checkpoint does not say)."""
    config_path = Path(path) / CONFIG_FILE
    if not config_path.is_file():
        raise ReSpecConfigError(f"drafter path {str(path)!r} has no {CONFIG_FILE}: point it at a saved EAGLE-3 drafter.")
    raw = json.loads(config_path.read_text())
    if ARCHITECTURE not in raw.get("architectures", []):
        raise ReSpecConfigError(
            f"drafter at {str(path)!r} has architectures={raw.get('architectures')!r}: expected [{ARCHITECTURE!r}]."
        )
    config = Eagle3Config(
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_attention_heads=raw["num_attention_heads"],
        num_key_value_heads=raw["num_key_value_heads"],
        head_dim=raw["head_dim"],
        vocab_size=raw["vocab_size"],
        draft_vocab_size=raw["draft_vocab_size"],
        eagle_aux_hidden_state_layer_ids=tuple(raw["eagle_config"]["eagle_aux_hidden_state_layer_ids"]),
        rms_norm_eps=raw["rms_norm_eps"],
        rope_theta=raw["rope_parameters"]["rope_theta"],
        max_position_embeddings=raw["max_position_embeddings"],
    )
    tensors = dict(read_drafter_tensors(str(path)))
    d2t = tensors.pop("d2t")
    tensors.pop("t2d", None)
    try:
        drafter = Eagle3Drafter(config, d2t + torch.arange(d2t.numel()))
    except ValueError as e:  # its d2t is damaged
        raise ReSpecConfigError(f"drafter at {str(path)!r} cannot be loaded: {e} Use a drafter saved for this actor "
                                "(e.g. by python -m respec_plugin.core.drafter.day0).") from e
    drafter.load_state_dict(tensors | {"draft_token_ids": drafter.draft_token_ids}, strict=True)
    return drafter, int(raw.get("drafter_version", 0))

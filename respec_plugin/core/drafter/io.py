"""Save and load EAGLE-3 drafters in the checkpoint format they came in (formats.py: vLLM's own layout, the
``speculators`` format, the EAGLE authors' layout), with the drafter version stored in the config so a hot-swapped
engine and the learner agree on which drafter is live. A checkpoint respec's head cannot represent is refused with
the file, the field and the fix.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from respec_plugin.core.config import CONFIG_PREFIX, ReSpecConfigError
from respec_plugin.core.drafter.checkpoint import read_drafter_tensors
from respec_plugin.core.drafter.eagle3 import Eagle3Config, Eagle3Drafter, vllm_weights
from respec_plugin.core.drafter.formats import (
    CONFIG_FILE,
    MIDLAYER_PREFIX,
    WEIGHTS_FILE,
    DrafterFormat,
    FormatName,
    detect_format,
)

__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "load_drafter", "save_drafter", "vllm_config"]

logger = logging.getLogger(__name__)

# vLLM 0.31 serves EAGLE-3 heads with these architectures as its Eagle3LlamaForCausalLM (a plain LlamaForCausalLM,
# the EAGLE authors' training config, is renamed to it under method=eagle3).
ARCHITECTURE = "LlamaForCausalLMEagle3"
LLAMA_ARCHITECTURES = (ARCHITECTURE, "Eagle3LlamaForCausalLM", "LlamaForCausalLM")
# Checkpoint tensors respec's head does without: the target's embedding (the head takes the actor's, as vLLM does
# when the copy equals the actor's) and speculators' verifier copies (never saved by speculators, skipped if present).
EMBEDDING = "embed_tokens.weight"
VERIFIER_PREFIX = "verifier_"
# What to do with a drafter respec's learner cannot train: vLLM still serves it.
UNUSABLE_FIX = (f"respec's learner trains one-layer Llama-style EAGLE-3 heads (vLLM's {ARCHITECTURE}); serve this "
                f"drafter without the learner ({CONFIG_PREFIX}.learner.enable=false) or bring one of that shape.")
FORMAT_DESCRIPTIONS: dict[FormatName, str] = {
    "vllm": "vLLM's EAGLE-3 layout",
    "speculators": "the speculators format",
    "eagle": "the EAGLE authors' layout (pytorch_model.bin)",
}


def vllm_config(config: Eagle3Config, drafter_version: int) -> dict:
    """config.json for vLLM: a one-layer Llama with the EAGLE-3 fields (the aux layer ids set explicitly, since
    vLLM's default (2, N // 2, N - 3) does not fit shallow targets)."""
    fields = {
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
    if config.norm_before_residual:
        fields["norm_before_residual"] = True
    return fields


def _aux_layer_ids(config: Mapping[str, Any]) -> list[int] | None:
    """The aux layer ids a checkpoint's config sets (vLLM reads the top-level field, then ``eagle_config``'s)."""
    return config.get("eagle_aux_hidden_state_layer_ids") or (config.get("eagle_config") or {}).get(
        "eagle_aux_hidden_state_layer_ids")


def _checkpoint_config(drafter: Eagle3Drafter, drafter_version: int) -> dict:
    """The config.json the drafter is saved with: the one it was loaded from, with its version (and the aux layer ids
    it resolved, when that config left them to vLLM's default), or vLLM's for a drafter respec built."""
    source = drafter.format.config
    if not source:
        return vllm_config(drafter.config, drafter_version)
    config = dict(source) | {"drafter_version": drafter_version}
    if not _aux_layer_ids(source):
        config["eagle_aux_hidden_state_layer_ids"] = list(drafter.config.eagle_aux_hidden_state_layer_ids)
    return config


def save_drafter(drafter: Eagle3Drafter, path: str | os.PathLike, drafter_version: int) -> None:
    """Writes the checkpoint in the drafter's format (weights named as :func:`vllm_weights` + ``t2d``, floats in the
    format's dtype), the weights first and the config last through a rename, so a reader that sees the new config also
    sees the new weights."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    fmt = drafter.format
    tensors = {name: (tensor.to(fmt.dtype) if tensor.is_floating_point() else tensor).cpu().contiguous()
               for name, tensor in vllm_weights(drafter)}
    tensors["t2d"] = drafter.t2d.cpu()
    if fmt.name == "eagle":
        torch.save(tensors, path / fmt.weights_file)
    else:
        save_file(tensors, path / fmt.weights_file)
    with tempfile.NamedTemporaryFile("w", dir=path, suffix=".json", delete=False) as f:
        json.dump(_checkpoint_config(drafter, drafter_version), f, indent=2)
    os.replace(f.name, path / CONFIG_FILE)


def _refuse(config_path: Path, key: str, value: Any, why: str, fix: str = UNUSABLE_FIX) -> ReSpecConfigError:
    return ReSpecConfigError(f"drafter {str(config_path)!r} has {key}={value!r}: {why}. {fix}")


def _rope_theta(layer: Mapping[str, Any], where: str, config_path: Path) -> float:
    """The rotary base of a Llama layer config (transformers 5's ``rope_parameters`` or the older ``rope_theta`` /
    ``rope_scaling``); respec's head implements unscaled (``default``) RoPE only."""
    parameters = layer.get("rope_parameters") or {}
    scaling = layer.get("rope_scaling") or {}
    rope_type = parameters.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise _refuse(config_path, f"{where}rope_type", rope_type, "respec's head implements unscaled RoPE only")
    return float(parameters.get("rope_theta", layer.get("rope_theta", 10000.0)))


def _layer_fields(layer: Mapping[str, Any], where: str, config_path: Path) -> dict[str, Any]:
    """The Eagle3Config fields of a one-layer Llama config (``where``: its key path in config.json), with
    transformers' LlamaConfig defaults for the optional ones; any other layer shape is refused."""
    missing = [key for key in ("hidden_size", "intermediate_size", "num_attention_heads", "vocab_size")
               if key not in layer]
    if missing:
        raise _refuse(config_path, f"{where}{missing[0]}", None, "it is required",
                      "Use the config.json the drafter was saved with.")
    supported = {"model_type": "llama", "num_hidden_layers": 1, "hidden_act": "silu", "attention_bias": False,
                 "mlp_bias": False}
    for key, value in supported.items():
        if layer.get(key, value) != value:
            raise _refuse(config_path, f"{where}{key}", layer[key], f"respec's head has {key}={value!r}")
    heads = layer["num_attention_heads"]
    return dict(
        hidden_size=layer["hidden_size"], intermediate_size=layer["intermediate_size"], num_attention_heads=heads,
        num_key_value_heads=layer.get("num_key_value_heads") or heads,
        head_dim=layer.get("head_dim") or layer["hidden_size"] // heads, vocab_size=layer["vocab_size"],
        rms_norm_eps=layer.get("rms_norm_eps", 1e-6), rope_theta=_rope_theta(layer, where, config_path),
        max_position_embeddings=layer.get("max_position_embeddings", 2048),
    )


def _eagle3_config(name: FormatName, raw: Mapping[str, Any], config_path: Path,
                   target_num_hidden_layers: int | None) -> Eagle3Config:
    """The head's shape from a checkpoint's config.json, in any of the formats; vLLM's readings of absent fields
    (vllm/transformers_utils/configs/speculators/algos.py, vllm/model_executor/models/llama_eagle3.py)."""
    if name == "speculators":
        if raw.get("speculators_model_type") != "eagle3":
            raise _refuse(config_path, "speculators_model_type", raw.get("speculators_model_type"),
                          "respec's learner trains EAGLE-3 heads")
        if raw.get("embed_requires_grad"):
            raise _refuse(config_path, "embed_requires_grad", True, "this head trained its own token embedding, "
                          "respec's drafts with the actor's")
        fields = _layer_fields(raw.get("transformer_layer_config") or {}, "transformer_layer_config.", config_path)
        norm_before_residual = raw.get("norm_before_residual", True)  # vLLM's default for speculators checkpoints
    else:
        architectures = raw.get("architectures") or []
        if not set(architectures) & set(LLAMA_ARCHITECTURES):
            raise _refuse(config_path, "architectures", architectures, f"expected [{ARCHITECTURE!r}] (vLLM's "
                          "Llama-style EAGLE-3 head)")
        if not (raw.get("eagle_config") or {}).get("use_aux_hidden_state", True):
            raise _refuse(config_path, "eagle_config.use_aux_hidden_state", False, "an EAGLE-3 head reads the "
                          "target's aux hidden states")
        fields = _layer_fields(raw, "", config_path)
        norm_before_residual = raw.get("norm_before_residual", False)
    norm_before_fc = raw.get("norm_before_fc") or (raw.get("eagle_config") or {}).get("norm_before_fc")
    for key, value in (("norm_before_fc", norm_before_fc), ("fc_norm", raw.get("fc_norm")),
                       ("norm_output", raw.get("norm_output"))):
        if value:
            raise _refuse(config_path, key, value, "respec's head has no such norm")
    if raw.get("target_hidden_size") not in (None, fields["hidden_size"]):
        raise _refuse(config_path, "target_hidden_size", raw["target_hidden_size"],
                      f"respec's head takes target features of its own width ({fields['hidden_size']})")
    aux_layer_ids = _aux_layer_ids(raw)
    if not aux_layer_ids:
        if target_num_hidden_layers is None:
            raise _refuse(config_path, "eagle_aux_hidden_state_layer_ids", None, "vLLM then reads the target's "
                          "layers (2, N // 2, N - 3), for which respec needs the actor's N",
                          "Load it with the actor's num_hidden_layers, or set the field in config.json.")
        n = target_num_hidden_layers
        aux_layer_ids = [2, n // 2, n - 3]
        logger.info("drafter %s sets no eagle_aux_hidden_state_layer_ids: vLLM's default for a %d-layer actor, %s",
                    config_path, n, aux_layer_ids)
    try:
        return Eagle3Config(**fields, draft_vocab_size=raw.get("draft_vocab_size") or fields["vocab_size"],
                            eagle_aux_hidden_state_layer_ids=tuple(aux_layer_ids),
                            norm_before_residual=bool(norm_before_residual))
    except ReSpecConfigError as e:
        raise ReSpecConfigError(f"drafter {str(config_path)!r}: {e}") from e


def _head_state(fmt: DrafterFormat, tensors: list[tuple[str, torch.Tensor]],
                path: Path) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The checkpoint's tensors under respec's names (``midlayer.*``) and its d2t; the embedding copy, the verifier
    tensors and t2d (implied by d2t) are dropped."""
    state: dict[str, torch.Tensor] = {}
    for name, tensor in tensors:
        if name == EMBEDDING:
            logger.info("drafter %s carries %s: respec drafts with the actor's embedding (vLLM shares it when the "
                        "copy equals the actor's) and saves the drafter without it", path, EMBEDDING)
        elif not (name.startswith(VERIFIER_PREFIX) or name == "t2d"):
            state[MIDLAYER_PREFIX + name.removeprefix(fmt.layer_prefix) if name.startswith(fmt.layer_prefix)
                  else name] = tensor
    if "d2t" not in state:
        raise ReSpecConfigError(f"drafter {str(path)!r} ({FORMAT_DESCRIPTIONS[fmt.name]}) has no d2t tensor: its "
                                "draft vocabulary is the target's whole vocabulary. " + UNUSABLE_FIX)
    return state, state.pop("d2t")


def load_drafter(path: str | os.PathLike, target_num_hidden_layers: int | None = None) -> tuple[Eagle3Drafter, int]:
    """The drafter saved at ``path`` in any of the formats, with its format, and its version (0 when the checkpoint
    does not say). ``target_num_hidden_layers`` (the actor's) resolves vLLM's default aux layers for a checkpoint
    that sets none."""
    path = Path(path)
    name, raw = detect_format(path)
    config = _eagle3_config(name, raw, path / CONFIG_FILE, target_num_hidden_layers)
    tensors = read_drafter_tensors(path)
    fmt = DrafterFormat(name, raw, next((t.dtype for _, t in tensors if t.is_floating_point()), torch.float32))
    if name == "eagle":
        logger.info("drafter %s is in %s: converted on load to respec's EAGLE-3 head; the learner saves it back in "
                    "that layout (%s)", path, FORMAT_DESCRIPTIONS[name], fmt.dtype)
    state, d2t = _head_state(fmt, tensors, path)
    try:
        drafter = Eagle3Drafter(config, d2t + torch.arange(d2t.numel()), fmt)
    except ValueError as e:  # its d2t is damaged
        raise ReSpecConfigError(f"drafter at {str(path)!r} cannot be loaded: {e} Use a drafter saved for this actor "
                                "(e.g. by python -m respec_plugin.core.drafter.day0).") from e
    expected = {parameter for parameter, _ in drafter.named_parameters()}
    unexpected, missing = sorted(set(state) - expected), sorted(expected - set(state))
    if unexpected or missing:
        problem = f"tensors {unexpected} that respec's head does not have" if unexpected else f"no tensors {missing}"
        raise ReSpecConfigError(f"drafter {str(path)!r} ({FORMAT_DESCRIPTIONS[name]}) has {problem}. {UNUSABLE_FIX}")
    try:
        drafter.load_state_dict(state | {"draft_token_ids": drafter.draft_token_ids}, strict=True)
    except RuntimeError as e:  # tensors of other shapes than its config.json says
        raise ReSpecConfigError(f"drafter at {str(path)!r} cannot be loaded: {e} Use the config.json the drafter was "
                                "saved with.") from e
    return drafter, int(raw.get("drafter_version", 0))

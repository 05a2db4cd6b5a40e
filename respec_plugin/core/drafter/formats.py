"""The EAGLE-3 checkpoint formats a ``drafter_path`` may hold, and how a directory's format is recognised. The learner
saves and pushes a drafter in the format it was given, so vLLM (respec's engines, or plain vLLM afterwards) loads it
as it loaded the original:

- ``vllm``: vLLM's own EAGLE-3 layout (``LlamaForCausalLMEagle3``, vllm/model_executor/models/llama_eagle3.py), what
  respec's day-0 builder and lab write: config.json of a one-layer Llama + model.safetensors, layer ``midlayer.*``;
- ``speculators``: the vLLM project's ``speculators`` library (config.json with ``speculators_model_type``,
  ``transformer_layer_config``, ``speculators_config``; model.safetensors, layer ``layers.0.*``);
- ``eagle``: the EAGLE authors' training output (yuhuili/EAGLE3-*: a Llama config.json + pytorch_model.bin, layer
  ``midlayer.*``), which respec converts on load.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from respec_plugin.core.config import ReSpecConfigError

FormatName = Literal["vllm", "speculators", "eagle"]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# The EAGLE authors' checkpoints are torch pickles (deepspeed's save_16bit_model).
EAGLE_WEIGHTS_FILE = "pytorch_model.bin"
# The decoder layer's checkpoint prefix: vLLM's and the EAGLE authors' name, and speculators' (a ModuleList).
MIDLAYER_PREFIX = "midlayer."
SPECULATORS_LAYER_PREFIX = "layers.0."


@dataclass(frozen=True)
class DrafterFormat:
    """How a drafter's checkpoint is laid out: the format's name, the checkpoint's config.json as read (written back
    on save with the drafter version updated, so fields respec does not use survive; empty for a drafter respec
    built, whose config.json is generated) and the dtype of its weights (saved back in it)."""

    name: FormatName = "vllm"
    config: Mapping[str, Any] = field(default_factory=dict)
    dtype: torch.dtype = torch.float32

    @property
    def layer_prefix(self) -> str:
        return SPECULATORS_LAYER_PREFIX if self.name == "speculators" else MIDLAYER_PREFIX

    @property
    def weights_file(self) -> str:
        return EAGLE_WEIGHTS_FILE if self.name == "eagle" else WEIGHTS_FILE


def detect_format(path: str | Path) -> tuple[FormatName, dict[str, Any]]:
    """The format of the checkpoint directory ``path`` and its config.json: ``speculators`` when the config names a
    speculators model type, ``eagle`` when the weights are a torch pickle, else ``vllm`` (whose loader then checks
    the config and tensor names)."""
    path = Path(path)
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise ReSpecConfigError(f"drafter path {str(path)!r} has no {CONFIG_FILE}: point it at a saved EAGLE-3 "
                                "drafter.")
    config = json.loads(config_path.read_text())
    if "speculators_model_type" in config or "speculators_config" in config:
        return "speculators", config
    if not any(path.glob("*.safetensors")) and any(path.glob("pytorch_model*.bin")):
        return "eagle", config
    return "vllm", config

"""Copies of the tiny lab's drafter with one thing wrong, shared by the unit test of the drafter checks and the bad
inputs of tests/bad_inputs.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

DAMAGES = ("truncated", "nan", "inf", "missing_tensor", "wrong_dtype", "other_vocab", "other_hidden",
           "aux_out_of_range", "draft_vocab_above")


def damaged_drafter(source: str, kind: str, target: Path) -> str:
    """A copy of the drafter at ``source`` in ``target`` with damage ``kind`` (one of :data:`DAMAGES`)."""
    shutil.copytree(source, target)
    weights, config_path = target / "model.safetensors", target / "config.json"
    tensors, config = load_file(weights), json.loads(config_path.read_text())
    if kind == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
        return str(target)
    if kind == "nan":
        tensors["fc.weight"][0, 0] = float("nan")
    elif kind == "inf":
        tensors["norm.weight"][0] = float("inf")
    elif kind == "missing_tensor":
        del tensors["fc.weight"]
    elif kind == "wrong_dtype":
        tensors["fc.weight"] = tensors["fc.weight"].to(torch.int32)
    elif kind == "other_vocab":
        config["vocab_size"] = 1024
    elif kind == "other_hidden":
        config["target_hidden_size"] = 256
    elif kind == "aux_out_of_range":
        config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] = [1, 2, 7]
    elif kind == "draft_vocab_above":
        tensors["d2t"][-1] += 1000  # the last draft token maps beyond the target's 512 ids
    else:
        raise ValueError(f"unknown damage {kind!r}: use one of {', '.join(DAMAGES)}")
    save_file(tensors, weights)
    config_path.write_text(json.dumps(config))
    return str(target)

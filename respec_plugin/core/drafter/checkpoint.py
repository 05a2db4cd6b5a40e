"""Read a drafter checkpoint directory as the ``(name, tensor)`` pairs vLLM's ``load_weights`` takes."""

from __future__ import annotations

import glob
import os

import torch
from safetensors.torch import load_file


def read_drafter_tensors(path: str) -> list[tuple[str, torch.Tensor]]:
    """All tensors of the ``*.safetensors`` files in ``path``, names as saved (vLLM maps them itself)."""
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in drafter checkpoint {path!r}")
    tensors: list[tuple[str, torch.Tensor]] = []
    for file in files:
        tensors.extend(load_file(file).items())
    return tensors

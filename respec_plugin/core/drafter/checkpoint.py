"""Read a drafter checkpoint directory as the ``(name, tensor)`` pairs vLLM's ``load_weights`` takes."""

from __future__ import annotations

import glob
import os

import torch
from safetensors.torch import load_file


def read_drafter_tensors(path: str | os.PathLike) -> list[tuple[str, torch.Tensor]]:
    """All tensors of the ``*.safetensors`` files in ``path`` (else of its ``pytorch_model*.bin`` files, the EAGLE
    authors' format), names as saved (vLLM maps them itself)."""
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    pickles = sorted(glob.glob(os.path.join(path, "pytorch_model*.bin")))
    if not files and not pickles:
        raise FileNotFoundError(f"no *.safetensors or pytorch_model*.bin in drafter checkpoint {str(path)!r}")
    if files:
        return [item for file in files for item in load_file(file).items()]
    return [item for file in pickles for item in torch.load(file, map_location="cpu", weights_only=True).items()]

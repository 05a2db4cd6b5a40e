"""Whether a user's drafter checkpoint can serve a given actor, checked before any engine starts: a damaged file or
one built for another actor would otherwise fail late inside a vLLM engine, or serve drafts no target accepts.
Every refusal names the file, the field or tensor, the value and the fix."""

from __future__ import annotations

from pathlib import Path

import torch

from respec_plugin.core.config import ReSpecConfigError
from respec_plugin.core.drafter.checkpoint import read_drafter_tensors
from respec_plugin.core.drafter.io import load_drafter

# Integer tensors an EAGLE-3 checkpoint may carry: its draft-to-target (and target-to-draft) vocabulary maps.
INDEX_TENSOR_NAMES = ("d2t", "t2d")
FIX = "use a drafter checkpoint saved for this actor (or build one: python -m respec_plugin.core.drafter.day0)."


def _tensors(path: str) -> list[tuple[str, torch.Tensor]]:
    try:
        return read_drafter_tensors(path)
    except ReSpecConfigError:
        raise
    except Exception as e:  # a truncated or otherwise unreadable weights file
        files = sorted(p.name for p in Path(path).glob("*.safetensors")) or sorted(
            p.name for p in Path(path).glob("pytorch_model*.bin"))
        raise ReSpecConfigError(f"drafter checkpoint {path!r}: {', '.join(files)} cannot be read ({type(e).__name__}: "
                                f"{e}): the weights file is damaged or truncated; {FIX}") from e


def check_tensors(path: str) -> list[str]:
    """Every weight of the checkpoint is a finite floating-point tensor (the draft-to-target maps are integers);
    returns the tensor names."""
    tensors = _tensors(path)
    for name, tensor in tensors:
        if name.split(".")[-1] in INDEX_TENSOR_NAMES:
            continue
        if not tensor.is_floating_point():
            raise ReSpecConfigError(f"drafter checkpoint {path!r} has tensor {name!r} of dtype {tensor.dtype}: weights "
                                    f"must be floating point; {FIX}")
        if not bool(torch.isfinite(tensor).all()):
            raise ReSpecConfigError(f"drafter checkpoint {path!r} has NaN or inf values in tensor {name!r}: {FIX}")
    return [name for name, _ in tensors]


def check_drafter_checkpoint(path: str, actor_config, *, method: str, learner: bool) -> None:
    """The checkpoint at ``path`` is readable, finite and fits the actor whose HF config is ``actor_config``. For
    ``eagle3``: it has the fc layer every EAGLE-3 head has; where respec reads the head (always with the learner on,
    which must train it; otherwise when it can), its aux layers exist in the actor and its draft vocabulary lies inside
    the actor's. A head respec cannot read is left to vLLM's loader when the learner is off."""
    tensors = check_tensors(path)
    if method != "eagle3":
        return
    if not any(name.split(".")[-2:] == ["fc", "weight"] for name in tensors):
        raise ReSpecConfigError(f"drafter checkpoint {path!r} has no tensor 'fc.weight', which every EAGLE-3 head has: "
                                f"{FIX}")
    num_layers = getattr(actor_config, "num_hidden_layers", None)
    try:
        drafter, _ = load_drafter(path, num_layers)
    except ReSpecConfigError:
        if learner:
            raise
        return
    config = drafter.config
    aux = config.eagle_aux_hidden_state_layer_ids
    if num_layers is not None and max(aux) >= num_layers:
        raise ReSpecConfigError(
            f"drafter checkpoint {path!r} has eagle_aux_hidden_state_layer_ids={list(aux)}, but the actor has "
            f"{num_layers} layers (ids 0..{num_layers - 1}): {FIX}")
    actor_vocab = getattr(actor_config, "vocab_size", None)
    if actor_vocab is not None:
        if config.draft_vocab_size > actor_vocab:
            raise ReSpecConfigError(
                f"drafter checkpoint {path!r} has draft_vocab_size={config.draft_vocab_size}, beyond the actor's "
                f"vocabulary ({actor_vocab}): {FIX}")
        top = int(drafter.draft_token_ids.max())
        if top >= actor_vocab:
            raise ReSpecConfigError(
                f"drafter checkpoint {path!r} maps draft tokens to target id {top} (its d2t), beyond the actor's "
                f"vocabulary ({actor_vocab}): {FIX}")

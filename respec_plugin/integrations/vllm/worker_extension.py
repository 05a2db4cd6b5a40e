"""vLLM worker extension: load a new drafter version into the live engine, all or nothing.

vLLM's own draft-weight API (``start_draft_weight_update`` / ``update_weights`` / ``finish_weight_update``,
vllm/v1/worker/gpu_worker.py) runs only through a configured weight-transfer engine (NCCL or CUDA IPC),
which verl's colocated rollout does not set up and which does not exist on CPU. So the drafter is loaded here,
in the worker, through ``get_draft_model().load_weights`` — the same loader vLLM uses at start-up — after a
validation pass and with a snapshot to roll back to, so a bad push never leaves a half-loaded drafter. A host copy of
the last good version stays here for the acceptance watchdog to restore (respec_plugin/core/drafter/watchdog.py).
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import safetensors.torch
import torch

from verl.utils.device import get_device_name
from verl.workers.rollout.vllm_rollout.utils import vLLMColocateWorkerExtension

from respec_plugin.core.drafter.checks import INDEX_TENSOR_NAMES
from respec_plugin.integrations.vllm.drafter_transfer import drafter_ipc_handle

logger = logging.getLogger(__name__)


class DrafterPushError(RuntimeError):
    """A drafter version that cannot be served; the previous version stays loaded."""


class KeptDrafter(NamedTuple):
    """A drafter version as loaded (checkpoint names, host tensors)."""

    version: int
    weights: list[tuple[str, torch.Tensor]]


class ReSpecWorkerExtension(vLLMColocateWorkerExtension):
    """verl's colocated worker extension plus drafter hot-swap (called through ``collective_rpc``)."""

    def respec_load_drafter(self, safetensors_bytes: bytes, version: int) -> dict:
        """Load a serialized drafter (checkpoint names) as ``version``; roll back and raise on any failure.

        The weights arrive as safetensors bytes: ``collective_rpc`` carries bytes intact to every worker
        (local or on another node), while tensors in its arguments would arrive as nested lists. The server uses
        this path for the drafter checkpoint it starts from.
        """
        return self._respec_load(list(safetensors.torch.load(safetensors_bytes).items()), version)

    def respec_update_drafter_from_ipc(self, version: int, use_shm: bool = False) -> dict:
        """Receive drafter ``version`` from the co-located actor rank (the learner's push, over the same bucketed
        IPC / shared-memory transport verl uses for the actor's weights, on a socket of its own) and load it all or
        nothing, as :meth:`respec_load_drafter`."""
        from verl.workers.rollout.vllm_rollout.bucketed_weight_transfer import BucketedWeightReceiver

        if self.device is None:
            self.device = torch.device(f"{get_device_name()}:{self.local_rank}")
        received: list[tuple[str, torch.Tensor]] = []

        def on_bucket(weights: list[tuple[str, torch.Tensor]], is_last: bool) -> None:
            # Copies: the receiver reuses its bucket buffer for the next bucket.
            received.extend((name, tensor.clone()) for name, tensor in weights)

        BucketedWeightReceiver(zmq_handle=drafter_ipc_handle(self._get_zmq_handle()), device=self.device,
                               use_shm=use_shm).receive_weights(on_bucket_received=on_bucket)
        return self._respec_load(received, version)

    def _respec_load(self, weights: list[tuple[str, torch.Tensor]], version: int) -> dict:
        drafter = self.model_runner.get_draft_model()
        if drafter is None:
            raise DrafterPushError("this engine has no drafter model (speculation off or a model-free method)")
        shared = _params_shared_with_target(drafter, self.model_runner.get_model())
        to_load, skipped = [], []
        for name, tensor in weights:
            shared_param = next((param for part, param in shared.items() if part in name), None)
            if shared_param is not None:
                if tuple(tensor.shape) != tuple(shared_param.shape):
                    raise DrafterPushError(
                        f"{name} has shape {tuple(tensor.shape)}, but this engine's drafter uses the actor's tensor "
                        f"of shape {tuple(shared_param.shape)} there (vLLM shares it when the drafter it started with "
                        "had none); start the engine from a drafter checkpoint with the same layout"
                    )
                # A copy of the actor's own embedding / head: loading it would overwrite the actor's tensor.
                skipped.append(name)
                continue
            _check_tensor(name, tensor)
            to_load.append((name, tensor))
        if not to_load:
            raise DrafterPushError(f"drafter version {version} has no loadable tensors (skipped: {skipped})")

        snapshot = _snapshot_own_parameters(drafter, shared)
        try:
            drafter.load_weights(iter(to_load))
            bad = [n for n, p in drafter.named_parameters() if p.is_floating_point() and not torch.isfinite(p).all()]
            if bad:
                raise DrafterPushError(f"non-finite values in drafter parameters after loading: {bad[:5]}")
        except Exception as e:
            _restore(drafter, snapshot)
            raise DrafterPushError(f"drafter version {version} rejected, previous version kept: {e}") from e
        if skipped:
            logger.warning("drafter v%d: ignored %s (shared with the actor, never overwritten)", version, skipped)
        # A host copy of what was loaded, for the watchdog to restore from (the device copy may go bad in place).
        kept = [(name, tensor.detach().to("cpu", copy=True)) for name, tensor in to_load]
        self._respec_loaded = KeptDrafter(version, kept)
        if getattr(self, "_respec_good", None) is None:
            self._respec_good = self._respec_loaded
        return {"version": version, "loaded": len(to_load), "skipped_shared": skipped}

    def respec_mark_drafter_good(self, version: int) -> None:
        """A rollout served by drafter ``version`` held acceptance: it becomes the copy :meth:`respec_restore_drafter`
        goes back to."""
        loaded = getattr(self, "_respec_loaded", None)
        if loaded is not None and loaded.version == version:
            self._respec_good = loaded

    def respec_restore_drafter(self) -> dict:
        """Reload the last good drafter's host copy (validated again, all or nothing) over whatever the engine holds
        now; the watchdog calls this when acceptance collapsed."""
        good = getattr(self, "_respec_good", None)
        if good is None:
            raise DrafterPushError("no drafter was loaded into this engine, so there is none to restore")
        return self._respec_load(good.weights, good.version)


def _params_shared_with_target(drafter: torch.nn.Module, target: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Drafter modules (by name) whose weights *are* the target's tensors: vLLM gives an EAGLE drafter the actor's
    embed_tokens / lm_head when its checkpoint has none (or an identical copy)."""
    target_ptrs = {p.data_ptr() for p in target.parameters()}
    return {
        (name.split(".")[-2] if "." in name else name): param
        for name, param in drafter.named_parameters()
        if param.data_ptr() in target_ptrs
    }


def _check_tensor(name: str, tensor: torch.Tensor) -> None:
    if name.split(".")[-1] in INDEX_TENSOR_NAMES:
        if tensor.is_floating_point():
            raise DrafterPushError(f"{name}: index map must be an integer tensor, got {tensor.dtype}")
        return
    if not tensor.is_floating_point():
        raise DrafterPushError(f"{name}: weights must be floating point, got {tensor.dtype}")
    if not torch.isfinite(tensor).all():
        raise DrafterPushError(f"{name}: contains NaN or inf")


def _snapshot_own_parameters(
    drafter: torch.nn.Module, shared: dict[str, torch.nn.Parameter],
) -> dict[str, torch.Tensor]:
    """A copy of the drafter's own tensors (not the target's shared ones) to roll back to."""
    return {
        name: tensor.detach().clone()
        for name, tensor in drafter.state_dict().items()
        if not any(part in name for part in shared)
    }


@torch.no_grad()
def _restore(drafter: torch.nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    state = drafter.state_dict()
    for name, saved in snapshot.items():
        state[name].copy_(saved)

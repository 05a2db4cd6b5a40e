"""The vLLM CPU engines that the in-process benchmarks compare (tuner_sweep, rollout_real): a plain engine (SD off,
stock vLLM) and an EAGLE-3 engine set up by the same code as respec's server, whose speculation schedule the
benchmark installs through the tuner's file channel.
"""

from __future__ import annotations

import gc

from respec_lab.vllm_rollouts import KV_BLOCK_SIZE
from respec_plugin.core.config import DraftSampling, ReSpecConfig, TunerConfig
from respec_plugin.core.tuner.channel import Schedule, take_steps, write_schedule
from respec_plugin.core.tuner.service import EngineControl, EngineTuner


def engine(lab, *, speculative: bool, k_max: int, max_num_seqs: int, max_model_len: int = 1024,
           kv_cache_memory_bytes: int = 2 << 30, draft_sampling: DraftSampling = "greedy"):
    """(LLM, control directory): a plain engine (no directory), or an EAGLE-3 one serving ``lab``'s drafter with
    respec's scheduler, speculative config, control directory and model runner (``k_max`` drafts at most,
    proposed as ``draft_sampling`` says)."""
    from vllm import LLM

    kwargs = dict(dtype="float32", enforce_eager=True, max_model_len=max_model_len, gpu_memory_utilization=0.3,
                  kv_cache_memory_bytes=kv_cache_memory_bytes, seed=0, max_num_seqs=max_num_seqs,
                  max_num_batched_tokens=4096, block_size=KV_BLOCK_SIZE)
    if not speculative:
        return LLM(model=lab.actor_dir, **kwargs), None
    respec = ReSpecConfig(drafter_path=lab.drafter_dir, num_speculative_tokens=k_max, draft_sampling=draft_sampling,
                          tuner=TunerConfig(mode="static", k_max=k_max))
    control = EngineControl(k_max, max_num_seqs, record_steps=True, k0_skips_drafter=respec.tuner.k0_skips_drafter)
    engine_tuner = EngineTuner(respec, control)  # only its engine set-up: the benchmark drives the schedules
    kwargs.update(speculative_config=respec.speculative_config(), per_request_spec_decode_metrics="detailed")
    engine_tuner.configure_engine(kwargs, data_parallel_size=1)
    return LLM(model=lab.actor_dir, **kwargs), control.control_dir


def shutdown(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def install(control_dir: str, schedule: Schedule, version: int, alternate: Schedule | None = None) -> None:
    """Installs a schedule and drops the step records of earlier runs (they are not evidence for this one)."""
    write_schedule(control_dir, schedule, version, alternate)
    take_steps(control_dir)

"""vLLM scheduler that takes its speculative-token schedule from the respec server while the engine runs: the tuner's
k per batch size, or k = 0 everywhere once the acceptance watchdog turned speculation off.

How k reaches the engine (vLLM 0.31 sources):
- ``SpeculativeConfig.num_speculative_tokens_per_batch_size = [(bs_start, bs_end, k), ...]``
  (vllm/config/speculative.py) is expanded once, in ``Scheduler.__init__``, into the dense table
  ``Scheduler.dynamic_sd_lookup[batch_size] -> k``, clamped to ``num_speculative_tokens``
  (vllm/v1/core/sched/scheduler.py, ``build_dynamic_sd_schedule_lookup`` in vllm/v1/spec_decode/dynamic/utils.py).
- Every ``Scheduler.schedule()`` sets ``SchedulerOutput.num_spec_tokens_to_schedule =
  dynamic_sd_lookup[len(num_scheduled_tokens)]``; that is the only place k is read per step. The model runner
  passes it to the proposer (``GPUModelRunner.propose_draft_token_ids``, which the CPU runner inherits; EAGLE's
  ``propose(num_speculative_tokens, ...)`` in vllm/v1/spec_decode/llm_base_proposer.py), and the next step
  verifies whatever was drafted. With k = 0 the proposer returns no drafts (it still runs the drafter's first
  forward so its KV cache stays in sync for when k comes back): no speculation at that batch size, lossless.
  respec skips that forward too in decode steps (``tuner.k0_skips_drafter``, respec_plugin/integrations/vllm/k0_skips_drafter.py).
- Hence this subclass only replaces ``dynamic_sd_lookup`` between steps. The schedule comes through a file in
  the control directory named by ``additional_config["respec_tuner_dir"]`` (see respec_plugin/core/tuner/channel.py:
  no vLLM API reaches the scheduler in the engine-core process), polled with one ``stat`` per step.
- An installed schedule may come with an alternate one (the tuner's paired trials: another k in some buckets).
  The scheduler then swaps ``dynamic_sd_lookup`` between the two every ``ALTERNATE_BLOCK_STEPS`` steps, so both
  run within seconds of each other, on the same requests, and each step's record says which one ran.
- The same subclass measures every step (batch size, k, verified drafts, generated tokens, wall time between
  step ends) and appends the records there when the tuner runs: its cost model is fitted on what the engine really
  spent. A closed (removed) control directory leaves the schedule as it is and stops the records.

Limits, from vLLM: ``VllmConfig._maybe_disable_dynamic_sd_for_data_parallel`` drops the schedule when
data_parallel_size > 1 (ranks choosing different k deadlock), so then the lookup is None, schedules are ignored
and the engine runs its static k (the respec server does not start the tuner then). ``suffix`` decoding picks
its own lengths; respec does not offer it. The engine's ``num_speculative_tokens`` is the largest k any
schedule may use. ``scheduler_cls`` is one class, yet vLLM needs ``AsyncScheduler`` under async scheduling:
``ReSpecScheduler.__new__`` returns the async variant then.
"""

from __future__ import annotations

import logging
import time
from typing import NamedTuple

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.spec_decode.dynamic.utils import build_dynamic_sd_schedule_lookup

from respec_plugin.core.tuner.channel import (
    CONTROL_DIR_KEY,
    RECORD_STEPS_KEY,
    SCHEDULER_CLS,
    StepRecord,
    append_steps,
    read_schedule,
    schedule_stamp,
)

logger = logging.getLogger(__name__)
# Step records are written at most this often while busy, and always when the engine runs out of requests.
_FLUSH_INTERVAL_S = 0.5
# Steps per block of one schedule while a trial alternates two: long enough that the step switching k (it verifies
# the old k's drafts) is a small share, short enough that both see the same batch sizes as a rollout drains.
ALTERNATE_BLOCK_STEPS = 8


class PendingStep(NamedTuple):
    """What ``schedule()`` knew of a step, kept until ``update_from_output`` completes its :class:`StepRecord`."""

    start: float  # perf_counter() when schedule() was entered
    batch_size: int
    k: int
    num_draft_tokens: int
    num_scheduled_tokens: int
    alternate: bool


class ReSpecScheduler(Scheduler):
    """vLLM's scheduler with a live-updatable ``dynamic_sd_lookup`` and per-step measurements."""

    def __new__(cls, *args, **kwargs):
        vllm_config = kwargs.get("vllm_config", args[0] if args else None)
        if cls is ReSpecScheduler and vllm_config.scheduler_config.async_scheduling:
            cls = ReSpecAsyncScheduler
        return super().__new__(cls)

    def __init__(self, vllm_config, *args, **kwargs):
        super().__init__(vllm_config, *args, **kwargs)
        additional_config = vllm_config.additional_config or {}
        control_dir = additional_config.get(CONTROL_DIR_KEY)
        if not control_dir:
            raise ValueError(f"{SCHEDULER_CLS} needs additional_config[{CONTROL_DIR_KEY!r}] (a directory).")
        self.respec_control_dir = control_dir
        # Only the tuner reads step records; the watchdog alone just sets k.
        self._record_steps = bool(additional_config.get(RECORD_STEPS_KEY, True))
        self.respec_schedule_version = -1
        self._schedule_stamp: tuple[int, int, int] | None = None
        # (main, alternate) lookups while a trial runs, and the steps scheduled since they were installed.
        self._lookups: tuple[list[int], list[int]] | None = None
        self._steps_since_install = 0
        # Steps scheduled and not yet completed, by id() of their SchedulerOutput.
        self._pending: dict[int, PendingStep] = {}
        self._busy_since: float | None = None
        self._records: list[StepRecord] = []
        self._last_flush = time.perf_counter()
        if self.dynamic_sd_lookup is None:
            logger.warning(
                "respec: vLLM runs without a dynamic speculative schedule (speculation off, no "
                "num_speculative_tokens_per_batch_size, or data_parallel_size > 1): k stays %d, schedules are ignored",
                self.num_spec_tokens,
            )

    def schedule(self, *args, **kwargs):
        start = time.perf_counter()
        self._poll_schedule()
        alternate = self._lookups is not None and (self._steps_since_install // ALTERNATE_BLOCK_STEPS) % 2 == 1
        if self._lookups is not None:
            self.dynamic_sd_lookup = self._lookups[alternate]
        output = super().schedule(*args, **kwargs)
        if self._record_steps and output.total_num_scheduled_tokens > 0:
            self._steps_since_install += 1
            num_draft_tokens = sum(len(ids) for ids in output.scheduled_spec_decode_tokens.values())
            self._pending[id(output)] = PendingStep(
                start=start,
                batch_size=len(output.num_scheduled_tokens),
                k=output.num_spec_tokens_to_schedule,
                num_draft_tokens=num_draft_tokens,
                num_scheduled_tokens=output.total_num_scheduled_tokens,
                alternate=alternate,
            )
        return output

    def update_from_output(self, scheduler_output, model_runner_output):
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        pending = self._pending.pop(id(scheduler_output), None)
        if pending is not None:
            end = time.perf_counter()
            self._records.append(
                StepRecord(
                    batch_size=pending.batch_size,
                    k=pending.k,
                    num_draft_tokens=pending.num_draft_tokens,
                    num_scheduled_tokens=pending.num_scheduled_tokens,
                    num_generated_tokens=sum(len(ids) for ids in model_runner_output.sampled_token_ids),
                    duration_s=end - (pending.start if self._busy_since is None else self._busy_since),
                    end_time=time.time(),
                    schedule_version=self.respec_schedule_version,
                    alternate=pending.alternate,
                )
            )
            # The next step starts right away when requests remain; otherwise idle time must not count.
            busy = self.has_unfinished_requests()
            self._busy_since = end if busy else None
            if not busy or end - self._last_flush > _FLUSH_INTERVAL_S:
                self._flush(end)
        return outputs

    def _flush(self, now: float) -> None:
        try:
            append_steps(self.respec_control_dir, self._records)
        except FileNotFoundError:  # the run closed the control directory: nobody reads records any more
            self._record_steps = False
        self._records = []
        self._last_flush = now

    def _poll_schedule(self) -> None:
        stamp = schedule_stamp(self.respec_control_dir)
        if stamp is None or stamp == self._schedule_stamp:  # None: the directory was closed; the schedule stays
            return
        self._schedule_stamp = stamp
        try:
            schedule, version, alternate = read_schedule(self.respec_control_dir)
        except FileNotFoundError:  # closed between the stat and the read
            return
        if self.dynamic_sd_lookup is None:
            return
        try:
            main = self._lookup(schedule)
            trial = self._lookup(alternate) if alternate is not None else None
        except ValueError as e:
            logger.error("respec: schedule v%d %s (alternate %s) rejected, keeping v%d: %s", version, schedule,
                         alternate, self.respec_schedule_version, e)
            return
        self.dynamic_sd_lookup = main
        self._lookups = (main, trial) if trial is not None else None
        self._steps_since_install = 0
        self.respec_schedule_version = version
        logger.info("respec: speculative schedule v%d installed: %s%s", version, schedule,
                    f", alternating with {alternate}" if alternate is not None else "")

    def _lookup(self, schedule: list[tuple[int, int, int]]) -> list[int]:
        """vLLM's dense batch size -> k table for a schedule (ValueError if vLLM rejects it)."""
        return build_dynamic_sd_schedule_lookup(
            schedule,
            vllm_max_batch_size=self.scheduler_config.max_num_seqs,
            vllm_num_speculative_tokens=self.num_spec_tokens,
        )


class ReSpecAsyncScheduler(ReSpecScheduler, AsyncScheduler):
    """The same under async scheduling (vLLM's ``AsyncScheduler`` keeps the placeholders it needs)."""

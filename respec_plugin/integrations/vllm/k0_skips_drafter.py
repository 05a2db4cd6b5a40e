"""vLLM general plugin: in an engine run by respec's tuner, a decode step with k = 0 skips the EAGLE drafter too, so
speculation off costs what a plain engine's decode step costs.

Why: at k = 0 vLLM still runs the drafter's first forward every step, "to keep the drafter KV cache in sync"
(``propose`` in vllm/v1/spec_decode/llm_base_proposer.py, called from ``GPUModelRunner.propose_draft_token_ids`` in
vllm/v1/worker/gpu_model_runner.py, which the CPU runner inherits). That forward, its input preparation and attention
metadata make a k = 0 step cost more than a plain engine's decode step, so without the skip the tuner could not match
SD-off where speculation does not pay (benchmarks/README.md has the tuner sweep's measurements of k = 0).
What it costs: the drafter's KV cache has no entries for the tokens generated at k = 0, so drafts after such a
stretch (the long tail of a rollout) may be accepted less; they are never wrong, as the target verifies every draft
(vLLM skips the drafter the same way when a request outgrows the drafter's length, ``_input_fits_in_drafter``).
Steps that prefill prompt tokens still run the drafter, so it always sees the prompts.
Only engines with respec's scheduler and ``additional_config[K0_SKIPS_DRAFTER_KEY]`` set, EAGLE methods and vLLM's
default padded drafter batch are affected; everything else runs vLLM's own code.
"""

from __future__ import annotations

import logging

import torch

from respec_plugin.compat import vllm_version_supported
from respec_plugin.core.import_hooks import after_import
from respec_plugin.core.tuner.channel import K0_SKIPS_DRAFTER_KEY

logger = logging.getLogger(__name__)

MODEL_RUNNER_MODULE = "vllm.v1.worker.gpu_model_runner"


def register() -> None:
    """Entry point of ``vllm.general_plugins`` (runs in every vLLM process): extends the model runner once imported,
    on a vLLM respec supports (elsewhere it leaves vLLM alone; the respec server refuses to start there)."""
    if not vllm_version_supported():
        logger.warning("respec: this vLLM is outside the versions respec supports; the k = 0 drafter skip stays off")
        return
    after_import(MODEL_RUNNER_MODULE, _extend_model_runner)


def skips_drafter(runner) -> bool:
    """Whether this model runner skips the drafter at k = 0 (decided once per runner)."""
    skips = getattr(runner, "_respec_skips_drafter_at_k0", None)
    if skips is None:
        spec = runner.speculative_config
        skips = bool(
            (runner.vllm_config.additional_config or {}).get(K0_SKIPS_DRAFTER_KEY)
            and spec is not None
            and spec.use_eagle()
            and not spec.disable_padded_drafter_batch
        )
        runner._respec_skips_drafter_at_k0 = skips
        if skips:
            logger.info("respec: engine steps with k = 0 skip the EAGLE drafter's forward")
    return skips


def _extend_model_runner() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    stock = GPUModelRunner.propose_draft_token_ids
    if getattr(stock, "_respec_k0_skips_drafter", False):
        return

    def propose_draft_token_ids(self, scheduler_output, sampled_token_ids, *args, **kwargs):
        decode_only = scheduler_output.total_num_scheduled_tokens == self.input_batch.num_reqs  # one token each
        if scheduler_output.num_spec_tokens_to_schedule != 0 or not decode_only or not skips_drafter(self):
            return stock(self, scheduler_output, sampled_token_ids, *args, **kwargs)
        # What the stock EAGLE path does besides the forward: the next tokens and valid counts that async scheduling
        # and the next step's drafter inputs read (as vLLM's own skip when the input does not fit the drafter).
        next_token_ids, valid_sampled_tokens_count = self.drafter.prepare_next_token_ids_padded(
            sampled_token_ids, self.requests, self.input_batch, self.discard_request_mask.gpu
        )
        self._copy_valid_sampled_token_count(next_token_ids, valid_sampled_tokens_count)
        return torch.empty(self.input_batch.num_reqs, 0, device=sampled_token_ids.device, dtype=torch.int64)

    propose_draft_token_ids._respec_k0_skips_drafter = True  # type: ignore[attr-defined]
    GPUModelRunner.propose_draft_token_ids = propose_draft_token_ids

"""The actor's responses sampled as a GRPO rollout samples them (temperature 1, no top-k / top-p, natural EOS, a
response limit), with vLLM CPU: the real-model lab measures its reward and collects its drafter's training data this
way, since Hugging Face ``generate`` is many times slower at responses of hundreds of tokens.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence

# vLLM CPU's KV cache block (tokens). Its default of 128 costs speculation most of the prefix cache: vLLM drops the last
# matched block from an EAGLE engine's prefix-cache hit (the drafter needs that block's hidden states), so a request
# whose prompt spans two 128-token blocks recomputes all but one. GRPO's n samples of a prompt, and prompts sharing a
# few-shot preamble, then prefill again what stock vLLM reads from the cache. 32 is the smallest block vLLM's CPU
# attention takes (a multiple of 32); GPU engines default to 16 and need no override.
KV_BLOCK_SIZE = 32


def sample_responses(actor_dir: str, prompts: Sequence[list[int]], *, n: int, max_tokens: int, seed: int,
                     max_num_seqs: int = 128, kv_cache_memory_bytes: int = 2 << 30) -> list[list[list[int]]]:
    """``n`` responses (token ids, EOS included where the response ended by it) per prompt, from a float32 vLLM CPU
    engine started for this call and shut down after it."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=actor_dir, dtype="float32", enforce_eager=True, seed=seed, max_num_seqs=max_num_seqs,
              max_model_len=max(map(len, prompts)) + max_tokens, kv_cache_memory_bytes=kv_cache_memory_bytes,
              block_size=KV_BLOCK_SIZE)
    try:
        params = SamplingParams(n=n, temperature=1.0, max_tokens=max_tokens, detokenize=False)
        outputs = llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        return [[list(completion.token_ids) for completion in output.outputs] for output in outputs]
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()

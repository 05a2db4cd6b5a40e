"""The actor's responses sampled as a GRPO rollout samples them (temperature 1, no top-k / top-p, natural EOS, a
response limit), with vLLM CPU: the real-model lab measures its reward and collects its drafter's training data this
way, since Hugging Face ``generate`` is many times slower at responses of hundreds of tokens.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence


def sample_responses(actor_dir: str, prompts: Sequence[list[int]], *, n: int, max_tokens: int, seed: int,
                     max_num_seqs: int = 128, kv_cache_memory_bytes: int = 2 << 30) -> list[list[list[int]]]:
    """``n`` responses (token ids, EOS included where the response ended by it) per prompt, from a float32 vLLM CPU
    engine started for this call and shut down after it."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=actor_dir, dtype="float32", enforce_eager=True, seed=seed, max_num_seqs=max_num_seqs,
              max_model_len=max(map(len, prompts)) + max_tokens, kv_cache_memory_bytes=kv_cache_memory_bytes)
    try:
        params = SamplingParams(n=n, temperature=1.0, max_tokens=max_tokens, detokenize=False)
        outputs = llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        return [[list(completion.token_ids) for completion in output.outputs] for output in outputs]
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()

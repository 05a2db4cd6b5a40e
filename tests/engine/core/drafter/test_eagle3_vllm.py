"""The torch EAGLE-3 head against real vLLM CPU on the tiny lab: vLLM loads the saved layout, speculation is
lossless (greedy outputs equal plain vLLM's), the warmed-up drafter is accepted far more often than the day-0
one, pushing ``vllm_weights`` into a live engine serves the same drafter as loading it from disk, and the torch
head predicts vLLM's acceptance at every verify step."""

import gc

import pytest

pytest.importorskip("vllm")

import safetensors.torch  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from respec_plugin.core.drafter.eagle3 import vllm_weights  # noqa: E402
from respec_plugin.core.drafter.io import load_drafter  # noqa: E402
from respec_lab.data import read_problems  # noqa: E402
from respec_lab.models import chat_prompt_ids  # noqa: E402

NUM_SPECULATIVE_TOKENS = 3
NUM_PROMPTS = 16
MAX_TOKENS = 96
# float32: greedy identity must not hinge on bf16 near-ties (and fp32 is the faster dtype on this CPU).
ENGINE_KWARGS = dict(dtype="float32", enforce_eager=True, max_model_len=512, gpu_memory_utilization=0.3,
                     kv_cache_memory_bytes=256 << 20, seed=0, disable_log_stats=False)


def _spec_counters(llm) -> dict[str, float]:
    metrics = {m.name: m for m in llm.get_metrics()}
    return {
        "draft": metrics["vllm:spec_decode_num_draft_tokens"].value,
        "accepted": metrics["vllm:spec_decode_num_accepted_tokens"].value,
        "accepted_per_pos": list(metrics["vllm:spec_decode_num_accepted_tokens_per_pos"].values),
    }


def _generate(llm, prompts):
    from vllm import SamplingParams

    before = _spec_counters(llm) if llm.llm_engine.vllm_config.speculative_config else None
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS), use_tqdm=False)
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    if before is None:
        return tokens, None, None
    after = _spec_counters(llm)
    stats = {
        "acceptance_rate": (after["accepted"] - before["accepted"]) / (after["draft"] - before["draft"]),
        "first_position": [a - b for a, b in zip(after["accepted_per_pos"], before["accepted_per_pos"])],
    }
    return tokens, stats, [o.outputs[0].spec_decode_metrics.per_step_accepted for o in outputs]


def _engine(actor_dir, drafter_dir=None):
    from vllm import LLM

    kwargs = dict(ENGINE_KWARGS)
    if drafter_dir is not None:
        kwargs.update(
            speculative_config={"method": "eagle3", "model": drafter_dir,
                                "num_speculative_tokens": NUM_SPECULATIVE_TOKENS},
            per_request_spec_decode_metrics="detailed",
            worker_extension_cls="respec_plugin.integrations.vllm.worker_extension.ReSpecWorkerExtension",
        )
    return LLM(model=actor_dir, **kwargs)


def _shutdown(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


@pytest.fixture(scope="module")
def served(tiny_lab):
    """Greedy outputs and spec stats of: plain vLLM, the day-0 drafter, the warmed-up drafter pushed into that
    same engine, and the warmed-up drafter loaded from disk (one engine at a time; ~2 min in all)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_lab.actor_dir)
    prompts = [chat_prompt_ids(tokenizer, p.question) for p in read_problems(tiny_lab.val_parquet)[:NUM_PROMPTS]]
    results = {"prompts": prompts}

    llm = _engine(tiny_lab.actor_dir)
    results["plain"] = _generate(llm, prompts)
    _shutdown(llm)

    llm = _engine(tiny_lab.actor_dir, tiny_lab.day0_drafter_dir)
    results["day0"] = _generate(llm, prompts)
    warmed, version = load_drafter(tiny_lab.drafter_dir)
    payload = safetensors.torch.save({name: t.contiguous() for name, t in vllm_weights(warmed)})
    results["push_reply"] = llm.collective_rpc("respec_load_drafter", args=(payload, version))
    results["pushed"] = _generate(llm, prompts)
    _shutdown(llm)

    llm = _engine(tiny_lab.actor_dir, tiny_lab.drafter_dir)
    results["warmed"] = _generate(llm, prompts)
    _shutdown(llm)
    return results


def test_vllm_serves_the_saved_drafter_losslessly(served):
    plain, _, _ = served["plain"]
    for name in ("day0", "warmed", "pushed"):
        tokens, _, _ = served[name]
        assert tokens == plain, f"greedy outputs with the {name} drafter differ from plain vLLM's"


def test_warmed_drafter_is_accepted_far_more_than_day0(served):
    day0, warmed = served["day0"][1], served["warmed"][1]
    assert day0["acceptance_rate"] < 0.1
    assert warmed["acceptance_rate"] > 0.4
    assert warmed["acceptance_rate"] > day0["acceptance_rate"] + 0.3


def test_pushed_weights_serve_the_same_drafter_as_loading_from_disk(served):
    assert served["push_reply"][0]["version"] == 1
    assert served["push_reply"][0]["skipped_shared"] == []
    assert served["pushed"][1] == served["warmed"][1]
    assert served["pushed"][2] == served["warmed"][2]


def test_torch_head_predicts_vllm_acceptance_at_every_verify_step(served, tiny_lab):
    """Replays each request's verify steps: the torch head's greedy draft (on HF actor features) accepted as far
    as it matches the target's greedy tokens must equal vLLM's per-step accepted count."""
    actor = AutoModelForCausalLM.from_pretrained(tiny_lab.actor_dir).eval()
    drafter, _ = load_drafter(tiny_lab.drafter_dir)
    ids = drafter.config.eagle_aux_hidden_state_layer_ids
    tokens, _, per_step_accepted = served["warmed"]
    matches = total = 0
    for prompt, output, accepted in zip(served["prompts"], tokens, per_step_accepted):
        sequence = torch.tensor(prompt + output)
        with torch.no_grad():
            hidden_states = actor(sequence[None], output_hidden_states=True).hidden_states
        aux = torch.cat([hidden_states[i][0] for i in ids], dim=-1)
        num_output = 1  # the target samples the first token at prefill; drafting starts after it
        for vllm_accepted in accepted:
            context = len(prompt) + num_output
            if num_output + NUM_SPECULATIVE_TOKENS >= len(output):
                break  # near the end vLLM truncates at the stop token / max_tokens
            draft = drafter.propose(sequence[:context], aux[: context - 1], NUM_SPECULATIVE_TOKENS,
                                    actor.get_input_embeddings().weight)
            truth = output[num_output : num_output + NUM_SPECULATIVE_TOKENS]
            torch_accepted = next((i for i, (d, t) in enumerate(zip(draft, truth)) if d != t), len(draft))
            matches += torch_accepted == vllm_accepted
            total += 1
            num_output += vllm_accepted + 1
    assert total > 50
    assert matches / total > 0.95, f"torch head predicted vLLM's accepted count at {matches}/{total} verify steps"

"""The real-model lab recipe (preset ``smollm2``): a pretrained actor from the package registry instead of the toy
one, so that a decode step costs what it costs on a real model and speculation can pay where a rollout's batch
thins out (issue 18).

The actor is SmolLM2-135M-Instruct (``registry_model``), unchanged. Its math is poor and its samples at temperature 1
wander: without help its GSM8K-format reward at T = 1 is about zero. The problems are therefore the lab's own
GSM8K-schema problems posed few-shot, with worked examples as earlier chat turns, which puts the reward at T = 1 in
the range where GRPO has room both ways; the build measures that reward with vLLM CPU on held-out problems, sampled
as a rollout samples them. The drafters learn from the actor's own vLLM-sampled responses (EAGLE's self-distillation).
"""

from __future__ import annotations

import logging
import statistics
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from respec_lab.data import MathDataSpec, read_problems, read_prompts, write_math_data
from respec_lab.drafters import BuiltDrafters, DrafterSpec, build_drafters
from respec_lab.models import pad_batch, prompt_ids
from respec_lab.registry_model import RegistryModel, fetch_actor
from respec_lab.stopwatch import Stopwatch
from respec_lab.vllm_rollouts import sample_responses

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RealModelPreset:
    """Everything that determines a real-model lab build (its hash names the cache directory)."""

    model: RegistryModel
    data: MathDataSpec
    # Worked examples opening every prompt (as earlier chat turns).
    num_shots: int
    # The response limit of the lab's rollouts (verl's data.max_response_length).
    max_response_length: int
    # The reward at T = 1 is measured on this many validation problems; every prompt the build samples (reward
    # measurement, drafter warm-up data) gets this many responses (GRPO's n).
    num_reward_problems: int
    samples_per_prompt: int
    drafter: DrafterSpec
    # The drafters train and are measured on responses cut to this many tokens: the actor's features for every
    # position are held in memory, and a few responses that run to the limit would pad every sequence to it.
    drafter_response_tokens: int
    # The drafters train on each response and this many prompt tokens before it (drafters.windowed_features).
    drafter_context_tokens: int
    # Held-out responses (of the reward measurement) the drafters' acceptance is measured on.
    num_held_out_sequences: int
    seed: int


@dataclass(frozen=True)
class RealModelBuild:
    """The built actor and drafters, and what the build measured."""

    actor: torch.nn.Module
    drafters: BuiltDrafters
    metrics: dict


def build_real_model_lab(spec: RealModelPreset, paths: Mapping[str, Path], stopwatch: Stopwatch) -> RealModelBuild:
    """Builds into ``paths`` (the lab layout: parquet files, actor and drafter directories)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    actor_dir = paths["actor_dir"]
    with tempfile.TemporaryDirectory(prefix="respec-registry-model-") as download:
        fetch_actor(spec.model, Path(download), actor_dir)
    stopwatch.lap("actor_download_and_conversion")

    paths["train_parquet"].parent.mkdir(parents=True, exist_ok=True)
    write_math_data(spec.data, paths["train_parquet"], paths["val_parquet"], num_shots=spec.num_shots)
    tokenizer = AutoTokenizer.from_pretrained(actor_dir)
    train_prompts = [prompt_ids(tokenizer, m) for m in read_prompts(paths["train_parquet"])]
    val_prompts = [prompt_ids(tokenizer, m) for m in read_prompts(paths["val_parquet"])]
    stopwatch.lap("data")

    # One engine samples both, n responses per prompt as GRPO does: the reward measurement (held-out problems) and
    # the warm-up data (training problems).
    n = spec.samples_per_prompt
    reward_prompts = val_prompts[: spec.num_reward_problems]
    warmup_prompts = train_prompts[: -(-spec.drafter.num_warmup_sequences // n)]
    sampled = sample_responses(str(actor_dir), reward_prompts + warmup_prompts, n=n,
                               max_tokens=spec.max_response_length, seed=spec.seed)
    reward_responses, warmup_responses = sampled[: len(reward_prompts)], sampled[len(reward_prompts):]
    rollout_metrics = _reward_and_lengths(tokenizer, read_problems(paths["val_parquet"]), reward_responses,
                                          spec.max_response_length)
    logger.info("real-model lab: %s", rollout_metrics)
    stopwatch.lap("actor_rollouts_and_reward")

    actor = AutoModelForCausalLM.from_pretrained(actor_dir, dtype=torch.float32).eval()
    cut = spec.drafter_response_tokens
    warmup_pairs = [(p, response[:cut]) for p, responses in zip(warmup_prompts, warmup_responses)
                    for response in responses]
    warmup = pad_batch(warmup_pairs[: spec.drafter.num_warmup_sequences], tokenizer.pad_token_id)
    held_out_pairs = [(p, response[:cut]) for p, responses in zip(reward_prompts, reward_responses)
                      for response in responses[:1]]
    held_out = pad_batch(held_out_pairs[: spec.num_held_out_sequences], tokenizer.pad_token_id)
    drafters = build_drafters(actor, warmup, held_out, spec.drafter, paths["day0_drafter_dir"],
                              paths["drafter_dir"], spec.seed, feature_batch_size=8,
                              context_tokens=spec.drafter_context_tokens)
    stopwatch.lap("drafters")
    return RealModelBuild(actor, drafters, {**rollout_metrics, **drafters.metrics})


def _reward_and_lengths(tokenizer, problems, responses: list[list[list[int]]], max_response_length: int) -> dict:
    """Mean verl GSM8K reward of the sampled responses (each problem's answer as ground truth), and their lengths."""
    from verl.utils.reward_score import default_compute_score

    scores, lengths = [], []
    for problem, samples in zip(problems, responses):
        for response in samples:
            text = tokenizer.decode(response, skip_special_tokens=True)
            scores.append(default_compute_score("openai/gsm8k", text, str(problem.answer)))
            lengths.append(len(response))
    return {
        "reward_temperature_1": round(statistics.fmean(scores), 4),
        "reward_samples": len(scores),
        "response_length": {"mean": round(statistics.fmean(lengths), 1), "median": statistics.median(lengths),
                            "fraction_at_limit": round(sum(n >= max_response_length for n in lengths) / len(lengths),
                                                       4)},
    }

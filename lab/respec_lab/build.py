"""Builds the lab once, reproducibly (seeded), and caches it outside git: math data, tokenizer, supervised actor,
day-0 and warmed-up EAGLE-3 drafters. Everything the CPU demo, tests and benchmarks run on comes from here.

``build_lab(preset)`` returns the paths of a complete build under ``$RESPEC_CACHE/lab/<preset>-<hash>`` (default
``~/.cache/respec``). The hash covers the preset and ``LAB_VERSION``, so a changed recipe builds anew; a build is
written to a temporary directory and renamed into place, so a crash never leaves a half-built lab behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from respec_plugin.core.drafter.warmup import DistillSpec
from respec_lab.data import MathDataSpec, read_problems, write_math_data
from respec_lab.drafters import BuiltDrafters, DrafterSpec, build_drafters
from respec_lab.real_model_lab import RealModelPreset, build_real_model_lab
from respec_lab.registry_model import SMOLLM2_135M_INSTRUCT
from respec_lab.stopwatch import Stopwatch
from respec_lab.models import (
    ActorSpec,
    PaddedBatch,
    SupervisionSpec,
    build_actor,
    chat_prompt_ids,
    expand_depth,
    pad_batch,
    sample_responses,
    supervise_actor,
    supervised_examples,
    tokenizer_corpus,
    train_tokenizer,
)

logger = logging.getLogger(__name__)

# Bump when a code change alters what a build produces: it invalidates every cached lab.
LAB_VERSION = 3
MANIFEST = "lab.json"
MAX_NEW_TOKENS = 96


@dataclass(frozen=True)
class LabPreset:
    """Everything that determines a lab build (its hash names the cache directory)."""

    data: MathDataSpec
    tokenizer_vocab_size: int
    actor: ActorSpec
    # The supervised actor is deepened this many times by function-preserving block expansion (see expand_depth).
    depth_expansion: int
    supervision: SupervisionSpec
    drafter: DrafterSpec
    num_eval_problems: int
    seed: int


PRESETS: dict[str, LabPreset | RealModelPreset] = {
    # Mechanics (tests): the smallest lab, quick to build on a few CPU cores.
    "tiny": LabPreset(
        data=MathDataSpec(num_train=2048, num_val=64, max_operand=10, seed=0),
        tokenizer_vocab_size=512,
        actor=ActorSpec(num_hidden_layers=4, hidden_size=128, intermediate_size=384, num_attention_heads=2,
                        num_key_value_heads=1),
        depth_expansion=1,
        supervision=SupervisionSpec(steps=300, batch_size=16, learning_rate=5e-3, seed=0),
        drafter=DrafterSpec(draft_vocab_size=256, eagle_aux_hidden_state_layer_ids=(1, 2, 3), num_warmup_sequences=256,
                            distill=DistillSpec(steps=120, batch_size=32, learning_rate=3e-3, num_draft_steps=3,
                                                seed=0)),
        num_eval_problems=64,
        seed=0,
    ),
    # The CPU demo and benchmarks: a 16-layer actor, so its forward dominates the one-layer drafter's.
    "demo": LabPreset(
        data=MathDataSpec(num_train=4096, num_val=256, max_operand=20, seed=0),
        tokenizer_vocab_size=512,
        actor=ActorSpec(num_hidden_layers=4, hidden_size=256, intermediate_size=768, num_attention_heads=4,
                        num_key_value_heads=2),
        depth_expansion=4,
        supervision=SupervisionSpec(steps=640, batch_size=16, learning_rate=2e-3, seed=0),
        drafter=DrafterSpec(draft_vocab_size=256, eagle_aux_hidden_state_layer_ids=(2, 8, 13),
                            num_warmup_sequences=512,
                            distill=DistillSpec(steps=200, batch_size=16, learning_rate=3e-3, num_draft_steps=3,
                                                seed=0)),
        num_eval_problems=128,
        seed=0,
    ),
    # The real-model lab: a pretrained 135 M-parameter actor, whose decode step costs what a real model's does, so
    # speculation can pay where a rollout thins out (benchmarks/rollout_real.py).
    "smollm2": RealModelPreset(
        model=SMOLLM2_135M_INSTRUCT,
        data=MathDataSpec(num_train=4096, num_val=256, max_operand=10, seed=0),
        num_shots=3,
        max_response_length=512,
        num_reward_problems=64,
        samples_per_prompt=4,
        drafter=DrafterSpec(draft_vocab_size=2048, eagle_aux_hidden_state_layer_ids=(), num_warmup_sequences=384,
                            distill=DistillSpec(steps=240, batch_size=16, learning_rate=2e-3, num_draft_steps=3,
                                                seed=0)),
        drafter_response_tokens=160,
        drafter_context_tokens=32,
        num_held_out_sequences=48,
        seed=0,
    ),
}


@dataclass(frozen=True)
class LabPaths:
    """A built lab: where its parts are, their sizes (parameter counts) and what the build measured."""

    preset: str
    root: str
    train_parquet: str
    val_parquet: str
    actor_dir: str
    drafter_dir: str
    day0_drafter_dir: str
    sizes: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)


_LAYOUT = {
    "train_parquet": "data/train.parquet",
    "val_parquet": "data/val.parquet",
    "actor_dir": "actor",
    "drafter_dir": "drafter",
    "day0_drafter_dir": "drafter_day0",
}


def cache_root() -> Path:
    """``$RESPEC_CACHE`` if set, else ``~/.cache/respec``."""
    return Path(os.environ.get("RESPEC_CACHE") or Path.home() / ".cache" / "respec")


def lab_dir(preset: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the build of ``preset`` lives: named by a short hash of the preset spec and the lab code version."""
    if preset not in PRESETS:
        raise ValueError(f"lab preset {preset!r} is unknown: use one of {', '.join(sorted(PRESETS))}.")
    spec = json.dumps([LAB_VERSION, asdict(PRESETS[preset])], sort_keys=True)
    return Path(cache_dir or cache_root()) / "lab" / f"{preset}-{hashlib.sha256(spec.encode()).hexdigest()[:10]}"


def build_lab(preset: str = "demo", cache_dir: str | os.PathLike | None = None) -> LabPaths:
    """The lab for ``preset``: reused from the cache when complete, otherwise built now (minutes on CPU)."""
    root = lab_dir(preset, cache_dir)
    if not (root / MANIFEST).exists():
        root.parent.mkdir(parents=True, exist_ok=True)
        with _exclusive(root.parent / f".{root.name}.lock"):
            if not (root / MANIFEST).exists():
                tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}-"))
                try:
                    _build(preset, PRESETS[preset], tmp)
                    shutil.rmtree(root, ignore_errors=True)
                    os.rename(tmp, root)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
    manifest = json.loads((root / MANIFEST).read_text())
    return LabPaths(preset=preset, root=str(root), sizes=manifest["sizes"], metrics=manifest["metrics"],
                    **{name: str(root / relative) for name, relative in _LAYOUT.items()})


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """One builder per lab at a time (a second process waits, then finds the finished build)."""
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextlib.contextmanager
def _single_thread() -> Iterator[None]:
    """Trains with one intra-op thread: on a small shared machine, threads contending with other jobs make the
    lab's small matmuls many times slower (benchmarks/README.md), and one thread also keeps reductions in a fixed
    order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _build(preset: str, spec: LabPreset | RealModelPreset, out: Path) -> None:
    stopwatch = Stopwatch(f"lab {preset}")
    if isinstance(spec, RealModelPreset):
        built = build_real_model_lab(spec, {name: out / relative for name, relative in _LAYOUT.items()}, stopwatch)
        _write_manifest(preset, spec, out, built.actor, built.drafters, {**built.metrics, "build_s": stopwatch.report()})
        return
    with _single_thread():
        torch.manual_seed(spec.seed)
        (out / "data").mkdir()
        write_math_data(spec.data, out / _LAYOUT["train_parquet"], out / _LAYOUT["val_parquet"])
        train, val = read_problems(out / _LAYOUT["train_parquet"]), read_problems(out / _LAYOUT["val_parquet"])
        tokenizer = train_tokenizer(tokenizer_corpus(train), spec.tokenizer_vocab_size)
        stopwatch.lap("data_and_tokenizer")

        actor = build_actor(spec.actor, tokenizer, spec.seed)
        sft_losses = supervise_actor(actor, supervised_examples(tokenizer, train), spec.supervision,
                                     tokenizer.pad_token_id)
        actor = expand_depth(actor, spec.depth_expansion)
        actor.save_pretrained(out / _LAYOUT["actor_dir"])
        tokenizer.save_pretrained(out / _LAYOUT["actor_dir"])
        stopwatch.lap("actor_supervision")

        eval_problems = val[: spec.num_eval_problems]
        eval_prompts = [chat_prompt_ids(tokenizer, p.question) for p in eval_problems]
        accuracy = {f"accuracy_temperature_{t:g}": _accuracy(actor, tokenizer, eval_prompts, eval_problems, t, spec.seed)
                    for t in (0.0, 1.0)}
        logger.info("lab %s: actor accuracy %s", preset, accuracy)
        stopwatch.lap("actor_evaluation")

        # Warm-up data: the actor's own rollouts at temperature 1 (what GRPO samples), then held-out ones.
        warmup_prompts = [chat_prompt_ids(tokenizer, p.question) for p in train[: spec.drafter.num_warmup_sequences]]
        warmup = _rollouts(actor, tokenizer, warmup_prompts, spec.seed)
        held_out = _rollouts(actor, tokenizer, eval_prompts, spec.seed + 1)
        stopwatch.lap("actor_rollouts")

        drafters = build_drafters(actor, warmup, held_out, spec.drafter, out / _LAYOUT["day0_drafter_dir"],
                                  out / _LAYOUT["drafter_dir"], spec.seed)
        stopwatch.lap("drafter_warmup")

    metrics = {
        **accuracy,
        "actor_final_sft_loss": round(sum(sft_losses[-20:]) / len(sft_losses[-20:]), 4),
        **drafters.metrics,
        "build_s": stopwatch.report(),
    }
    _write_manifest(preset, spec, out, actor, drafters, metrics)


def _write_manifest(preset: str, spec: LabPreset | RealModelPreset, out: Path, actor, drafters: BuiltDrafters,
                    metrics: dict) -> None:
    sizes = {
        "actor_params": sum(p.numel() for p in actor.parameters()),
        "actor_layers": actor.config.num_hidden_layers,
        "actor_hidden_size": actor.config.hidden_size,
        "vocab_size": actor.config.vocab_size,
        "drafter_params": sum(p.numel() for p in drafters.drafter.parameters()),
        "draft_vocab_size": drafters.drafter.config.draft_vocab_size,
    }
    manifest = {"preset": preset, "lab_version": LAB_VERSION, "spec": asdict(spec), "sizes": sizes, "metrics": metrics}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    logger.info("lab %s built in %.0f s: sizes %s metrics %s", preset, metrics["build_s"]["total"], sizes, metrics)


def _rollouts(actor, tokenizer, prompts: list[list[int]], seed: int) -> PaddedBatch:
    """Temperature-1 samples, right-padded."""
    responses = sample_responses(actor, prompts, temperature=1.0, max_new_tokens=MAX_NEW_TOKENS,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, seed=seed)
    return pad_batch(list(zip(prompts, responses)), tokenizer.pad_token_id)


def _accuracy(actor, tokenizer, prompts, problems, temperature: float, seed: int) -> float:
    """Fraction of problems whose generated solution verl's GSM8K reward scores 1."""
    from verl.utils.reward_score import default_compute_score

    responses = sample_responses(actor, prompts, temperature=temperature, max_new_tokens=MAX_NEW_TOKENS,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, seed=seed)
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    scores = [default_compute_score("openai/gsm8k", text, str(p.answer)) for text, p in zip(texts, problems)]
    return round(sum(scores) / len(scores), 4)


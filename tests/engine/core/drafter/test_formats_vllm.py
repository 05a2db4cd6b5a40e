"""Each drafter format respec accepts (vLLM's layout, speculators', the EAGLE authors'), on vLLM CPU and the tiny lab:
an engine started on the day-0 drafter in that format serves it, one learner step on the engine's own rollouts
changes it, the candidate is pushed into the live engine in that format's names and served, and the drafter the
learner saves loads, in the format it came in, into a fresh plain vLLM engine that serves it as the hot-swapped one
did. Two engines per format, one at a time (~3 min in all)."""

import pytest

pytest.importorskip("vllm")

import safetensors.torch  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from respec_lab.data import read_problems  # noqa: E402
from respec_lab.models import chat_prompt_ids  # noqa: E402
from respec_plugin.core.config import LearnerConfig  # noqa: E402
from respec_plugin.core.drafter.checkpoint import read_drafter_tensors  # noqa: E402
from respec_plugin.core.drafter.formats import detect_format  # noqa: E402
from respec_plugin.core.drafter.io import load_drafter, save_drafter  # noqa: E402
from respec_plugin.core.learner.loop import SERVING_DIR, OnlineLearner  # noqa: E402
from tests.engine.core.drafter.test_eagle3_vllm import (  # noqa: E402
    ENGINE_KWARGS,
    NUM_PROMPTS,
    NUM_SPECULATIVE_TOKENS,
    _generate,
    _shutdown,
)
from tests.unit.core.drafter.checkpoint_formats import write_eagle, write_speculators  # noqa: E402
from tests.unit.core.learner.lab_features import step_features  # noqa: E402

FORMATS = ("vllm", "speculators", "eagle")
WORKER_EXTENSION = "respec_plugin.integrations.vllm.worker_extension.ReSpecWorkerExtension"


def _engine(actor_dir, drafter_dir, respec_worker: bool):
    """vLLM CPU with the EAGLE-3 drafter at ``drafter_dir``; ``respec_worker`` adds respec's hot-swap extension
    (without it: plain vLLM, as a user serves a drafter after RL)."""
    from vllm import LLM

    extension = {"worker_extension_cls": WORKER_EXTENSION} if respec_worker else {}
    return LLM(model=actor_dir, speculative_config={"method": "eagle3", "model": str(drafter_dir),
                                                    "num_speculative_tokens": NUM_SPECULATIVE_TOKENS},
               per_request_spec_decode_metrics="detailed", **ENGINE_KWARGS, **extension)


def _source(fmt, tiny_lab, actor, out):
    """The lab's day-0 drafter in format ``fmt``."""
    day0, _ = load_drafter(tiny_lab.day0_drafter_dir)
    if fmt == "speculators":
        return write_speculators(day0, out, tiny_lab.actor_dir, actor.get_input_embeddings().weight.detach())
    if fmt == "eagle":
        return write_eagle(day0, out)  # with the aux layer ids: the lab's 4-layer actor is below vLLM's default
    save_drafter(day0, out, drafter_version=0)
    return out


def _push(llm, weights, version):
    payload = safetensors.torch.save({name: t.detach().cpu().contiguous() for name, t in weights})
    return llm.collective_rpc("respec_load_drafter", args=(payload, version))[0]


@pytest.fixture(scope="module")
def runs(tiny_lab, tmp_path_factory):
    """Per format: start-up push, served outputs and stats before and after one learner step's hot-swap, and those
    of a fresh plain vLLM engine on the drafter the learner saved."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_lab.actor_dir)
    actor = AutoModelForCausalLM.from_pretrained(tiny_lab.actor_dir, dtype=torch.float32).eval()
    prompts = [chat_prompt_ids(tokenizer, p.question) for p in read_problems(tiny_lab.val_parquet)[:NUM_PROMPTS]]
    learner_config = LearnerConfig(enable=True, steps_per_rl_step=12, learning_rate=3e-3)
    results = {}
    for fmt in FORMATS:
        run = results[fmt] = {}
        source = _source(fmt, tiny_lab, actor, tmp_path_factory.mktemp(f"{fmt}_source"))
        llm = _engine(tiny_lab.actor_dir, source, respec_worker=True)
        # What the respec server does at start-up: the checkpoint's own tensors, through the validated push.
        run["startup_push"] = _push(llm, read_drafter_tensors(source), 0)
        run["source_tensor_names"] = sorted(name for name, _ in read_drafter_tensors(source))
        run["before"] = _generate(llm, prompts)

        drafter, version = load_drafter(source, actor.config.num_hidden_layers)
        run["loaded_format"] = drafter.format.name
        learner = OnlineLearner(learner_config, drafter, version)
        features = step_features(actor, learner.drafter, prompts, run["before"][0], [1.0] * len(prompts))
        candidate = learner.train_candidate(features)
        run["rejection"] = candidate.rejection
        new_version = learner.next_version(candidate)
        run["pushed_names"] = sorted(name for name, _ in learner.candidate_weights())
        run["swap_push"] = _push(llm, learner.candidate_weights(), new_version)
        learner.settle(candidate, None)
        run["swapped"] = _generate(llm, prompts)
        _shutdown(llm)

        saved = tmp_path_factory.mktemp(f"{fmt}_learner")
        learner.save(saved)
        run["saved_format"], run["saved_config"] = detect_format(saved / SERVING_DIR)
        run["saved_files"] = sorted(path.name for path in (saved / SERVING_DIR).iterdir())
        llm = _engine(tiny_lab.actor_dir, saved / SERVING_DIR, respec_worker=False)
        run["fresh"] = _generate(llm, prompts)
        _shutdown(llm)
    return results


@pytest.mark.parametrize("fmt", FORMATS)
def test_engine_serves_the_format_and_a_learner_step_hot_swaps_into_it(fmt, runs):
    run = runs[fmt]
    assert run["loaded_format"] == fmt
    # The speculators checkpoint's embedding copy equals the actor's, so vLLM shares it and the push skips it.
    assert run["startup_push"]["version"] == 0
    assert run["startup_push"]["skipped_shared"] == (["embed_tokens.weight"] if fmt == "speculators" else [])
    assert run["rejection"] is None
    # The push names the tensors as the checkpoint the engine started from does (less the shared embedding and t2d).
    assert run["pushed_names"] == sorted(set(run["source_tensor_names"]) - {"embed_tokens.weight", "t2d"})
    layer = "layers.0." if fmt == "speculators" else "midlayer."
    assert f"{layer}self_attn.q_proj.weight" in run["pushed_names"]
    assert run["swap_push"] == {"version": 1, "loaded": len(run["pushed_names"]), "skipped_shared": []}
    # The day-0 drafter is almost never accepted; the learner's candidate, served after the swap, is.
    before, swapped = run["before"][1]["acceptance_rate"], run["swapped"][1]["acceptance_rate"]
    assert before < 0.1 and swapped > before + 0.1, (before, swapped)
    assert run["swapped"][0] == run["before"][0]  # lossless: the drafter changes speed, never the greedy tokens


@pytest.mark.parametrize("fmt", FORMATS)
def test_learner_saved_drafter_serves_in_a_fresh_vllm_engine_in_its_format(fmt, runs):
    run = runs[fmt]
    assert run["saved_format"] == fmt and run["saved_config"]["drafter_version"] == 1
    weights_file = "pytorch_model.bin" if fmt == "eagle" else "model.safetensors"
    assert run["saved_files"] == sorted(["config.json", weights_file])
    if fmt == "speculators":
        assert run["saved_config"]["speculators_model_type"] == "eagle3"
    swapped, fresh = run["swapped"][1]["acceptance_rate"], run["fresh"][1]["acceptance_rate"]
    # The same weights (the EAGLE layout saves them in float16, as it came in): the same acceptance.
    assert fresh == pytest.approx(swapped, abs=0.02 if fmt == "eagle" else 1e-9), (swapped, fresh)
    assert run["fresh"][0] == run["swapped"][0]


"""The respec server as verl runs it (a Ray actor around vLLM CPU): speculative generation with correct
per-request stats, greedy outputs identical to plain vLLM, and drafter hot-swap with rollback."""

import math
import os
import uuid

import pytest

pytest.importorskip("vllm")

import ray  # noqa: E402
import torch  # noqa: E402

from respec_plugin.drafter.checkpoint import read_drafter_tensors  # noqa: E402
from respec_plugin.lab.launch import respec_overrides  # noqa: E402

NUM_SPECULATIVE_TOKENS = 3
MAX_TOKENS = 40
CPU_ENV = {"VERL_PLATFORM": "cpu", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def _rollout_and_model_config(actor_dir: str, respec_block: dict):
    """verl's own composed config for a CPU respec rollout (what the trainer would hand the server)."""
    import verl
    from hydra import compose, initialize_config_dir

    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    overrides = [
        f"actor_rollout_ref.model.path={actor_dir}",
        "actor_rollout_ref.rollout.name=respec",
        "actor_rollout_ref.rollout.load_format=auto",  # no trainer here to sync real weights into a dummy init
        "actor_rollout_ref.rollout.dtype=float32",  # greedy identity must not hinge on bf16 near-ties
        "actor_rollout_ref.rollout.enforce_eager=True",
        "actor_rollout_ref.rollout.free_cache_engine=False",
        "+actor_rollout_ref.rollout.enable_sleep_mode=False",
        "actor_rollout_ref.rollout.gpu_memory_utilization=0.3",
        "+actor_rollout_ref.rollout.engine_kwargs.vllm.kv_cache_memory_bytes=268435456",
        "actor_rollout_ref.rollout.max_model_len=512",
        "actor_rollout_ref.rollout.prompt_length=128",
        "actor_rollout_ref.rollout.response_length=128",
        "actor_rollout_ref.rollout.max_num_batched_tokens=1024",
        "actor_rollout_ref.rollout.tensor_model_parallel_size=1",
        *respec_overrides(**respec_block),
    ]
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        cfg = compose(config_name="ppo_trainer", overrides=overrides)
    return cfg.actor_rollout_ref.rollout, cfg.actor_rollout_ref.model


def _start_server(actor_dir: str, respec_block: dict):
    from verl.workers.rollout.replica import RolloutMode

    from respec_plugin.rollout.server import ReSpecHttpServer

    rollout_config, model_config = _rollout_and_model_config(actor_dir, respec_block)
    server = (
        ray.remote(ReSpecHttpServer)
        .options(runtime_env={"env_vars": CPU_ENV}, max_concurrency=64)
        .remote(
            config=rollout_config,
            model_config=model_config,
            rollout_mode=RolloutMode.STANDALONE,
            workers=[],
            replica_rank=0,
            node_rank=0,
            gpus_per_node=1,
            nnodes=1,
            cuda_visible_devices="0",
        )
    )
    ray.get(server.launch_server.remote())
    return server


@pytest.fixture(scope="module")
def ray_cluster():
    os.environ.update(CPU_ENV)
    ray.init(num_cpus=8, include_dashboard=False, runtime_env={"env_vars": CPU_ENV})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def prompts(tiny_lab):
    import pandas as pd
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_lab.actor_dir)
    rows = pd.read_parquet(tiny_lab.val_parquet).head(6)
    return [
        tokenizer.apply_chat_template(list(row), add_generation_prompt=True, tokenize=True, return_dict=False)
        for row in rows["prompt"]
    ]


@pytest.fixture(scope="module")
def server(ray_cluster, tiny_lab):
    """Starts with the *day-0* drafter, so a hot-swap to the trained one must raise acceptance."""
    handle = _start_server(
        tiny_lab.actor_dir,
        {"drafter_path": tiny_lab.day0_drafter_dir, "num_speculative_tokens": NUM_SPECULATIVE_TOKENS},
    )
    yield handle
    ray.kill(handle)


def _generate(server, prompts, temperature=0.0):
    sampling = {"temperature": temperature, "max_tokens": MAX_TOKENS}
    refs = [server.generate.remote(p, dict(sampling), uuid.uuid4().hex) for p in prompts]
    return ray.get(refs)


def _acceptance_length(outputs) -> float:
    steps = sum(o.extra_fields["respec"]["num_verify_steps"] for o in outputs)
    accepted = sum(o.extra_fields["respec"]["num_accepted_tokens"] for o in outputs)
    return 1.0 + accepted / steps


def _plain_vllm_greedy(actor_dir, prompts):
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=actor_dir,
        dtype="float32",
        enforce_eager=True,
        max_model_len=512,
        gpu_memory_utilization=0.3,
        kv_cache_memory_bytes=256 << 20,
        seed=0,
    )
    outs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    )
    del llm
    return [list(o.outputs[0].token_ids) for o in outs]


def test_speculative_generation_reports_consistent_stats(server, prompts):
    outputs = _generate(server, prompts)
    for out in outputs:
        stats = out.extra_fields["respec"]
        assert stats["num_output_tokens"] == len(out.token_ids) > 0
        assert stats["num_speculative_tokens"] == NUM_SPECULATIVE_TOKENS
        assert stats["drafter_version"] == 0
        assert stats["num_verify_steps"] > 0
        assert stats["num_draft_tokens"] == sum(stats["drafted_per_pos"])
        assert stats["num_accepted_tokens"] == sum(stats["accepted_per_pos"]) <= stats["num_draft_tokens"]
        assert stats["drafted_per_pos"][0] == stats["num_verify_steps"]
        # Each verify step emits its accepted tokens plus one; the first token comes from the prefill, and the
        # last step may be cut by max_tokens or EOS.
        emitted = 1 + stats["num_verify_steps"] + stats["num_accepted_tokens"]
        assert emitted - NUM_SPECULATIVE_TOKENS <= stats["num_output_tokens"] <= emitted
        assert stats["end_time"] >= stats["start_time"]


def test_hot_swap_raises_acceptance_and_bad_versions_roll_back(server, prompts, tiny_lab):
    day0 = _generate(server, prompts)

    trained = read_drafter_tensors(tiny_lab.drafter_dir)
    report = ray.get(server.push_drafter.remote(trained, 1))
    assert report == {"ok": True, "version": 1, "error": None, "failures": 0}
    swapped = _generate(server, prompts)
    assert {o.extra_fields["respec"]["drafter_version"] for o in swapped} == {1}
    assert _acceptance_length(swapped) > _acceptance_length(day0) + 0.3
    # Lossless: the drafter changes speed, never the greedy tokens.
    assert [o.token_ids for o in swapped] == [o.token_ids for o in day0]
    # GRPO samples at temperature 1: the warmed-up drafter keeps most of its acceptance there (the lab build
    # predicts ~0.7 per position); broken sampling on vLLM CPU (lab/vllm_cpu_sampling.py) gave ~1.0.
    assert _acceptance_length(_generate(server, prompts, temperature=1.0)) > 1.8

    nan_drafter = [(n, torch.full_like(t, math.nan) if t.is_floating_point() else t) for n, t in trained]
    wrong_shape = [(n, t[:-1] if n == "fc.weight" else t) for n, t in trained]
    for version, broken in ((2, nan_drafter), (3, wrong_shape)):
        report = ray.get(server.push_drafter.remote(broken, version))
        assert not report["ok"] and report["version"] == 1 and report["error"]
    assert ray.get(server.drafter_status.remote())["failures"] == 2

    after = _generate(server, prompts)
    assert [o.token_ids for o in after] == [o.token_ids for o in swapped]
    assert {o.extra_fields["respec"]["drafter_version"] for o in after} == {1}
    assert _acceptance_length(after) == pytest.approx(_acceptance_length(swapped))


def test_greedy_outputs_equal_plain_vllm(server, prompts, tiny_lab):
    respec_tokens = [o.token_ids for o in _generate(server, prompts)]
    assert respec_tokens == _plain_vllm_greedy(tiny_lab.actor_dir, prompts)

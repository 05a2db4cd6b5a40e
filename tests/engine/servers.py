"""What the engine tests share: a respec server started as verl starts it (a Ray actor around vLLM CPU, its config
composed by verl's own Hydra config), requests to it, and the prompts they send (fixtures in tests/engine/conftest.py)."""

import os
import uuid

import ray

from respec_lab.launch import respec_overrides

MAX_TOKENS = 40
CPU_ENV = {"VERL_PLATFORM": "cpu", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def rollout_and_model_config(actor_dir: str, respec_block: dict):
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


def start_server(actor_dir: str, respec_block: dict, env: dict[str, str] | None = None):
    """A respec server (Ray actor) with ``env`` added to its processes' environment."""
    from verl.workers.rollout.replica import RolloutMode

    from respec_plugin.integrations.verl.server import ReSpecHttpServer

    rollout_config, model_config = rollout_and_model_config(actor_dir, respec_block)
    server = (
        ray.remote(ReSpecHttpServer)
        .options(runtime_env={"env_vars": {**CPU_ENV, **(env or {})}}, max_concurrency=64)
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


def generate(server, prompts, temperature=0.0):
    sampling = {"temperature": temperature, "max_tokens": MAX_TOKENS}
    refs = [server.generate.remote(p, dict(sampling), uuid.uuid4().hex) for p in prompts]
    return ray.get(refs)

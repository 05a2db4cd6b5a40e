"""Every recipe (script x dataset) composes with verl's installed Hydra config and passes verl's own validation and
respec's, so the recipes cannot rot: the test runs each script in its DRY_RUN mode and composes the command it
prints (and, without a drafter, runs the day-0 drafter build it prints first)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from transformers import AutoConfig

from respec_plugin.compat import check_vllm_supports
from respec_plugin.core.config import ReSpecConfig
from respec_plugin.core.drafter import day0

RECIPES = Path(__file__).resolve().parents[3] / "recipes"
SCRIPTS = sorted(RECIPES.glob("grpo_qwen2_5_*.sh"))
DATASETS = ("gsm8k", "math", "mixed")
TENSOR_PARALLEL = {"3b": 1, "7b": 2, "14b": 4}


def _recipe_commands(script: Path, env: dict[str, str], *overrides: str) -> list[list[str]]:
    """The argvs the recipe script would run, in order (DRY_RUN=1 prints them shell-quoted, one per line)."""
    result = subprocess.run(
        ["bash", str(script), *overrides],
        env={**os.environ, "PYTHON": sys.executable, "DRY_RUN": "1", **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in result.stdout.splitlines()]


def _recipe_command(script: Path, env: dict[str, str], *overrides: str) -> list[str]:
    """The verl command, the only one when a drafter is given."""
    [argv] = _recipe_commands(script, env, *overrides)
    return argv


def _compose(argv: list[str]) -> DictConfig:
    assert argv[:3] == [sys.executable, "-m", "verl.trainer.main_ppo"]
    assert argv[3] == "--config-path" and argv[5] == "--config-name"
    with initialize_config_dir(config_dir=argv[4], version_base=None):
        return compose(config_name=argv[6], overrides=argv[7:])


@pytest.fixture
def drafter_dir(tmp_path: Path) -> Path:
    """Stands in for a real drafter checkpoint: ReSpecConfig only checks that config.json is there."""
    path = tmp_path / "eagle3-drafter"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"architectures": ["Eagle3LlamaForCausalLM"]}))
    return path


def test_there_is_a_recipe_per_model_size() -> None:
    assert [s.name for s in SCRIPTS] == [f"grpo_qwen2_5_{size}.sh" for size in ("14b", "3b", "7b")]


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda s: s.stem)
def test_recipe_composes_with_verl_config_and_validates(script: Path, dataset: str, drafter_dir: Path,
                                                        tmp_path: Path) -> None:
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import omega_conf_to_dataclass, validate_config

    data_dir = tmp_path / "data"
    argv = _recipe_command(script, {"DATASET": dataset, "DATA_DIR": str(data_dir), "DRAFTER_PATH": str(drafter_dir)})
    config = _compose(argv)

    use_reference_policy, use_critic = need_reference_policy(config), need_critic(config)
    assert use_reference_policy and not use_critic  # GRPO with the KL loss: a reference model, no critic
    validate_config(config=config, use_reference_policy=use_reference_policy, use_critic=use_critic)

    assert config.algorithm.adv_estimator == "grpo"
    datasets = ("gsm8k", "math") if dataset == "mixed" else (dataset,)
    assert list(config.data.train_files) == [str(data_dir / d / "train.parquet") for d in datasets]
    assert list(config.data.val_files) == [str(data_dir / d / "test.parquet") for d in datasets]

    size = script.stem.rsplit("_", 1)[1]
    assert config.actor_rollout_ref.model.path == f"Qwen/Qwen2.5-{size.upper()}-Instruct"
    rollout = omega_conf_to_dataclass(config.actor_rollout_ref.rollout)
    assert rollout.name == "respec" and rollout.n == 5
    assert rollout.tensor_model_parallel_size == TENSOR_PARALLEL[size]

    respec = ReSpecConfig.from_rollout_config(rollout)
    check_vllm_supports(respec)
    assert respec.method == "eagle3" and respec.drafter_path == str(drafter_dir)
    assert respec.learner.enable and respec.tuner.mode == "adaptive"
    spec = respec.speculative_config()
    assert spec["method"] == "eagle3" and spec["model"] == str(drafter_dir)
    assert spec["num_speculative_tokens"] == respec.tuner.k_max == 6


def test_user_paths_and_overrides_reach_the_config(drafter_dir: Path, tmp_path: Path) -> None:
    env = {"DRAFTER_PATH": str(drafter_dir), "MODEL_PATH": str(tmp_path / "my-actor"), "NGPUS_PER_NODE": "4"}
    static_eagle3 = [f"actor_rollout_ref.rollout.custom.respec.{key}" for key in
                     ("num_speculative_tokens=5", "learner.enable=false", "tuner.mode=off")]
    config = _compose(_recipe_command(RECIPES / "grpo_qwen2_5_7b.sh", env, *static_eagle3))
    assert config.actor_rollout_ref.model.path == str(tmp_path / "my-actor")
    assert config.trainer.n_gpus_per_node == 4
    assert config.trainer.experiment_name == "qwen2_5_7b_gsm8k"
    respec = ReSpecConfig.from_rollout_config(config.actor_rollout_ref.rollout)
    assert not respec.learner.enable and not respec.tuner.enabled
    assert respec.speculative_config()["num_speculative_tokens"] == 5


@pytest.mark.parametrize(
    ("env", "message"),
    [({"DATASET": "gsm8k"}, "set MODEL_PATH to the actor's local"),
     ({"DATASET": "aime", "DRAFTER_PATH": "/d"}, "DATASET must be")],
)
def test_bad_recipe_input_fails_with_the_fix(env: dict[str, str], message: str) -> None:
    result = subprocess.run(["bash", str(SCRIPTS[0])],
                            env={**os.environ, "DRY_RUN": "1", "DRAFTER_PATH": "", "MODEL_PATH": "", **env},
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 1 and message in result.stderr


def test_without_a_drafter_the_recipe_builds_a_day0_drafter_once(tiny_lab, tmp_path: Path) -> None:
    checkpoint_dir = tmp_path / "checkpoints"
    env = {"DRAFTER_PATH": "", "MODEL_PATH": tiny_lab.actor_dir, "CHECKPOINT_DIR": str(checkpoint_dir)}
    build, argv = _recipe_commands(SCRIPTS[0], env)
    day0_dir = checkpoint_dir / "drafter_day0"
    assert build == [sys.executable, "-m", "respec_plugin.core.drafter.day0", "--actor", tiny_lab.actor_dir,
                     "--out", str(day0_dir)]
    day0.main(build[3:])  # what the script runs before verl

    config = _compose(argv)
    assert config.trainer.default_local_dir == str(checkpoint_dir)
    respec = ReSpecConfig.from_rollout_config(config.actor_rollout_ref.rollout)
    assert respec.drafter_path == str(day0_dir) and respec.learner.enable
    respec.check_against_actor(AutoConfig.from_pretrained(tiny_lab.actor_dir))
    # Built once: a second launch (e.g. a resumed run) reuses it.
    assert _recipe_command(SCRIPTS[0], env) == argv


def _leaf_keys(node, prefix: str = "") -> list[str]:
    if not isinstance(node, dict):
        return [prefix]
    return [key for name, child in node.items() for key in _leaf_keys(child, f"{prefix}{name}.")]


def test_every_recipe_key_is_a_verl_key() -> None:
    """A misspelt key would pass composition silently where verl's section is a plain dict (data.*)."""
    import verl.trainer.main_ppo as main_ppo
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(Path(main_ppo.__file__).parent / "config"), version_base=None):
        stock = OmegaConf.to_container(compose(config_name="ppo_trainer"))
    stock_keys = {key.rstrip(".") for key in _leaf_keys(stock)}
    for yaml_path in sorted((RECIPES / "config").glob("*.yaml")):
        recipe = OmegaConf.to_container(OmegaConf.load(yaml_path))
        for key in _leaf_keys({k: v for k, v in recipe.items() if k not in ("hydra", "defaults")}):
            key = key.rstrip(".")
            if key.startswith("actor_rollout_ref.rollout.custom.respec."):
                continue  # respec's own block, checked by ReSpecConfig in the composition test
            assert key in stock_keys, f"{yaml_path.name}: {key} is not a key of verl's ppo_trainer config"

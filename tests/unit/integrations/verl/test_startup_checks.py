"""Every bad input of ``tests/bad_inputs.py`` is refused by respec's start-up checks, with an error naming the key
(or file), the value and the fix. The config is the one verl's CLI would build: the lab's GRPO command composed with
verl's own Hydra config and resolved, as verl's task runner does, then parsed and checked as respec's trainer does
when verl constructs it (tests/e2e/test_bad_input_cli.py runs one case per kind through the CLI itself)."""

from pathlib import Path

import pytest
import verl
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from respec_lab.launch import VERL_MAIN, override_key
from respec_plugin.core.config import ReSpecConfig, ReSpecConfigError
from respec_plugin.integrations.verl.startup_checks import check_at_startup
from tests.bad_inputs import CASES, Case, bad_input_command

VERL_CONFIG_DIR = Path(verl.__file__).parent / "trainer" / "config"  # main_ppo's @hydra.main(config_path="config")


def _verl_config(argv: list[str]) -> DictConfig:
    """The resolved trainer config ``python -m verl.trainer.main_ppo <overrides>`` would run with."""
    assert argv[1:3] == ["-m", VERL_MAIN]
    overrides = [o for o in argv[3:] if not override_key(o).startswith("hydra.")]  # Hydra's own run dir
    with initialize_config_dir(config_dir=str(VERL_CONFIG_DIR), version_base=None):
        config = compose(config_name="ppo_trainer", overrides=overrides)
    OmegaConf.resolve(config)
    return config


def _check_as_the_trainer_does(config: DictConfig) -> None:
    respec = ReSpecConfig.from_rollout_config(config.actor_rollout_ref.rollout)
    check_at_startup(config, respec)


def test_the_lab_command_without_bad_input_passes(tiny_lab, tmp_path):
    argv, _ = bad_input_command(Case(), tiny_lab, tmp_path)
    _check_as_the_trainer_does(_verl_config(argv))


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_refused_with_key_value_and_fix(name, tiny_lab, tmp_path):
    case = CASES[name]
    argv, _ = bad_input_command(case, tiny_lab, tmp_path)
    with pytest.raises(ReSpecConfigError) as refused:
        _check_as_the_trainer_does(_verl_config(argv))
    for phrase in case.expect:
        assert phrase in str(refused.value), f"{name}: {phrase!r} not in {str(refused.value)!r}"

"""The trainer state respec reads through its view: which folder verl resumed from, in both of verl's resume modes,
and whether verl saved at the current step (verl's own decision, as the mixin records it)."""

from types import SimpleNamespace

from respec_plugin.integrations.verl.trainer_view import TrainerView


def _trainer(tmp_path, global_steps=4, resume_mode="auto", resume_from_path=None, **attributes):
    config = SimpleNamespace(trainer=SimpleNamespace(default_local_dir=str(tmp_path / "ckpt"), resume_mode=resume_mode,
                                                     resume_from_path=resume_from_path))
    return SimpleNamespace(config=config, global_steps=global_steps, **attributes)


def test_resumed_folder_in_auto_mode_is_the_steps_folder(tmp_path):
    view = TrainerView(_trainer(tmp_path))
    assert view.resumed_folder(3) == tmp_path / "ckpt" / "global_step_3"
    assert view.resumed_folder(0) is None
    assert view.step_folder() == tmp_path / "ckpt" / "global_step_4"


def test_resumed_folder_in_resume_path_mode_is_the_given_one(tmp_path):
    given = tmp_path / "elsewhere" / "global_step_7"
    view = TrainerView(_trainer(tmp_path, resume_mode="resume_path", resume_from_path=str(given)))
    assert view.resumed_folder(7) == given


def test_saved_this_step_follows_what_verl_did(tmp_path):
    trainer = _trainer(tmp_path)
    view = TrainerView(trainer)
    assert not view.saved_this_step
    trainer._respec_saved_step = 4
    assert view.saved_this_step
    trainer.global_steps = 5
    assert not view.saved_this_step

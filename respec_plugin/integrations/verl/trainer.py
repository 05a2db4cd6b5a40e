"""Hooks into verl's v1 trainers: ``respec/*`` metrics every step when ``rollout.name=respec``, the tuner's updates
and the online learner between steps, and respec's state in verl's checkpoints.

verl picks its trainer class from ``TRAINER_REGISTRY[trainer.v1.trainer_mode]`` and only aggregates speculation stats
when MTP is on. So that users switch respec on with the rollout name alone, every registered trainer is replaced by a
subclass named ``ReSpec<verl's class name>`` with :class:`ReSpecTrainerMixin` in front; it behaves exactly like verl's
class unless the rollout is respec. The registry lives in ``verl.trainer.ppo.v1``, which is heavy and imported late,
so the wrapping runs right after that package is first imported, in whichever process. A trainer registered after
that import is not wrapped: put :class:`ReSpecTrainerMixin` in its bases.
"""

from __future__ import annotations

import functools
import logging

from respec_plugin import ROLLOUT_NAME
from respec_plugin.core.checkpoint_files import TUNER_STATE_FILE, prune_orphaned_state, restore_folder
from respec_plugin.core.config import ReSpecConfig
from respec_plugin.core.import_hooks import after_import
from respec_plugin.core.report import DASHBOARD_KEYS, draw_dashboard
from respec_plugin.core.spec_stats import RequestSpecStats, aggregate_step_metrics
from respec_plugin.integrations.verl.trainer_view import TrainerView

logger = logging.getLogger(__name__)

_V1_PACKAGE = "verl.trainer.ppo.v1"
DASHBOARD_FILE = "respec_dashboard.png"  # in trainer.default_local_dir: at the last step and every checkpoint


class ReSpecTrainerMixin:
    """Adds the step's ``respec/*`` metrics, read from the rollouts' ``extra_fields`` in TransferQueue; updates the
    tuner between rollouts; drives the online drafter learner (``respec.learner.enable``), which runs on verl's
    actor ranks (respec's actor worker, installed here); and saves respec's state into verl's checkpoints. At the last
    step and at every checkpoint it draws the run's respec dashboard (``respec_plugin.core.report``) into the
    checkpoint root."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        if self._respec is not None:  # before verl builds any worker or engine: a bad value fails in seconds
            from respec_plugin.integrations.verl.startup_checks import check_at_startup

            check_at_startup(self.config, self._respec)

    @functools.cached_property
    def _respec(self) -> ReSpecConfig | None:
        """The respec block, parsed once (``_load_checkpoint`` needs it before ``on_train_begin``); None when the
        rollout is not respec."""
        rollout = self.config.actor_rollout_ref.rollout
        return ReSpecConfig.from_rollout_config(rollout) if rollout.name == ROLLOUT_NAME else None

    @functools.cached_property
    def _respec_view(self) -> TrainerView:
        return TrainerView(self)

    def _init_resource_pool_mgr(self):
        super()._init_resource_pool_mgr()
        if self._respec is not None and self._respec.learner.enable:
            from respec_plugin.integrations.verl.learner_worker import install_worker

            install_worker(self.role_worker_mapping)

    def on_train_begin(self):
        super().on_train_begin()
        self._respec_learner = None
        self._respec_learner_metrics: dict[str, float] = {}
        self._respec_engine_metrics: dict[str, float] = {}
        self._respec_dashboard_steps: dict[int, dict[str, float]] = {}
        if self._respec is not None and self._respec.learner.enable:
            from respec_plugin.integrations.verl.learner_driver import LearnerDriver

            self._respec_learner = LearnerDriver(self._respec_view, self._respec.learner)

    def _compute_old_log_prob(self, batch, metrics):
        if self._respec_learner is None:
            return super()._compute_old_log_prob(batch, metrics)
        self._respec_learner.select_rows(batch)  # the actor ranks keep these rows' features in this forward
        batch = super()._compute_old_log_prob(batch, metrics)
        correction = self.config.algorithm.get("rollout_correction", None)
        if correction and correction.get("bypass_mode", False):  # verl ran no forward: one over the kept rows
            self._respec_learner.forward_selected_rows(batch, self.config)
        return batch

    def _update_actor(self, batch, metrics):
        batch = super()._update_actor(batch, metrics)
        if self._respec_learner is not None:
            from verl.utils.debug import marked_timer

            with marked_timer("respec_learner", self.timing_raw):
                self._respec_learner_metrics = self._respec_learner.train(batch)
        return batch

    def step(self, metrics, timing_raw):
        batch = super().step(metrics, timing_raw)
        if self._respec is not None and self._respec.watchdog_enabled:
            from respec_plugin.integrations.verl.drafter_watchdog import check_drafters

            # Before the tuner's update (a watchdog that turned speculation off keeps k = 0) and before the weight
            # sync pushes the learner's next drafter (the verdict is on the version that served this rollout).
            self._respec_engine_metrics = check_drafters(self._respec_view.replicas)
        if self._respec is not None and self._respec.tuner.enabled:
            from respec_plugin.integrations.verl.tuner_replicas import update_tuners

            # The rollout is over: learn from it and install the next schedule (saved with this step's checkpoint).
            self._respec_engine_metrics.update(update_tuners(self._respec_view.replicas))
        return batch

    def _save_checkpoint(self):
        # respec's state goes in before verl marks the checkpoint as the latest one (at the end of its save): a run
        # killed at any moment resumes from a checkpoint that has all of it. The actor ranks save the learner's
        # inside verl's save.
        if self._respec is not None and self._respec.tuner.enabled:
            from respec_plugin.integrations.verl.tuner_replicas import save_tuners

            save_tuners(self._respec_view.replicas, self._respec_view.step_folder())
        super()._save_checkpoint()
        self._respec_saved_step = self.global_steps
        if self._respec is not None:
            for folder in prune_orphaned_state(self._respec_view.checkpoint_root):
                logger.info("respec: state removed from %s with the trainer's checkpoint there", folder)

    def on_step_end(self):
        super().on_step_end()  # verl syncs the actor into the engines here; the actor ranks push the drafter after it
        if self._respec_learner is not None:
            self._respec_learner_metrics.update(self._respec_learner.publication_metrics())

    def _compute_metrics(self, batch, metrics, timing_raw, global_steps, epoch):
        super()._compute_metrics(batch, metrics, timing_raw, global_steps, epoch)
        if self._respec is None:
            return
        metrics.update(self._respec_learner_metrics)
        self._respec_learner_metrics = {}
        import transfer_queue as tq

        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=["extra_fields"])
        extra_fields = data.pop("extra_fields").tolist()
        real = [not tag.get("is_padding", False) for tag in batch.tags]
        records = [RequestSpecStats.from_extra_fields(fields) for fields, keep in zip(extra_fields, real) if keep]
        metrics.update(aggregate_step_metrics(record for record in records if record is not None))
        metrics.update(self._respec_engine_metrics)
        self._respec_engine_metrics = {}
        view = self._respec_view
        self._respec_dashboard_steps[global_steps] = {k: float(metrics[k]) for k in DASHBOARD_KEYS if k in metrics}
        # Drawn at the last step and with every checkpoint (so a killed run has one too), not in on_train_end:
        # verl 0.9.1's fit returns after its last step without calling on_train_end.
        if view.saved_this_step or view.is_last_step:
            self._respec_draw_dashboard()
        if view.is_last_step and self._respec.uses_scheduler:
            from respec_plugin.integrations.verl.drafter_watchdog import close_controls

            close_controls(view.replicas)

    def _respec_draw_dashboard(self) -> None:
        """``<trainer.default_local_dir>/respec_dashboard.png`` of the steps seen; a failure to draw only warns."""
        trainer = self.config.trainer
        path = self._respec_view.checkpoint_root / DASHBOARD_FILE
        try:
            dashboard = draw_dashboard({trainer.experiment_name: self._respec_dashboard_steps}, path,
                                       title=f"{trainer.project_name}/{trainer.experiment_name}")
        except Exception:
            logger.warning("respec dashboard not drawn into %s", path, exc_info=True)
            return
        logger.info("respec dashboard: %s", dashboard.path)

    def _load_checkpoint(self):
        super()._load_checkpoint()  # sets global_steps to the restored step (0: none); the replicas exist already
        if self.global_steps < 1 or self._respec is None or not self._respec.tuner.enabled:
            return
        from respec_plugin.integrations.verl.tuner_replicas import load_tuners

        view = self._respec_view
        folder = restore_folder(view.resumed_folder(self.global_steps), self.global_steps, TUNER_STATE_FILE)
        if folder is None or not load_tuners(view.replicas, folder):
            logger.warning("respec tuner: no saved state in the checkpoints up to step %d; starting from the "
                           "default k", self.global_steps)


def hook_v1_trainers() -> None:
    """Wrap verl's registered v1 trainers now, or right after ``verl.trainer.ppo.v1`` is imported."""
    after_import(_V1_PACKAGE, _wrap_registered_trainers)


def _wrap_registered_trainers() -> None:
    from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY

    for mode, trainer_cls in list(TRAINER_REGISTRY.items()):
        if not issubclass(trainer_cls, ReSpecTrainerMixin):
            TRAINER_REGISTRY[mode] = type(f"ReSpec{trainer_cls.__name__}", (ReSpecTrainerMixin, trainer_cls),
                                          {"__module__": __name__, "__qualname__": f"ReSpec{trainer_cls.__qualname__}"})

"""Hooks into verl's v1 trainers: ``respec/*`` metrics every step when ``rollout.name=respec``.

verl picks its trainer class from ``TRAINER_REGISTRY[trainer.v1.trainer_mode]`` and only aggregates
speculation stats when MTP is on. So that users switch respec on with the rollout name alone, every registered
trainer is replaced by a subclass with :class:`ReSpecTrainerMixin` in front; the subclass behaves exactly like
verl's class unless the rollout is respec. The registry lives in ``verl.trainer.ppo.v1``, which is heavy and
imported late, so the wrapping runs right after that package is first imported, in whichever process.
A trainer registered after that import is not wrapped: put :class:`ReSpecTrainerMixin` in its bases.
"""

from __future__ import annotations

import functools
import logging

from respec_plugin import ROLLOUT_NAME
from respec_plugin.config import ReSpecConfig
from respec_plugin.import_hooks import after_import
from respec_plugin.report import DASHBOARD_KEYS, draw_dashboard
from respec_plugin.rollout.spec_stats import EXTRA_KEY, aggregate_step_metrics
from respec_plugin.verl_checkpoint import restore_folder, save_due, step_folder

logger = logging.getLogger(__name__)

_V1_PACKAGE = "verl.trainer.ppo.v1"
DASHBOARD_FILE = "respec_dashboard.png"  # in trainer.default_local_dir: at the last step and every checkpoint


class ReSpecTrainerMixin:
    """Adds the step's ``respec/*`` metrics, read from the rollouts' ``extra_fields`` in TransferQueue, and runs the
    online drafter learner (``respec.learner.enable``) after each step's actor update and weight sync (or alongside
    the update, ``learner.overlap``). At the last step and at every checkpoint it draws the run's respec dashboard
    (``respec_plugin.report``) into the checkpoint root."""

    _respec_learner = None  # respec_plugin.learner.trainer_hook.LearnerHook when the learner is on
    _respec_learner_metrics: dict = {}

    @functools.cached_property
    def _respec(self) -> ReSpecConfig | None:
        """The respec block, parsed once (``_load_checkpoint`` needs it before ``on_train_begin``); None when the
        rollout is not respec."""
        rollout = self.config.actor_rollout_ref.rollout
        return ReSpecConfig.from_rollout_config(rollout) if rollout.name == ROLLOUT_NAME else None

    def on_train_begin(self):
        super().on_train_begin()
        if self._respec is not None:
            self._respec_dashboard_steps: dict[int, dict[str, float]] = {}
            if self._respec.learner.enable:
                from respec_plugin.learner.trainer_hook import LearnerHook

                self._respec_learner = LearnerHook(self, self._respec)

    def step(self, metrics, timing_raw):
        self._respec_step_batch = super().step(metrics, timing_raw)
        return self._respec_step_batch

    def _update_actor(self, batch, metrics):
        if self._respec_learner is not None:
            self._respec_learner.before_actor_update(batch)  # overlapped mode: starts learning alongside the update
        return super()._update_actor(batch, metrics)

    def on_step_end(self):
        super().on_step_end()  # verl syncs the updated actor into the engines here (sync/colocate trainers)
        if self._respec_learner is not None:
            from verl.utils.debug import marked_timer

            with marked_timer("respec_learner", self.timing_raw):
                self._respec_learner_metrics = self._respec_learner.after_step(self._respec_step_batch)
            self._respec_learner.save_if_due()

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
        records = [fields.get(EXTRA_KEY) for fields, keep in zip(extra_fields, real) if keep and fields]
        metrics.update(aggregate_step_metrics(records))
        if self._respec.tuner.enabled:
            from respec_plugin.tuner.replicas import save_tuners, update_tuners

            replicas = self.llm_server_manager.get_replicas()
            metrics.update(update_tuners(replicas))
            # Saved after this step's update (verl saved its own state earlier in the step), so a resumed run
            # serves the schedule this run's next rollout would have served.
            if save_due(self):
                save_tuners(replicas, step_folder(self.config.trainer, global_steps))

        self._respec_dashboard_steps[global_steps] = {k: float(metrics[k]) for k in DASHBOARD_KEYS if k in metrics}
        # Drawn at the last step and with every checkpoint (so a killed run has one too), not in on_train_end:
        # verl 0.9.1's fit returns after its last step without calling on_train_end.
        if save_due(self) or global_steps >= self.total_training_steps:
            self._respec_draw_dashboard()

    def _respec_draw_dashboard(self) -> None:
        """``<trainer.default_local_dir>/respec_dashboard.png`` of the steps seen; a failure to draw only warns."""
        trainer = self.config.trainer
        try:
            dashboard = draw_dashboard({trainer.experiment_name: self._respec_dashboard_steps},
                                       f"{trainer.default_local_dir}/{DASHBOARD_FILE}",
                                       title=f"{trainer.project_name}/{trainer.experiment_name}")
        except Exception:
            logger.warning("respec dashboard not drawn into %s", trainer.default_local_dir, exc_info=True)
            return
        logger.info("respec dashboard: %s", dashboard.path)

    def _load_checkpoint(self):
        super()._load_checkpoint()  # sets global_steps to the restored step (0: none); the replicas exist already
        if self.global_steps < 1 or self._respec is None or not self._respec.tuner.enabled:
            return
        from respec_plugin.tuner.replicas import CHECKPOINT_FILE, load_tuners

        folder = restore_folder(self.config.trainer, self.global_steps, CHECKPOINT_FILE)
        if folder is None or not load_tuners(self.llm_server_manager.get_replicas(), folder):
            logger.warning("respec tuner: no saved state in the checkpoints up to step %d; starting from the "
                           "default k", self.global_steps)


def hook_v1_trainers() -> None:
    """Wrap verl's registered v1 trainers now, or right after ``verl.trainer.ppo.v1`` is imported."""
    after_import(_V1_PACKAGE, _wrap_registered_trainers)


def _wrap_registered_trainers() -> None:
    from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY

    for mode, trainer_cls in list(TRAINER_REGISTRY.items()):
        if not issubclass(trainer_cls, ReSpecTrainerMixin):
            TRAINER_REGISTRY[mode] = type(
                trainer_cls.__name__, (ReSpecTrainerMixin, trainer_cls), {"__module__": trainer_cls.__module__}
            )

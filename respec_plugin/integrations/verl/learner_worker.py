"""respec's actor worker: verl's hybrid ``ActorRolloutRefWorker`` plus the co-located drafter learner.

The learner lives where the actor lives, on every actor rank, data-parallel:
- ``compute_log_prob`` (verl's old-log-prob forward) keeps the drafter's features of the selected rows, on the rank
  that computed them (integrations/verl/feature_capture.py); there is no second actor forward;
- ``respec_train_drafter`` (after the actor update) trains a candidate drafter on them, gradients all-reduced over
  the actor's ranks, and checks it on the held-out prompt groups; with ``learner.overlap`` (the default) it keeps
  them, and the training runs during the next rollout, while the actor ranks are idle;
- ``update_weights`` (verl's weight sync) pushes the candidate after the actor's weights, from each rank to its
  co-located vLLM worker, and re-pushes the serving drafter after every wake from sleep;
- ``save_checkpoint`` / ``load_checkpoint`` keep the learner in ``global_step_<n>/respec_learner``, written before
  verl marks the checkpoint as the latest one.
The trainer mixin installs this class in place of verl's only when ``respec.learner.enable``. A failing learner
step (an exception, a non-finite loss, running out of memory) is caught here: the serving drafter stays, the failure
is logged and counted, and the RL step goes on.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import torch

from verl.single_controller.base.decorator import Dispatch, make_nd_compute_dataproto_dispatch_fn, register
from verl.utils import tensordict_utils as tu
from verl.utils.device import get_device_id, get_device_name
from verl.workers.engine_workers import ActorRolloutRefWorker

from respec_plugin.core.checkpoint_files import LEARNER_STATE_DIR, restore_folder, written_atomically
from respec_plugin.core.config import ReSpecConfig
from respec_plugin.core.drafter.io import load_drafter
from respec_plugin.core.learner.loop import OnlineLearner
from respec_plugin.core.learner.session import LearnerSession
from respec_plugin.integrations.verl.feature_capture import ActorForwardCapture, CaptureSpec, row_slots

logger = logging.getLogger(__name__)


class ReSpecActorRolloutRefWorker(ActorRolloutRefWorker):
    """verl's actor / rollout / ref worker with respec's drafter learner on its actor ranks."""

    respec_session: LearnerSession | None = None
    _respec_capture: ActorForwardCapture | None = None
    _respec_overlap = False

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def init_model(self):
        super().init_model()
        if not self._is_actor:
            return
        respec = ReSpecConfig.from_rollout_config(self.config.rollout)
        device = torch.device("cpu") if get_device_name() == "cpu" else torch.device(get_device_name(), get_device_id())
        # The actor's depth resolves vLLM's default aux layers for a drafter that sets none (e.g. the EAGLE authors').
        actor_layers = self.actor.model_config.hf_config.num_hidden_layers
        drafter, version = load_drafter(respec.drafter_path, actor_layers)
        drafter = drafter.to(device)
        initial = (load_drafter(respec.drafter_path, actor_layers)[0].to(device) if respec.learner.compare_with_initial
                   else None)
        # The learner's own collectives: a group of the actor's ranks, apart from the one the actor trains with.
        group = torch.distributed.new_group() if torch.distributed.get_world_size() > 1 else None
        rank = torch.distributed.get_rank()
        learner = OnlineLearner(respec.learner, drafter, serving_version=version, seed=self.config.actor.get(
            "data_loader_seed", 0) + rank, initial=initial, process_group=group)
        self.respec_session = LearnerSession(learner, record_dir=respec.learner.record_dir, rank=rank)
        self._respec_overlap = respec.learner.overlap
        self._respec_capture = ActorForwardCapture(self.actor.engine.module, CaptureSpec(
            aux_layer_ids=drafter.config.eagle_aux_hidden_state_layer_ids,
            draft_token_ids=drafter.draft_token_ids.cpu(), top_k=respec.learner.top_k,
            context_tokens=respec.learner.context_tokens))
        if self._is_rollout:
            self.rollout.drafter_from_learner = True

    @register(dispatch_mode=make_nd_compute_dataproto_dispatch_fn(mesh_name="actor"))
    def compute_log_prob(self, data):
        if self.respec_session is None:
            return super().compute_log_prob(data)
        self.respec_session.join()  # learner.overlap: the training that ran during the rollout
        with self._capturing():
            return super().compute_log_prob(data)

    @contextlib.contextmanager
    def _capturing(self) -> Iterator[None]:
        """Wrap the engine's ``forward_step`` for one ``compute_log_prob``: each micro-batch's selected rows go to
        the learner session. A capture that fails only costs the learner this step's features."""
        engine = self.actor.engine
        stock_forward_step = engine.forward_step
        capture, session = self._respec_capture, self.respec_session
        session.begin_capture()
        lm_head_rows = None
        if getattr(engine.engine_config, "use_fused_kernels", False):
            lm_head_rows = _full_rows(capture.model.get_output_embeddings().weight, capture.spec.draft_token_ids)

        def forward_step(micro_batch, loss_function, forward_only):
            packed = bool(tu.get_non_tensor_data(data=micro_batch, key="use_remove_padding", default=True))
            try:
                slots = row_slots(micro_batch, packed)
            except Exception:  # noqa: BLE001 -- the actor's forward must go on whatever the learner needs
                logger.exception("respec learner: could not read the micro-batch's rows; no features this step")
                session.capture_failed()
                slots = []
            if not slots:
                return stock_forward_step(micro_batch, loss_function, forward_only)
            with capture.rows(slots, packed) as captured:
                output = stock_forward_step(micro_batch, loss_function, forward_only)
            session.add_captured(captured)
            return output

        engine.forward_step = forward_step
        try:
            with capture.installed(lm_head_rows):
                yield
        finally:
            del engine.forward_step

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def respec_train_drafter(self, row_weights: dict[int, float], step: int) -> dict[str, float]:
        """Train a candidate drafter on the features this rank kept in the step's old-log-prob forward, with the
        trajectory weights the driver computed (row id -> weight); every actor rank takes part. Returns the
        candidate's ``respec/learner/*`` metrics; never raises. With ``learner.overlap`` it only keeps them: the
        training runs during the next rollout."""
        return self.respec_session.train(row_weights, step, overlap=self._respec_overlap)

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def respec_learner_status(self) -> dict[str, float]:
        """The step's publication metrics (after verl's weight sync pushed the candidate)."""
        return self.respec_session.status()

    @register(dispatch_mode=Dispatch.ONE_TO_ALL, blocking=False)
    async def update_weights(self, global_steps: int = None, mode: str = "auto"):
        result = await super().update_weights(global_steps=global_steps, mode=mode)
        if self.respec_session is not None and self._is_rollout:
            # verl's sleep (free_cache_engine) discards the engine's drafter too: push the serving one again.
            await self.respec_session.publish(self.rollout, resync=bool(self.config.rollout.free_cache_engine))
        return result

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def save_checkpoint(self, local_path, hdfs_path=None, global_step=0, max_ckpt_to_keep=None):
        super().save_checkpoint(local_path, hdfs_path, global_step, max_ckpt_to_keep)
        if self.respec_session is not None and torch.distributed.get_rank() == 0:
            with written_atomically(Path(local_path).parent / LEARNER_STATE_DIR) as partial:
                partial.mkdir(parents=True)
                self.respec_session.save(partial)

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def load_checkpoint(self, local_path, hdfs_path=None, del_local_after_load=False):
        super().load_checkpoint(local_path, hdfs_path, del_local_after_load)
        if self.respec_session is None:
            return
        step_dir = Path(local_path).parent
        step = step_dir.name.removeprefix("global_step_")
        folder = restore_folder(step_dir, int(step) if step.isdigit() else 0, LEARNER_STATE_DIR)
        if folder is None:
            logger.warning("respec learner: %s has no %s; the learner starts from drafter_path", step_dir,
                           LEARNER_STATE_DIR)
            return
        self.respec_session.restore(folder / LEARNER_STATE_DIR)
        logger.info("respec learner restored from %s: drafter v%d", folder / LEARNER_STATE_DIR,
                    self.respec_session.learner.serving_version)


def _full_rows(weight: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows of a (possibly FSDP-sharded) weight, whole on this rank: every rank must call it, it may all-gather."""
    full = weight.full_tensor() if hasattr(weight, "full_tensor") else weight
    return full[rows.to(full.device)].detach()


def install_worker(role_worker_mapping: dict) -> None:
    """Put respec's actor worker in place of verl's ``ActorRolloutRefWorker`` (the v1 trainer hard-codes
    ``ray.remote(ActorRolloutRefWorker)`` for the actor roles in ``PPOTrainer._init_resource_pool_mgr``)."""
    import ray

    for role, worker in list(role_worker_mapping.items()):
        if getattr(worker, "__ray_actor_class__", None) is ActorRolloutRefWorker:
            role_worker_mapping[role] = ray.remote(ReSpecActorRolloutRefWorker)

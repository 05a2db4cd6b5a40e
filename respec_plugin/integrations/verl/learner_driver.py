"""The online learner's driver side: which of the step's trajectories the actor ranks keep, their trajectory weights,
and the calls that make the ranks train and report. The drafter, its optimizer and its features never leave the
actor ranks (respec_plugin/integrations/verl/learner_worker.py); the driver sends row ids and weights and receives
metrics, and counts the bytes it receives (``respec/learner/driver_received_bytes``) so that stays checkable.
"""

from __future__ import annotations

import json
import logging
import pickle
import random
import time
from pathlib import Path

import torch

from respec_plugin.core.config import CONFIG_PREFIX, LearnerConfig, ReSpecConfigError
from respec_plugin.core.learner.losses import trajectory_weights
from respec_plugin.core.learner.selection import NOT_SELECTED, select_rows
from respec_plugin.integrations.verl.feature_capture import ROW_FIELD, SELECT_FIELD
from respec_plugin.integrations.verl.trainer_view import TrainerView

logger = logging.getLogger(__name__)

METRIC_PREFIX = "respec/learner/"
# ``learner.record_dir``: beside the actor ranks' features of each step, the kept rows' rewards and advantages.
REWARDS_FILE = "step_{step:04d}_rewards.json"


def check_supported(config) -> None:
    """Refuse, at start-up, the verl configurations the co-located learner cannot capture features from."""
    actor = config.actor_rollout_ref.actor
    if actor.get("ulysses_sequence_parallel_size", 1) > 1:
        raise ReSpecConfigError(
            f"{CONFIG_PREFIX}.learner.enable=True with actor_rollout_ref.actor.ulysses_sequence_parallel_size="
            f"{actor.ulysses_sequence_parallel_size}: the learner reads hidden states that Ulysses splits across "
            "ranks. Set the sequence-parallel size to 1 or switch the learner off.")
    if actor.strategy not in ("fsdp", "fsdp2"):
        raise ReSpecConfigError(
            f"{CONFIG_PREFIX}.learner.enable=True with actor_rollout_ref.actor.strategy={actor.strategy!r}: the learner "
            "captures features in verl's FSDP engine only (Megatron splits layers across pipeline stages). Use fsdp or "
            "fsdp2, or switch the learner off.")
    mode = config.trainer.get("v1", {}).get("trainer_mode", "sync")
    if mode != "sync":
        raise ReSpecConfigError(
            f"{CONFIG_PREFIX}.learner.enable=True with trainer.v1.trainer_mode={mode!r}: the learner publishes its "
            "drafter in the colocated weight sync of the sync trainer. Use trainer_mode=sync or switch the learner "
            "off.")


def _received(results) -> int:
    """Bytes the driver received from the workers for ``results``."""
    return len(pickle.dumps(results))


class LearnerDriver:
    """Per step: :meth:`select_rows` before the old-log-prob forward, :meth:`train` after the actor update,
    :meth:`publication_metrics` after the weight sync."""

    def __init__(self, trainer: TrainerView, config: LearnerConfig):
        self.trainer = trainer
        self.config = config
        self._rng = random.Random(trainer.seed)
        self._selected: dict[str, int] = {}  # this step's selected keys -> row id
        self._received_bytes = 0
        self._extra_forward_rows = 0  # rows of the learner's own forward this step (bypass mode only)
        self._train_call_s = 0.0

    def _due(self) -> bool:
        return self.trainer.global_step % self.config.every_n_steps == 0

    def select_rows(self, batch) -> dict[str, int]:
        """Write ``respec_row`` / ``respec_select`` for the step's rows into TransferQueue (the actor ranks keep the
        selected rows' features in the old-log-prob forward); returns the selected keys' row ids."""
        import transfer_queue as tq
        from tensordict import TensorDict

        padding = [tag.get("is_padding", False) for tag in batch.tags]
        if self._due():
            choice = select_rows([key.split("_", 1)[0] for key in batch.keys], [tag.get("seq_len", 0) for tag in
                                 batch.tags], padding, max_tokens=self.config.max_tokens_per_step,
                                 holdout_fraction=self.config.holdout_fraction, rng=self._rng)
        else:
            choice = [NOT_SELECTED] * len(batch.keys)
        fields = TensorDict({ROW_FIELD: torch.arange(len(batch.keys)), SELECT_FIELD: torch.tensor(choice)},
                            batch_size=[len(batch.keys)])
        tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id, fields=fields)
        self._selected = {key: row for row, (key, c) in enumerate(zip(batch.keys, choice)) if c != NOT_SELECTED}
        self._extra_forward_rows = 0
        self._train_call_s = 0.0
        return self._selected

    def forward_selected_rows(self, batch, config) -> None:
        """Where verl runs no old-log-prob forward (``algorithm.rollout_correction.bypass_mode``): one forward of the
        actor over the selected rows (topped up with unselected ones to fill whole micro-batches on every rank), in
        which the actor ranks keep the features; verl's own fields are not touched."""
        if not self._selected:
            return
        rollout = config.actor_rollout_ref.rollout
        ranks = self.trainer.actor_worker_group.world_size
        micro = 1 if rollout.log_prob_use_dynamic_bsz else rollout.log_prob_micro_batch_size_per_gpu
        multiple = ranks * micro
        keys = list(self._selected)
        others = [k for k, tag in zip(batch.keys, batch.tags) if k not in self._selected and not tag.get("is_padding")]
        size = min(len(batch.keys), -(-len(keys) // multiple) * multiple)
        keys += others[: size - len(keys)]
        if len(keys) % multiple:
            keys = list(batch.keys)  # the whole step: its size already divides over verl's micro-batches
        rows = batch.select_keys(keys)
        rows.extra_info.update({"calculate_entropy": False, "compute_loss": False, "temperature": rollout.temperature})
        self.trainer.actor_worker_group.compute_log_prob(rows)
        self._extra_forward_rows = len(keys)

    def train(self, batch) -> dict[str, float]:
        """After the actor update: the selected rows' trajectory weights go to every actor rank, which trains a
        candidate drafter on the features it kept. Returns the candidate's metrics (from rank 0)."""
        if not self._due() or not self._selected:
            return {}
        import transfer_queue as tq

        start = time.perf_counter()
        keys = list(self._selected)
        data = tq.kv_batch_get(keys=keys, partition_id=batch.partition_id, select_fields=["rm_scores", "advantages"])
        rewards = torch.tensor([float(row.float().sum()) for row in data["rm_scores"].unbind()])
        advantages = torch.tensor([float(row.float()[0]) if row.numel() else 0.0 for row in data["advantages"].unbind()])
        weights = trajectory_weights(rewards, advantages, self.config.reward_weighting, self.config.weight_floor)
        row_weights = {self._selected[key]: float(w) for key, w in zip(keys, weights)}
        if self.config.record_dir:
            path = Path(self.config.record_dir) / REWARDS_FILE.format(step=self.trainer.global_step)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({self._selected[key]: {"reward": float(r), "advantage": float(a)}
                                        for key, r, a in zip(keys, rewards, advantages)}))
        results = self.trainer.actor_worker_group.respec_train_drafter(row_weights=row_weights,
                                                                         step=self.trainer.global_step)
        self._received_bytes = _received(results)
        self._train_call_s = time.perf_counter() - start
        metrics = dict(results[0])
        metrics[METRIC_PREFIX + "extra_forward_rows"] = float(self._extra_forward_rows)
        return metrics

    def publication_metrics(self) -> dict[str, float]:
        """After verl's weight sync (which pushed the candidate): versions, counters, and the replicas serving it."""
        if not self._due() or not self._selected:
            return {}
        results = self.trainer.actor_worker_group.respec_learner_status()
        self._received_bytes += _received(results)
        metrics = dict(results[0])
        # What the RL step waited for: the training call (the training itself unless it overlaps the rollout), the
        # wait for an overlapped training before the old-log-prob forward, and the push in the weight sync.
        metrics[METRIC_PREFIX + "blocking_s"] = (self._train_call_s + metrics[METRIC_PREFIX + "wait_s"]
                                                 + metrics[METRIC_PREFIX + "publish_s"])
        published = metrics.get(METRIC_PREFIX + "published_version")
        engine_versions = [r[METRIC_PREFIX + "engine_version"] for r in results]
        if published is not None:
            metrics[METRIC_PREFIX + "ranks_serving_published"] = float(sum(v == published for v in engine_versions))
        metrics[METRIC_PREFIX + "driver_received_bytes"] = float(self._received_bytes)
        return metrics

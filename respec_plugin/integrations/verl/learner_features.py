"""Target features of one RL step: the step's trajectories (from verl's TransferQueue) and, from a no-grad forward of
the actor, its hidden states at the EAGLE-3 layers and top-k next-token probabilities.

Which actor weights: the *updated* actor's, fetched after verl's actor update and weight sync. The drafter trained
now serves the next rollout, which the updated actor verifies, so its distribution is the target; the step's
trajectories serve as contexts. (``learner.overlap`` trades that for time: the actor that generated the step,
fetched before the update, while the update runs.) How: verl 0.9.1's v1 trainer keeps the actor in its FSDP
workers; the driver (the TaskRunner) asks every worker, through Ray's ``__ray_call__``, for the full HF-named
tensors the worker already produces for the vLLM weight sync (``engine.get_per_tensor_param``), and loads them into
an HF copy of the actor kept on the driver's CPU. That needs no change to verl and no extra GPU memory; it costs one
actor-sized copy per step and a forward on CPU, fine for the lab's actor (a real-size actor would reuse verl's
old-log-prob forward).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from respec_plugin.core.drafter.warmup import actor_features
from respec_plugin.core.drafter.eagle3 import Eagle3Drafter
from respec_plugin.core.learner.buffer import SequenceFeatures
from respec_plugin.core.learner.losses import topk_target, trajectory_weights

# TransferQueue fields the learner reads (present once verl computed rewards and advantages).
TRAJECTORY_FIELDS = ["prompts", "responses", "response_mask", "advantages", "rm_scores"]


@dataclass(frozen=True)
class Trajectories:
    """One step's rollouts: prompt + response token ids per sequence, the response mask over the response, the
    sequence reward (sum of its token scores) and its advantage (GRPO: the same for every token)."""

    token_ids: list[torch.Tensor]
    prompt_lengths: list[int]
    response_masks: list[torch.Tensor]
    rewards: torch.Tensor
    advantages: torch.Tensor


def trajectories_from_transfer_queue(batch) -> Trajectories:
    """The non-padding rows of verl's ``KVBatchMeta`` ``batch``, read from TransferQueue (driver side)."""
    import transfer_queue as tq

    data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=TRAJECTORY_FIELDS)
    return trajectories_from_fields(data, keep=[not tag.get("is_padding", False) for tag in batch.tags])


def trajectories_from_fields(data, keep: list[bool]) -> Trajectories:
    """The rows of a TransferQueue TensorDict (``TRAJECTORY_FIELDS``, per-row tensors or jagged nested tensors,
    as verl's agent loop and advantage step write them) whose ``keep`` is True."""
    columns = {name: [row for row, k in zip(data[name].unbind(), keep) if k] for name in TRAJECTORY_FIELDS}
    token_ids, prompt_lengths, response_masks, rewards, advantages = [], [], [], [], []
    for prompt, response, mask, advantage, scores in zip(*(columns[name] for name in TRAJECTORY_FIELDS)):
        token_ids.append(torch.cat([prompt.long(), response.long()]))
        prompt_lengths.append(prompt.numel())
        response_masks.append(mask.float())
        rewards.append(float(scores.float().sum()))
        advantages.append(float(advantage.float()[0]) if advantage.numel() else 0.0)
    return Trajectories(token_ids, prompt_lengths, response_masks, torch.tensor(rewards), torch.tensor(advantages))


def record_step(directory: str | Path, step: int, actor_state: dict[str, torch.Tensor],
                trajectories: Trajectories) -> Path:
    """Writes ``step_<step>.pt`` (``learner.record_dir``): the step's trajectories and the actor weights the learner
    distilled on them, which :func:`read_step` reads back for offline learner comparisons."""
    path = Path(directory) / f"step_{step:04d}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"step": step, "actor": actor_state, "trajectories": asdict(trajectories)}, path)
    return path


def read_step(path: str | Path) -> tuple[int, dict[str, torch.Tensor], Trajectories]:
    """(step, actor state dict, trajectories) of a file written by :func:`record_step`."""
    record = torch.load(path, weights_only=True)
    return record["step"], record["actor"], Trajectories(**record["trajectories"])


def _actor_state_dict_on_worker(worker) -> dict[str, torch.Tensor] | None:
    """Runs inside an actor worker (Ray actor; verl may fuse roles into a ``WorkerDict``): the full HF-named actor
    tensors, on CPU, from rank 0 (every rank must run it: gathering FSDP shards is a collective)."""
    candidates = list(getattr(worker, "worker_dict", {}).values()) or [worker]
    for candidate in candidates:
        engine = getattr(getattr(candidate, "actor", None), "engine", None)
        if engine is not None and hasattr(engine, "get_per_tensor_param"):
            params, _ = engine.get_per_tensor_param()
            tensors = {name: tensor.detach().to("cpu", copy=True) for name, tensor in params}
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            return tensors if rank == 0 else None
    raise RuntimeError("respec learner: no actor engine with get_per_tensor_param found in the actor worker")


def fetch_actor_state_dict(actor_workers) -> dict[str, torch.Tensor]:
    """The current actor weights (HF names) from verl's actor workers (one Ray handle per rank), on the driver."""
    import ray

    results = ray.get([w.__ray_call__.remote(_actor_state_dict_on_worker) for w in actor_workers])
    return next(r for r in results if r is not None)


class ActorMirror:
    """An HF copy of the actor on the driver's CPU, refreshed from the workers' weights before each use."""

    def __init__(self, model_path: str):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()

    def load(self, state_dict: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.model.load_state_dict(
            {name: tensor.float() for name, tensor in state_dict.items()}, strict=False
        )
        tied = {"lm_head.weight"} if self.model.config.tie_word_embeddings else set()
        if set(missing) - tied or unexpected:
            raise RuntimeError(f"actor weights do not fit the HF actor: missing {missing}, unexpected {unexpected}")


def step_features(
    actor, drafter: Eagle3Drafter, trajectories: Trajectories, *, top_k: int, reward_weighting: str,
    weight_floor: float, chunk_size: int = 16,
) -> list[SequenceFeatures]:
    """Per sequence: aux hidden states, the actor's top-k next-token probabilities over the draft vocabulary, a
    response mask over the whole sequence and the trajectory weight (reward, advantage or uniform)."""
    weights = trajectory_weights(trajectories.rewards, trajectories.advantages, reward_weighting, weight_floor)
    sequences: list[SequenceFeatures] = []
    targets = _actor_targets(actor, drafter, trajectories.token_ids, top_k, chunk_size)
    for index, (token_ids, (aux, probs, ids)) in enumerate(zip(trajectories.token_ids, targets)):
        length, prompt_length = token_ids.numel(), trajectories.prompt_lengths[index]
        loss_mask = torch.zeros(length)
        loss_mask[prompt_length:] = trajectories.response_masks[index][: length - prompt_length]
        sequences.append(SequenceFeatures(token_ids=token_ids, loss_mask=loss_mask, aux_hidden_states=aux,
                                          target_probs=probs, target_ids=ids, weight=float(weights[index])))
    return sequences


def refreshed_features(
    actor, drafter: Eagle3Drafter, sequences: list[SequenceFeatures], *, top_k: int, chunk_size: int = 16,
) -> list[SequenceFeatures]:
    """The same sequences (tokens, masks, weights) with hidden states and targets from ``actor`` as it is now:
    replayed trajectories then teach the drafter the actor that will verify its next drafts, not an older one."""
    targets = _actor_targets(actor, drafter, [s.token_ids for s in sequences], top_k, chunk_size)
    return [
        replace(sequence, aux_hidden_states=aux, target_probs=probs, target_ids=ids)
        for sequence, (aux, probs, ids) in zip(sequences, targets)
    ]


@torch.no_grad()
def _actor_targets(
    actor, drafter: Eagle3Drafter, token_ids: list[torch.Tensor], top_k: int, chunk_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(aux hidden states [L, num_aux * H], top-k probs [L, k], top-k draft ids [L, k]) per sequence, from no-grad
    actor forwards over right-padded chunks of ``chunk_size`` sequences."""
    for start in range(0, len(token_ids), chunk_size):
        rows = token_ids[start : start + chunk_size]
        lengths = [row.numel() for row in rows]
        input_ids = torch.zeros(len(rows), max(lengths), dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for i, row in enumerate(rows):
            input_ids[i, : row.numel()] = row
            attention_mask[i, : row.numel()] = 1
        features = actor_features(actor, input_ids, attention_mask, drafter)
        target = topk_target(features.draft_logprobs, top_k)
        for i, length in enumerate(lengths):
            yield (features.aux_hidden_states[i, :length].clone(), target.probs[i, :length].clone(),
                   target.ids[i, :length].clone())

"""The drafter's training features, taken from the actor forward verl already runs for the old log-probs.

Inside ``compute_log_prob`` verl's FSDP engine runs the HF actor once per micro-batch (``forward_step``). While
respec's worker wraps that call, hooks on the actor's modules keep, for the micro-batch's *selected* rows only:
- the EAGLE-3 aux hidden states: the input of decoder layer ``i`` for each aux id ``i`` (vLLM's convention: aux id
  ``i`` is the residual stream entering layer ``i``, HF's ``hidden_states[i]``);
- the embedding output, so the drafter needs no copy of the actor's embedding table;
- the teacher: the actor's next-token distribution at the rollout temperature, over the draft vocabulary, truncated
  to its top k. It comes from the logits the forward computes, or, where verl's fused kernels compute no logits,
  from the final-norm hidden state times the LM head's draft-vocabulary rows.
verl's micro-batches are padded (``[B, T, H]``, right-padded) or packed (``[1, nnz, H]``, split by the nested
``input_ids`` offsets); rows are identified by the per-row ``respec_row`` field the driver wrote into TransferQueue,
which travels with the row through verl's (dynamic-batch) reordering, and ``respec_select`` says which rows the
learner keeps (0: not selected, 1: training, 2: held out).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from respec_plugin.core.learner.buffer import SequenceFeatures, response_window
from respec_plugin.core.learner.losses import topk_target

# Per-row TransferQueue fields the driver writes before the old-log-prob forward.
ROW_FIELD = "respec_row"
SELECT_FIELD = "respec_select"
NOT_SELECTED, TRAINING, HELD_OUT = 0, 1, 2


@dataclass(frozen=True)
class CaptureSpec:
    """What to capture: the drafter's aux layer ids, its draft vocabulary (target ids), the teacher's top k, and the
    prompt tokens kept before each response (``learner.context_tokens``)."""

    aux_layer_ids: tuple[int, ...]
    draft_token_ids: torch.Tensor
    top_k: int
    context_tokens: int


@dataclass(frozen=True)
class RowSlot:
    """Where one selected row sits in the forward's tensors: row ``index`` of a padded batch, or tokens
    ``start .. start + length`` of the packed one."""

    row: int
    held_out: bool
    index: int
    start: int
    length: int
    temperature: float
    token_ids: torch.Tensor
    loss_mask: torch.Tensor


@dataclass
class _Pending:
    """Tensors the hooks took from one forward, per selected row."""

    aux: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    embeds: list[torch.Tensor] = field(default_factory=list)
    final_hidden: list[torch.Tensor] = field(default_factory=list)
    targets: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)


def unwrap_model(module: torch.nn.Module) -> torch.nn.Module:
    """The HF model inside FSDP1 / DDP-style wrappers (FSDP2 shards in place and needs none)."""
    while hasattr(module, "module") and isinstance(getattr(module, "module"), torch.nn.Module):
        module = module.module
    return module


def row_slots(micro_batch, packed: bool) -> list[RowSlot]:
    """The selected rows of one verl micro-batch (a TensorDict with nested ``input_ids`` and ``loss_mask``, the
    response-length mask verl trains on, and the respec row fields)."""
    if SELECT_FIELD not in micro_batch.keys():
        return []
    select = micro_batch[SELECT_FIELD].reshape(-1).tolist()
    rows = micro_batch[ROW_FIELD].reshape(-1).tolist()
    input_ids = micro_batch["input_ids"]
    offsets = input_ids.offsets().tolist()
    temperature = micro_batch["temperature"]
    slots = []
    for index, (row, chosen) in enumerate(zip(rows, select)):
        if chosen == NOT_SELECTED:
            continue
        token_ids = input_ids[index].detach().cpu()
        response_mask = micro_batch["loss_mask"][index].detach().float().cpu()
        loss_mask = torch.zeros(token_ids.numel())
        loss_mask[token_ids.numel() - response_mask.numel():] = response_mask
        row_temperature = (float(temperature.reshape(-1)[index]) if isinstance(temperature, torch.Tensor)
                           and temperature.numel() > 1 else float(temperature))
        slots.append(RowSlot(row=int(row), held_out=chosen == HELD_OUT, index=index,
                             start=offsets[index] if packed else 0, length=offsets[index + 1] - offsets[index],
                             temperature=row_temperature, token_ids=token_ids, loss_mask=loss_mask))
    return slots


class ActorForwardCapture:
    """Hooks on an HF causal LM that keep the drafter's features of the selected rows of each forward.

    Use :meth:`rows` around one forward of a micro-batch; the hooks act only inside it, so verl's other forwards
    (the actor update, reference log-probs) pass untouched.
    """

    def __init__(self, model: torch.nn.Module, spec: CaptureSpec):
        self.model = unwrap_model(model)
        self.spec = spec
        decoder = self.model.get_decoder()
        self._layers = decoder.layers
        num_layers = len(self._layers)
        if not spec.aux_layer_ids or max(spec.aux_layer_ids) >= num_layers or min(spec.aux_layer_ids) < 0:
            raise ValueError(f"aux layer ids {spec.aux_layer_ids} do not fit an actor of {num_layers} layers")
        self._embed = decoder.embed_tokens
        self._norm = decoder.norm
        self._slots: list[RowSlot] = []
        self._packed = False
        self._pending: _Pending | None = None
        self._lm_head_rows: torch.Tensor | None = None

    @contextlib.contextmanager
    def installed(self, lm_head_rows: torch.Tensor | None = None) -> Iterator["ActorForwardCapture"]:
        """Hooks in place for the duration of one ``compute_log_prob``. ``lm_head_rows`` [draft_vocab, H] are the LM
        head's draft-vocabulary rows, needed only where the forward computes no logits (fused kernels)."""
        self._lm_head_rows = lm_head_rows
        handles = [layer.register_forward_pre_hook(self._aux_hook(i), with_kwargs=True)
                   for i, layer in enumerate(self._layers) if i in self.spec.aux_layer_ids]
        handles.append(self._embed.register_forward_hook(self._embed_hook))
        handles.append(self._norm.register_forward_hook(self._norm_hook))
        handles.append(self.model.register_forward_hook(self._logits_hook))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
            self._lm_head_rows = None

    @contextlib.contextmanager
    def rows(self, slots: Sequence[RowSlot], packed: bool) -> Iterator[list[SequenceFeatures]]:
        """Capture ``slots`` during the forward run inside the block; the yielded list fills when it ends."""
        captured: list[SequenceFeatures] = []
        self._slots, self._packed, self._pending = list(slots), packed, _Pending()
        try:
            yield captured
            if self._slots:
                captured.extend(self._assemble())
        finally:
            self._slots, self._pending = [], None

    # ----- hooks ----------------------------------------------------------------------------------------------

    def _take(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Each selected row's positions of a [B, T, ...] (padded) or [1, nnz, ...] (packed) tensor, detached."""
        if self._packed:
            flat = tensor.reshape(-1, *tensor.shape[2:]) if tensor.dim() >= 3 else tensor.reshape(-1)
            return [flat[s.start:s.start + s.length].detach() for s in self._slots]
        return [tensor[s.index, :s.length].detach() for s in self._slots]

    def _aux_hook(self, layer_id: int):
        def hook(module, args, kwargs):
            if self._pending is not None and self._slots:
                hidden = args[0] if args else kwargs["hidden_states"]
                self._pending.aux[layer_id] = self._take(hidden)
        return hook

    def _embed_hook(self, module, args, output):
        if self._pending is not None and self._slots:
            self._pending.embeds = self._take(output)

    def _norm_hook(self, module, args, output):
        if self._pending is not None and self._slots and self._lm_head_rows is not None:
            self._pending.final_hidden = self._take(output)

    def _logits_hook(self, module, args, output):
        if self._pending is None or not self._slots:
            return
        logits = getattr(output, "logits", None)
        if logits is None:  # fused kernels: no logits, the final-norm state times the LM head's draft rows instead
            if self._lm_head_rows is None:
                raise RuntimeError("the actor forward computed no logits and no LM-head rows were given")
            per_row = [hidden.float() @ self._lm_head_rows.float().T for hidden in self._pending.final_hidden]
        else:
            draft_ids = self.spec.draft_token_ids.to(logits.device)
            per_row = [row[:, draft_ids] for row in self._take(logits)]
        for slot, row_logits in zip(self._slots, per_row):
            logprobs = (row_logits.float() / slot.temperature).log_softmax(-1)
            target = topk_target(logprobs, self.spec.top_k)
            self._pending.targets.append((target.probs, target.ids))

    def _assemble(self) -> list[SequenceFeatures]:
        pending = self._pending
        missing = [i for i in self.spec.aux_layer_ids if i not in pending.aux]
        if missing or not pending.embeds or len(pending.targets) != len(self._slots):
            raise RuntimeError(f"the actor forward did not reach every hook (aux layers missing: {missing}, "
                               f"embeddings: {bool(pending.embeds)}, targets: {len(pending.targets)})")
        rows = []
        for i, slot in enumerate(self._slots):
            kept = response_window(slot.loss_mask, self.spec.context_tokens)
            aux = torch.cat([pending.aux[layer][i][kept] for layer in self.spec.aux_layer_ids], dim=-1)
            probs, ids = pending.targets[i]
            # Kept in host memory until trained on: the device's memory belongs to vLLM during the rollout. Copies,
            # also on a CPU device: a view would keep its whole micro-batch's tensor alive.
            rows.append(SequenceFeatures(token_ids=slot.token_ids[kept], loss_mask=slot.loss_mask[kept],
                                         input_embeds=_host_copy(pending.embeds[i][kept]), aux_hidden_states=aux.cpu(),
                                         target_probs=_host_copy(probs[kept]), target_ids=_host_copy(ids[kept]),
                                         row=slot.row, held_out=slot.held_out))
        return rows


def _host_copy(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to("cpu", copy=True)

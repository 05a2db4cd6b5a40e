"""Speculative-decoding statistics: per request on the server, aggregated to ``respec/*`` metrics per step.

vLLM reports per-request stats when ``per_request_spec_decode_metrics="detailed"``: one (drafted, accepted) pair per
verify step on ``CompletionOutput.spec_decode_metrics``. The server summarises them in a :class:`RequestSpecStats` and
writes it into ``TokenOutput.extra_fields`` twice over: whole under ``"respec"``, and as the three counts verl's own
rollouts report (``spec_num_*``), which verl's multi-turn agent loop sums over the turns of a trajectory (it keeps only
the first turn's other fields). The trainer parses each trajectory's fields back once, with
:meth:`RequestSpecStats.from_extra_fields`, and aggregates them here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

# The key of respec's whole record in TokenOutput.extra_fields, and verl's per-request speculation counts.
EXTRA_KEY = "respec"
VERL_DRAFT_TOKENS = "spec_num_draft_tokens"
VERL_ACCEPTED_TOKENS = "spec_num_accepted_tokens"
VERL_VERIFY_STEPS = "spec_num_verify_steps"


@dataclass(frozen=True)
class RequestSpecStats:
    """One request's speculation record (a multi-turn trajectory: its counts over every turn, the rest from its
    first turn)."""

    num_output_tokens: int
    num_verify_steps: int
    num_draft_tokens: int
    num_accepted_tokens: int
    # drafted_per_pos[i] / accepted_per_pos[i]: verify steps that drafted / accepted a token at position i.
    drafted_per_pos: tuple[int, ...]
    accepted_per_pos: tuple[int, ...]
    num_speculative_tokens: int
    drafter_version: int
    start_time: float
    end_time: float

    @classmethod
    def from_vllm(
        cls,
        per_step_drafted: Sequence[int],
        per_step_accepted: Sequence[int],
        *,
        num_output_tokens: int,
        num_speculative_tokens: int,
        drafter_version: int,
        start_time: float,
        end_time: float,
    ) -> "RequestSpecStats":
        """Summarise one request from vLLM's per-verify-step drafted/accepted counts.

        A verify step that drafted d tokens and accepted a of them accepted positions 0..a-1 and drafted 0..d-1
        (acceptance is a prefix: the first rejection ends the step).
        """
        if len(per_step_drafted) != len(per_step_accepted):
            raise ValueError(f"{len(per_step_drafted)} drafted counts but {len(per_step_accepted)} accepted counts")
        width = max([num_speculative_tokens, *per_step_drafted])
        drafted_per_pos = [0] * width
        accepted_per_pos = [0] * width
        for drafted, accepted in zip(per_step_drafted, per_step_accepted):
            if not 0 <= accepted <= drafted:
                raise ValueError(f"a verify step accepted {accepted} of {drafted} drafted tokens")
            for pos in range(drafted):
                drafted_per_pos[pos] += 1
            for pos in range(accepted):
                accepted_per_pos[pos] += 1
        return cls(
            num_output_tokens=num_output_tokens,
            num_verify_steps=len(per_step_drafted),
            num_draft_tokens=sum(per_step_drafted),
            num_accepted_tokens=sum(per_step_accepted),
            drafted_per_pos=tuple(drafted_per_pos),
            accepted_per_pos=tuple(accepted_per_pos),
            num_speculative_tokens=num_speculative_tokens,
            drafter_version=drafter_version,
            start_time=start_time,
            end_time=end_time,
        )

    def to_extra_fields(self) -> dict[str, Any]:
        """The entries this request adds to ``TokenOutput.extra_fields`` (plain values: they travel through
        TransferQueue)."""
        record = dataclasses.asdict(self)
        record["drafted_per_pos"] = list(self.drafted_per_pos)
        record["accepted_per_pos"] = list(self.accepted_per_pos)
        return {EXTRA_KEY: record, VERL_DRAFT_TOKENS: self.num_draft_tokens,
                VERL_ACCEPTED_TOKENS: self.num_accepted_tokens, VERL_VERIFY_STEPS: self.num_verify_steps}

    @classmethod
    def from_extra_fields(cls, extra_fields: Mapping[str, Any] | None) -> "RequestSpecStats | None":
        """The record of one trajectory's ``extra_fields``, None where respec wrote none. verl's ``spec_num_*``
        counts, where present, replace the record's: a multi-turn agent loop sums them over the turns."""
        record = (extra_fields or {}).get(EXTRA_KEY)
        if not record:
            return None
        stats = cls(**{**record, "drafted_per_pos": tuple(record["drafted_per_pos"]),
                       "accepted_per_pos": tuple(record["accepted_per_pos"])})
        if all(key in extra_fields for key in (VERL_DRAFT_TOKENS, VERL_ACCEPTED_TOKENS, VERL_VERIFY_STEPS)):
            stats = dataclasses.replace(stats, num_draft_tokens=int(extra_fields[VERL_DRAFT_TOKENS]),
                                        num_accepted_tokens=int(extra_fields[VERL_ACCEPTED_TOKENS]),
                                        num_verify_steps=int(extra_fields[VERL_VERIFY_STEPS]))
        return stats


def aggregate_step_metrics(records: Iterable[RequestSpecStats]) -> dict[str, float]:
    """The ``respec/*`` metrics of one RL step from its requests' records.

    Ratios are token-weighted over the whole step (total accepted / total drafted), which is what decides
    rollout speed; ``accept_length`` counts the bonus token, as vLLM's mean acceptance length does.
    """
    records = list(records)
    if not records:
        return {}
    verify_steps = sum(r.num_verify_steps for r in records)
    drafted = sum(r.num_draft_tokens for r in records)
    accepted = sum(r.num_accepted_tokens for r in records)
    tokens = sum(r.num_output_tokens for r in records)
    span = max(r.end_time for r in records) - min(r.start_time for r in records)
    metrics = {
        "respec/accept_length": 1.0 + accepted / verify_steps if verify_steps else 1.0,
        "respec/accept_rate": accepted / drafted if drafted else 0.0,
        "respec/k": sum(r.num_speculative_tokens for r in records) / len(records),
        "respec/drafter_version": float(max(r.drafter_version for r in records)),
        "respec/rollout_tokens_per_s": tokens / span if span > 0 else 0.0,
        "respec/rollout_tokens": float(tokens),
    }
    width = max(len(r.drafted_per_pos) for r in records)
    for pos in range(width):
        drafted_at = sum(r.drafted_per_pos[pos] for r in records if pos < len(r.drafted_per_pos))
        accepted_at = sum(r.accepted_per_pos[pos] for r in records if pos < len(r.accepted_per_pos))
        if drafted_at:
            metrics[f"respec/accepted_per_pos/{pos}"] = accepted_at / drafted_at
    return metrics

"""Speculative-decoding statistics: per request on the server, aggregated to ``respec/*`` metrics per step.

vLLM reports per-request stats when ``per_request_spec_decode_metrics="detailed"``: one (drafted, accepted)
pair per verify step on ``CompletionOutput.spec_decode_metrics``. The server turns them into plain numbers in
``TokenOutput.extra_fields`` (they travel through verl's TransferQueue), and the trainer aggregates them here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

# Keys this backend adds to TokenOutput.extra_fields (one request each).
EXTRA_KEY = "respec"


@dataclass(frozen=True)
class RequestSpecStats:
    """One request's speculation record, in the form stored in ``extra_fields["respec"]``."""

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

    def to_extra_field(self) -> dict[str, Any]:
        return {
            "num_output_tokens": self.num_output_tokens,
            "num_verify_steps": self.num_verify_steps,
            "num_draft_tokens": self.num_draft_tokens,
            "num_accepted_tokens": self.num_accepted_tokens,
            "drafted_per_pos": list(self.drafted_per_pos),
            "accepted_per_pos": list(self.accepted_per_pos),
            "num_speculative_tokens": self.num_speculative_tokens,
            "drafter_version": self.drafter_version,
            "start_time": self.start_time,
            "end_time": self.end_time,
        }


def request_stats(
    per_step_drafted: Sequence[int],
    per_step_accepted: Sequence[int],
    *,
    num_output_tokens: int,
    num_speculative_tokens: int,
    drafter_version: int,
    start_time: float,
    end_time: float,
) -> RequestSpecStats:
    """Summarise one request from vLLM's per-verify-step drafted/accepted counts.

    A verify step that drafted d tokens and accepted a of them accepted positions 0..a-1 and drafted 0..d-1
    (acceptance is a prefix: the first rejection ends the step).
    """
    assert len(per_step_drafted) == len(per_step_accepted)
    width = max([num_speculative_tokens, *per_step_drafted]) if per_step_drafted else num_speculative_tokens
    drafted_per_pos = [0] * width
    accepted_per_pos = [0] * width
    for drafted, accepted in zip(per_step_drafted, per_step_accepted):
        assert 0 <= accepted <= drafted, (drafted, accepted)
        for pos in range(drafted):
            drafted_per_pos[pos] += 1
        for pos in range(accepted):
            accepted_per_pos[pos] += 1
    return RequestSpecStats(
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


def aggregate_step_metrics(records: Iterable[Mapping[str, Any] | None]) -> dict[str, float]:
    """The ``respec/*`` metrics of one RL step from its requests' ``extra_fields["respec"]`` records.

    Ratios are token-weighted over the whole step (total accepted / total drafted), which is what decides
    rollout speed; ``accept_length`` counts the bonus token, as vLLM's mean acceptance length does.
    """
    records = [r for r in records if r]
    if not records:
        return {}
    verify_steps = sum(r["num_verify_steps"] for r in records)
    drafted = sum(r["num_draft_tokens"] for r in records)
    accepted = sum(r["num_accepted_tokens"] for r in records)
    tokens = sum(r["num_output_tokens"] for r in records)
    span = max(r["end_time"] for r in records) - min(r["start_time"] for r in records)
    metrics = {
        "respec/accept_length": 1.0 + accepted / verify_steps if verify_steps else 1.0,
        "respec/accept_rate": accepted / drafted if drafted else 0.0,
        "respec/k": sum(r["num_speculative_tokens"] for r in records) / len(records),
        "respec/drafter_version": float(max(r["drafter_version"] for r in records)),
        "respec/rollout_tokens_per_s": tokens / span if span > 0 else 0.0,
        "respec/rollout_tokens": float(tokens),
    }
    width = max(len(r["drafted_per_pos"]) for r in records)
    for pos in range(width):
        drafted_at = sum(r["drafted_per_pos"][pos] for r in records if pos < len(r["drafted_per_pos"]))
        accepted_at = sum(r["accepted_per_pos"][pos] for r in records if pos < len(r["accepted_per_pos"]))
        if drafted_at:
            metrics[f"respec/accepted_per_pos/{pos}"] = accepted_at / drafted_at
    return metrics

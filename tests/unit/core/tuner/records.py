"""Request records for the tuner tests: only the per-position counts matter to the tuner."""

from respec_plugin.core.spec_stats import RequestSpecStats


def request(drafted_per_pos, accepted_per_pos) -> RequestSpecStats:
    """A record with these per-position counts (drafted_per_pos[0] verify steps) and neutral other fields."""
    return RequestSpecStats(num_output_tokens=0, num_verify_steps=drafted_per_pos[0] if drafted_per_pos else 0,
                            num_draft_tokens=sum(drafted_per_pos), num_accepted_tokens=sum(accepted_per_pos),
                            drafted_per_pos=tuple(drafted_per_pos), accepted_per_pos=tuple(accepted_per_pos),
                            num_speculative_tokens=len(drafted_per_pos), drafter_version=0, start_time=0.0,
                            end_time=0.0)

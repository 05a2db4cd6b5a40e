"""A thin wrapper around vLLM's ``AsyncLLM`` that keeps each finished request's speculation stats.

verl's ``vLLMHttpServer.generate`` consumes vLLM's ``RequestOutput`` and returns only token ids and a few
fields, so the per-request ``spec_decode_metrics`` would be lost. Wrapping the engine object (composition,
not a patch of verl) lets the respec server pick them up by request id after verl's ``generate`` returns.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, AsyncGenerator


@dataclass
class FinishedRequest:
    """What the server needs of one request's final output to build its ``respec`` stats."""

    per_step_drafted: list[int]
    per_step_accepted: list[int]
    num_output_tokens: int
    start_time: float
    end_time: float


class SpecStatsEngine:
    """Delegates everything to the wrapped ``AsyncLLM``; records finished requests from ``generate``."""

    def __init__(self, engine):
        self._engine = engine
        self._finished: dict[str, FinishedRequest] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    async def generate(self, *args, request_id: str, **kwargs) -> AsyncGenerator:
        start_time = time.time()
        final = None
        async for output in self._engine.generate(*args, request_id=request_id, **kwargs):
            final = output
            yield output
        if final is not None and final.outputs:
            completion = final.outputs[0]
            metrics = getattr(completion, "spec_decode_metrics", None)
            self._finished[request_id] = FinishedRequest(
                per_step_drafted=list(metrics.per_step_drafted) if metrics else [],
                per_step_accepted=list(metrics.per_step_accepted) if metrics else [],
                num_output_tokens=len(completion.token_ids),
                start_time=start_time,
                end_time=time.time(),
            )

    def pop_finished(self, request_id: str) -> FinishedRequest | None:
        return self._finished.pop(request_id, None)

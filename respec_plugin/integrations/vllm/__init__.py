"""respec inside vLLM's processes: the worker extension (drafter hot-swap), the scheduler subclass (live k per batch
size) and the general plug-in that skips the drafter at k = 0."""

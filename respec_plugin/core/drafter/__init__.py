"""Drafter models in torch that vLLM's speculative methods load, saved in the checkpoint format they came in (vLLM's,
speculators', the EAGLE authors'), their day-0 init and offline warm-up."""

"""Drafter models in torch whose saved layout vLLM's speculative methods load, their day-0 init and offline warm-up."""

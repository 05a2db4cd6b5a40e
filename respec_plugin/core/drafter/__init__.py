"""Drafter models in torch whose saved layout vLLM's speculative methods load."""

"""Adaptive SD configuration: measure engine steps, fit their cost, and choose k (0 = off) per batch size."""

"""verl-side rollout backend ``respec``: replica and server (subclasses of verl's vLLM classes), the
worker-side adapter, the vLLM worker extension for drafter hot-swap, and speculation statistics."""

"""respec inside verl: plug-in registration, the rollout replica / server / adapter (subclasses of verl's vLLM
classes), the trainer mixin and the one adapter through which respec reads trainer state."""

"""The lab: the embedded CPU default (tiny tokenizer, model, drafter and math data built locally, and a CPU
platform for verl + vLLM CPU). Nothing here is active on GPU runs; the CPU platform loads only with
``VERL_PLATFORM=cpu``."""

"""respec's CPU lab, a distribution of its own (``respec-lab``, not installed with respec-plugin): a CPU platform
for verl and two vLLM CPU plug-ins, so verl + vLLM run on a machine without a GPU, and the embedded default built
locally (a small tokenizer, actor, EAGLE-3 drafters and math data) that the demo, tests and benchmarks run on.
Nothing here acts on GPU runs: the CPU platform loads only with ``VERL_PLATFORM=cpu``, the vLLM plug-ins only on
vLLM's CPU backend."""

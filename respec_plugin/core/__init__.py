"""The framework-free core: it imports no verl, vLLM, Ray or TransferQueue (tests/unit/core/test_imports.py checks),
so it can be read, tested and reused without a cluster or an inference engine."""

"""The core knows no framework: importing every module of ``respec_plugin.core`` (and the package root) in a fresh
interpreter loads no verl, vLLM, Ray or TransferQueue."""

import json
import subprocess
import sys

FRAMEWORKS = ["verl", "vllm", "ray", "transfer_queue"]

PROBE = f"""
import importlib, json, pkgutil, sys
import respec_plugin, respec_plugin.core as core
modules = [m.name for m in pkgutil.walk_packages(core.__path__, "respec_plugin.core.")]
for name in modules:
    importlib.import_module(name)
print(json.dumps({{"modules": modules, "frameworks": sorted({{m.split(".")[0] for m in sys.modules}} & set({FRAMEWORKS!r}))}}))
"""


def test_core_imports_no_framework():
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300, check=True)
    probe = json.loads(result.stdout.strip().splitlines()[-1])
    assert "respec_plugin.core.tuner.policy" in probe["modules"] and len(probe["modules"]) >= 20
    assert probe["frameworks"] == [], f"respec_plugin.core imports {probe['frameworks']}"

"""Drafter checkpoints are untrusted files: reading one never runs code, and no module of respec unpickles anything
but tensors."""

import ast
from pathlib import Path

import pytest
import torch

from respec_plugin.core.drafter.checkpoint import read_drafter_tensors

REPO = Path(__file__).resolve().parents[4]
SOURCES = ("respec_plugin", "lab/respec_lab", "benchmarks")


class _RunsCode:
    """A pickled object whose unpickling would write ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def test_a_pickled_drafter_cannot_run_code(tmp_path):
    marker = tmp_path / "ran"
    drafter = tmp_path / "drafter"
    drafter.mkdir()
    torch.save({"fc.weight": torch.zeros(2, 2), "trap": _RunsCode(marker)}, drafter / "pytorch_model.bin")
    with pytest.raises(Exception, match="Weights only load failed"):
        read_drafter_tensors(drafter)
    assert not marker.exists()


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and isinstance(node.func.value,
                                                                                               ast.Name):
            yield node.func.value.id, node.func.attr, node


def test_every_load_in_the_sources_is_tensors_only():
    checked = 0
    for source in SOURCES:
        for path in sorted((REPO / source).rglob("*.py")):
            for module, function, call in _calls(ast.parse(path.read_text())):
                where = f"{path.relative_to(REPO)}:{call.lineno}"
                assert not (module in ("pickle", "cloudpickle", "dill") and function in ("load", "loads")), where
                if (module, function) == ("torch", "load"):
                    weights_only = [k.value for k in call.keywords if k.arg == "weights_only"]
                    assert len(weights_only) == 1 and getattr(weights_only[0], "value", None) is True, where
                    checked += 1
    assert checked >= 3  # the EAGLE authors' drafters, the learner's state, the recorded features

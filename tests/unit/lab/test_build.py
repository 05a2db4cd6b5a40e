"""The lab build: cached and reused, complete, reported sizes and measurements, and the CLI's JSON line."""

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from respec_lab.build import MANIFEST, build_lab, lab_dir


def test_build_is_cached_and_complete(tiny_lab):
    start = time.perf_counter()
    again = build_lab("tiny")
    assert time.perf_counter() - start < 5
    assert again == tiny_lab
    assert Path(tiny_lab.root) == lab_dir("tiny")
    assert Path(tiny_lab.root).parent == Path(os.environ["RESPEC_CACHE"]) / "lab"
    for path in (tiny_lab.train_parquet, tiny_lab.val_parquet):
        assert Path(path).is_file()
    for directory in (tiny_lab.actor_dir, tiny_lab.drafter_dir, tiny_lab.day0_drafter_dir):
        assert (Path(directory) / "config.json").is_file() and (Path(directory) / "model.safetensors").is_file()
    assert (Path(tiny_lab.actor_dir) / "tokenizer.json").is_file()
    versions = [json.loads((Path(d) / "config.json").read_text())["drafter_version"]
                for d in (tiny_lab.day0_drafter_dir, tiny_lab.drafter_dir)]
    assert versions == [0, 1]
    assert not [p for p in Path(tiny_lab.root).parent.iterdir() if p.name.startswith(".tiny") and p.is_dir()]


def test_manifest_reports_sizes_and_measurements(tiny_lab):
    sizes, metrics = tiny_lab.sizes, tiny_lab.metrics
    assert sizes["actor_params"] > sizes["drafter_params"] > 0
    assert sizes["draft_vocab_size"] < sizes["vocab_size"]
    assert 0.0 < metrics["accuracy_temperature_1"] < 1.0
    # Supervision made the actor peaked: a random actor's per-token loss is ~ln(vocab) = 6.2.
    assert metrics["actor_final_sft_loss"] < 1.0
    warmed, day0 = metrics["offline_acceptance_warmed"], metrics["offline_acceptance_day0"]
    assert len(warmed) == 3
    for w, d in zip(warmed, day0):
        assert w["greedy_acceptance"] > d["greedy_acceptance"] + 0.3
        assert w["tv"] < d["tv"] - 0.3
        assert w["divergence"] < d["divergence"]
    assert json.loads((Path(tiny_lab.root) / MANIFEST).read_text())["metrics"] == metrics


def test_unknown_preset_names_value_and_fix():
    with pytest.raises(ValueError, match="'huge' is unknown: use one of demo, smollm2, tiny"):
        build_lab("huge")


def test_cli_prints_lab_paths_as_json_on_its_last_line(tiny_lab):
    result = subprocess.run([sys.executable, "-m", "respec_lab", "build", "--preset", "tiny"],
                            capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(result.stdout.strip().splitlines()[-1]) == dataclasses.asdict(tiny_lab)

"""Learner variants compared on one recorded run (counterfactual replay), without run-to-run spread.

In the drift benchmark every run's actor drifts differently (drafts change which random draws sampling uses), so a
single run per variant cannot tell learner variants apart. This benchmark records one GRPO run once
(``learner.record_dir``, the ``online_kd`` run of benchmarks/drift.py: per step the features the actor ranks kept in
verl's old-log-prob forward, i.e. under the actor that generated and verifies that step, plus the rows' rewards), then
replays every learner variant over exactly that sequence: after step t it learns from step t's features, as the
co-located learner does; the drafter it then serves is scored on step t + 1's features (the greedy-draft acceptance
per draft position that ``respec/learner/held_out_acceptance`` reports). ``static`` never learns. The recorded actors
do not depend on the recording run's learner: speculative sampling is lossless, so any learner variant would have
produced the same distribution of actor sequences.

    python benchmarks/learner_replay.py [--record-dir DIR] [--variants static,kd,...] [drift.py's run options]

Writes ``benchmarks/results/learner_replay.{json,png}``. Acceptance here is offline (teacher-forced on the recorded
trajectories), not vLLM's acceptance length; the drift benchmark measures that.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

import common
import drift
from respec_lab.build import build_lab
from respec_lab.launch import respec_overrides
from respec_plugin.core.config import LearnerConfig
from respec_plugin.core.drafter.io import load_drafter
from respec_plugin.core.learner.buffer import SequenceFeatures, collate
from respec_plugin.core.learner.loop import OnlineLearner
from respec_plugin.core.learner.losses import trajectory_weights
from respec_plugin.core.learner.objective import held_out_scores
from respec_plugin.integrations.verl.learner_driver import REWARDS_FILE

RECORDED_RUN = "online_kd"


def variants(args) -> dict[str, dict | None]:
    """LearnerConfig overrides of each variant over the drift benchmark's shared learner block (None: no learner)."""
    return {
        "static": None,
        "kd": {"reward_weighting": "uniform"},
        "kd_8_steps": {"reward_weighting": "uniform", "steps_per_rl_step": 8},  # a smaller budget per RL step
        "kd_48_steps": {"reward_weighting": "uniform", "steps_per_rl_step": 48},
        "kd_lr_1e-3": {"reward_weighting": "uniform", "learning_rate": 1e-3},
        "kd_lr_4e-3": {"reward_weighting": "uniform", "learning_rate": 4e-3},
        "kd_replay_2": {"reward_weighting": "uniform", "replay_steps": 2},  # the earlier default window
        "kd_replay_12": {"reward_weighting": "uniform", "replay_steps": 12},
        "kd_batch_32": {"reward_weighting": "uniform", "batch_size": 32},
        "kd_tv": {"reward_weighting": "uniform", "divergence": "tv"},
        "kd_no_negative_feedback": {"reward_weighting": "uniform", "negative_feedback": 0.0},
        "rwkd": {"reward_weighting": "reward", "weight_floor": 0.0},
        "rwkd_floor": {"reward_weighting": "reward", "weight_floor": args.rwkd_floor},
    }


def base_config(args) -> dict:
    """The learner block every drift learner run shares (benchmarks/drift.py ``overrides``)."""
    return {"enable": True, "steps_per_rl_step": args.learner_steps, "learning_rate": args.learner_lr,
            "replay_steps": args.learner_replay_steps, "weight_floor": 0.0}


def record(lab, args, record_dir: Path) -> None:
    """One GRPO run (drift's ``online_kd``) that writes every step's kept features to ``record_dir``."""
    extra = respec_overrides(learner={"record_dir": str(record_dir)})
    result = drift.run(lab, RECORDED_RUN, args, extra_respec=tuple(extra), experiment="bench_learner_replay")
    logging.info("recorded %d steps into %s", len(result["steps"]), record_dir)


class RecordedSteps:
    """The recorded steps: each one's features (rank 0's: the lab runs one actor rank) and its rows' rewards and
    advantages."""

    def __init__(self, record_dir: Path):
        paths = sorted(record_dir.glob("step_*_rank0.pt"))
        if len(paths) < 2:
            raise SystemExit(f"{record_dir} holds {len(paths)} recorded steps; record a run first "
                             "(leave out --skip-record)")
        self.steps = [int(path.name.split("_")[1]) for path in paths]
        self.features = [[SequenceFeatures(**row) for row in torch.load(path, weights_only=True)] for path in paths]
        self.rewards = [json.loads((record_dir / REWARDS_FILE.format(step=step)).read_text()) for step in self.steps]

    def weighted(self, index: int, config: LearnerConfig) -> list[SequenceFeatures]:
        """Step ``index``'s features with the variant's trajectory weights."""
        sequences = self.features[index]
        by_row = self.rewards[index]
        rewards = torch.tensor([by_row[str(s.row)]["reward"] for s in sequences])
        advantages = torch.tensor([by_row[str(s.row)]["advantage"] for s in sequences])
        weights = trajectory_weights(rewards, advantages, config.reward_weighting, config.weight_floor)
        return [replace(s, weight=float(w)) for s, w in zip(sequences, weights)]


def replay(lab, recorded: RecordedSteps, overrides: dict | None, args) -> dict:
    """Served drafter's acceptance at every recorded step (the first: the drafter the run started from)."""
    drafter, version = load_drafter(lab.drafter_dir)
    config = LearnerConfig(**{**base_config(args), **overrides}) if overrides is not None else None
    learner = OnlineLearner(config, drafter, version, seed=args.seed) if config else None
    acceptance, ceiling, learner_s = [], [], []
    for index in range(len(recorded.steps)):
        serving = learner.serving if learner else drafter
        scores = held_out_scores(serving, collate(recorded.features[index]), args.num_speculative_tokens)
        acceptance.append(scores["greedy_acceptance"])
        ceiling.append(scores["greedy_acceptance_ceiling"])
        if learner is None:
            continue
        start = time.perf_counter()
        candidate = learner.train_candidate(recorded.weighted(index, config))
        learner.next_version(candidate)
        learner.settle(candidate, None)
        learner_s.append(time.perf_counter() - start)
    return {"steps": recorded.steps, "acceptance": acceptance, "ceiling": ceiling, "overrides": overrides,
            "rejected_versions": learner.rejected_versions if learner else None,
            "learner_s_mean": statistics.fmean(learner_s) if learner_s else None}


def summarise(r: dict, static: dict | None) -> dict:
    out = {"acceptance_step_1": r["acceptance"][0], "acceptance_mean_last_10": statistics.fmean(r["acceptance"][-10:]),
           "ceiling_mean_last_10": statistics.fmean(r["ceiling"][-10:]), "rejected_versions": r["rejected_versions"]}
    out["last_10_over_step_1"] = out["acceptance_mean_last_10"] / out["acceptance_step_1"]
    if static is not None:
        out["mean_over_static"] = statistics.fmean(r["acceptance"]) / statistics.fmean(static["acceptance"])
    return out


def plot(report: dict, path: Path) -> None:
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for name, r in report["variants"].items():
        ax.plot(r["steps"], r["acceptance"], marker="o", markersize=3, label=name)
    first = next(iter(report["variants"].values()))
    ax.plot(first["steps"], first["ceiling"], linestyle=":", color="black", label="ceiling (max p)")
    ax.set(xlabel="GRPO step (recorded run)", ylabel="p(greedy draft) per position",
           title=f"Learner variants replayed on one recorded run (lab {report['preset']}, actor lr "
                 f"{report['config']['actor_lr']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = drift.arguments(__doc__)
    parser.add_argument("--record-dir", default=str(common.OUTPUTS / "learner_replay" / "record"))
    parser.add_argument("--skip-record", action="store_true", help="replay the steps already in --record-dir")
    parser.add_argument("--variants", help="comma-separated variants (default: all)")
    parser.set_defaults(name="learner_replay")
    args = parser.parse_args()
    common.setup_logging()
    table = variants(args)
    names = common.selected(args.variants or ",".join(table), table, "--variants", "variant")
    torch.manual_seed(args.seed)
    lab = build_lab(args.preset)
    record_dir = Path(args.record_dir)
    if not args.skip_record:
        for stale in record_dir.glob("step_*"):
            stale.unlink()
        record(lab, args, record_dir)
    recorded = RecordedSteps(record_dir)
    report = {"preset": args.preset, "config": vars(args), "variants": {}, "summary": {}}
    for name in names:
        report["variants"][name] = replay(lab, recorded, table[name], args)
        static = report["variants"].get("static")
        report["summary"][name] = summarise(report["variants"][name], static)
        print(name, json.dumps(report["summary"][name]), flush=True)
        common.write_results(args.name, report, plot)


if __name__ == "__main__":
    main()

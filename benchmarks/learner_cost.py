"""What the co-located online learner costs an RL step: stock verl GRPO with respec and the learner on, on the demo
lab (whose drafter-to-actor size ratio is closer to a real model's) and on the tiny lab.

    python benchmarks/learner_cost.py [--steps 10] [--presets demo,tiny]

Per step, verl's own ``timing_s/step`` and respec's ``respec/learner/blocking_s`` (what the driver waited for the
actor ranks' training) and ``respec/learner/train_s`` / ``publish_s`` (the learner's time on the actor ranks, and
pushing the version into the engines in the weight sync). The blocking share is their ratio, averaged over the steps
after the first (which includes start-up). The learner's tokens per step and seconds per 1k kept tokens per drafter
optimizer step give its per-token cost, from which the README extrapolates to a real model. Writes
``benchmarks/results/learner_cost.{json,png}``.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import common
from respec_lab.build import build_lab
from respec_lab.launch import respec_overrides
from respec_plugin.core.config import LearnerConfig

PRESETS = ("demo", "tiny")


def run(preset: str, args) -> dict:
    """One GRPO run with the learner on; its per-step learner and step times."""
    lab = build_lab(preset)
    learner = {"enable": True, "reward_weighting": "uniform"}
    result = common.lab_grpo_run(
        lab, "bench_learner_cost", preset, rollout_name="respec", timeout_s=args.timeout_s, total_steps=args.steps,
        train_batch_size=args.train_batch_size, n=args.n, max_response_length=args.max_response_length,
        extra_overrides=respec_overrides(drafter_path=lab.drafter_dir, num_speculative_tokens=3, learner=learner))
    common.warn_if_cut_short(preset, result)
    series = {key: common.metric_series(result, metric) for key, metric in (
        ("step_s", "timing_s/step"), ("blocking_s", "respec/learner/blocking_s"),
        ("train_s", "respec/learner/train_s"), ("publish_s", "respec/learner/publish_s"),
        ("tokens", "respec/learner/tokens"), ("update_actor_s", "timing_s/update_actor"),
        ("gen_s", "timing_s/gen"), ("published_version", "respec/learner/published_version"))}
    return {"lab_sizes": lab.sizes, "ok": result.ok, "steps": sorted(result.metrics), **series}


def summarise(r: dict) -> dict:
    """Means over the steps after the first."""
    def mean(key: str) -> float:
        return statistics.fmean(v for v in r[key][1:] if v is not None)

    steps_per_rl_step = LearnerConfig().steps_per_rl_step
    shares = [b / s for b, s in zip(r["blocking_s"][1:], r["step_s"][1:]) if b is not None and s]
    return {
        "blocking_share": statistics.fmean(shares),
        "learner_s_per_step": mean("train_s") + mean("publish_s"),
        "train_s_per_step": mean("train_s"),
        "publish_s_per_step": mean("publish_s"),
        "rl_step_s": mean("step_s"),
        "tokens_per_step": mean("tokens"),
        "train_s_per_1k_tokens_per_optimizer_step": 1000 * mean("train_s") / (mean("tokens") * steps_per_rl_step),
        "drafter_params": r["lab_sizes"]["drafter_params"],
        "actor_params": r["lab_sizes"]["actor_params"],
    }


def plot(report: dict, path: Path) -> None:
    plt = common.pyplot()
    fig, axes = plt.subplots(1, len(report["runs"]), figsize=(6 * len(report["runs"]), 4), squeeze=False)
    for ax, (preset, r) in zip(axes[0], report["runs"].items()):
        steps = r["steps"]
        ax.bar(steps, r["step_s"], color="lightgray", label="RL step (timing_s/step)")
        ax.bar(steps, r["blocking_s"], color="C3", label="learner, blocking (respec/learner/blocking_s)")
        share = report["summary"][preset]["blocking_share"]
        ax.set(xlabel="GRPO step", ylabel="seconds", title=f"{preset} lab: learner {share:.1%} of the step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--train-batch-size", type=int, default=8)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-response-length", type=int, default=64)
    parser.add_argument("--timeout-s", type=float, default=3600)
    args = parser.parse_args()
    common.setup_logging()
    presets = common.selected(args.presets, PRESETS, "--presets", "preset")
    report = {"config": vars(args), "runs": {}, "summary": {}}
    for preset in presets:
        report["runs"][preset] = run(preset, args)
        report["summary"][preset] = summarise(report["runs"][preset])
        print(preset, json.dumps(report["summary"][preset]), flush=True)
        demo, tiny = report["summary"].get("demo"), report["summary"].get("tiny")
        report.update({key: value for key, value in (
            ("learner_blocking_share", demo and demo["blocking_share"]),
            ("learner_blocking_share_tiny", tiny and tiny["blocking_share"]),
            ("learner_s_per_step", demo and demo["learner_s_per_step"]),
            ("rl_step_s", demo and demo["rl_step_s"])) if value is not None})
        common.write_results("learner_cost", report, plot)


if __name__ == "__main__":
    main()

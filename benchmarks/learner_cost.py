"""What the co-located online learner costs an RL step: stock verl GRPO with respec, on the demo lab (whose
drafter-to-actor size ratio is closer to a real model's) and on the tiny lab, three runs each, one after the other:
the learner off (the same static drafter), the learner after the actor update (``learner.overlap=False``), and the
learner during the next rollout (``learner.overlap``, the default).

    python benchmarks/learner_cost.py [--steps 10] [--presets demo,tiny]

Per step, verl's own ``timing_s/step`` and respec's ``respec/learner/blocking_s`` (what the RL step waited for the
learner: its training call, the wait for an overlapped training, the push) and ``train_s`` (its training on the
actor ranks). The blocking share is their ratio, averaged over the steps after the first (which includes start-up);
the step-time ratio to the learner-off run shows what the learner costs besides (e.g. a rollout sharing the cores).
The learner's seconds per 1k kept tokens per drafter optimizer step give its per-token cost, from which the README
extrapolates to a real model. Writes ``benchmarks/results/learner_cost.{json,png}``; the top-level keys
``learner_blocking_share`` (demo), ``learner_blocking_share_tiny``, ``learner_s_per_step`` and ``rl_step_s`` (demo)
are those of the mode ``--headline-mode`` names.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import common
from respec_lab.build import build_lab
from respec_lab.launch import respec_overrides

PRESETS = ("demo", "tiny")


MODES = ("off", "sequential", "overlap")


def run(preset: str, mode: str, args) -> dict:
    """One GRPO run of ``preset`` with the learner in ``mode``; its per-step learner and step times."""
    lab = build_lab(preset)
    respec = {"drafter_path": lab.drafter_dir, "num_speculative_tokens": 3}
    if mode != "off":
        respec["learner"] = {"enable": True, "reward_weighting": "uniform", "overlap": mode == "overlap"}
    result = common.lab_grpo_run(
        lab, "bench_learner_cost", f"{preset}_{mode}", rollout_name="respec", timeout_s=args.timeout_s,
        total_steps=args.steps, train_batch_size=args.train_batch_size, n=args.n,
        max_response_length=args.max_response_length, extra_overrides=respec_overrides(**respec))
    common.warn_if_cut_short(f"{preset}_{mode}", result)
    series = {key: common.metric_series(result, metric) for key, metric in (
        ("step_s", "timing_s/step"), ("blocking_s", "respec/learner/blocking_s"),
        ("train_s", "respec/learner/train_s"), ("publish_s", "respec/learner/publish_s"),
        ("wait_s", "respec/learner/wait_s"), ("optimizer_steps", "respec/learner/optimizer_steps"),
        ("tokens", "respec/learner/tokens"), ("gen_s", "timing_s/gen"),
        ("accept_length", "respec/accept_length"), ("published_version", "respec/learner/published_version"))}
    return {"lab_sizes": lab.sizes, "ok": result.ok, "steps": sorted(result.metrics), **series}


def _mean(values) -> float | None:
    values = [v for v in values[1:] if v is not None]  # the first step includes start-up
    return statistics.fmean(values) if values else None


def summarise(r: dict, off: dict | None) -> dict:
    """Means over the steps after the first."""
    out = {"rl_step_s": _mean(r["step_s"]), "accept_length": _mean(r["accept_length"]),
           "drafter_params": r["lab_sizes"]["drafter_params"], "actor_params": r["lab_sizes"]["actor_params"]}
    if off is not None:
        out["rl_step_s_over_learner_off"] = out["rl_step_s"] / _mean(off["step_s"])
    if _mean(r["train_s"]) is None:
        return out
    shares = [b / s for b, s in zip(r["blocking_s"][1:], r["step_s"][1:]) if b is not None and s]
    train_s, tokens, steps = _mean(r["train_s"]), _mean(r["tokens"]), _mean(r["optimizer_steps"])
    out.update(blocking_share=statistics.fmean(shares), blocking_s=_mean(r["blocking_s"]),
               learner_s_per_step=train_s + _mean(r["publish_s"]), train_s_per_step=train_s,
               optimizer_steps_per_rl_step=steps, tokens_per_step=tokens,
               train_s_per_1k_tokens_per_optimizer_step=1000 * train_s / (tokens * steps))
    return out


def plot(report: dict, path: Path) -> None:
    plt = common.pyplot()
    presets = list(report["runs"])
    fig, axes = plt.subplots(1, len(presets), figsize=(7 * len(presets), 4), squeeze=False)
    for ax, preset in zip(axes[0], presets):
        for offset, (mode, r) in enumerate(report["runs"][preset].items()):
            steps = [s + 0.27 * (offset - 1) for s in r["steps"]]
            ax.bar(steps, r["step_s"], width=0.25, color=f"C{offset}", alpha=0.35, label=f"{mode}: RL step")
            if mode != "off":
                blocking = [b or 0.0 for b in r["blocking_s"]]
                ax.bar(steps, blocking, width=0.25, color=f"C{offset}",
                       label=f"{mode}: learner blocking ({report['summary'][preset][mode]['blocking_share']:.1%})")
        ax.set(xlabel="GRPO step", ylabel="seconds", title=f"{preset} lab: RL step and the learner's blocking part")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--headline-mode", default="overlap", choices=("sequential", "overlap"))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--train-batch-size", type=int, default=8)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-response-length", type=int, default=64)
    parser.add_argument("--timeout-s", type=float, default=3600)
    args = parser.parse_args()
    common.setup_logging()
    presets = common.selected(args.presets, PRESETS, "--presets", "preset")
    modes = common.selected(args.modes, MODES, "--modes", "mode")
    report = {"config": vars(args), "runs": {}, "summary": {}}
    for preset in presets:
        report["runs"][preset], report["summary"][preset] = {}, {}
        for mode in modes:
            r = report["runs"][preset][mode] = run(preset, mode, args)
            report["summary"][preset][mode] = summarise(r, report["runs"][preset].get("off"))
            print(preset, mode, json.dumps(report["summary"][preset][mode]), flush=True)
            common.write_results("learner_cost", report, plot)
    head = {preset: report["summary"][preset].get(args.headline_mode) for preset in presets}
    report.update({key: value for key, value in (
        ("learner_blocking_share", head.get("demo") and head["demo"]["blocking_share"]),
        ("learner_blocking_share_tiny", head.get("tiny") and head["tiny"]["blocking_share"]),
        ("learner_s_per_step", head.get("demo") and head["demo"]["learner_s_per_step"]),
        ("rl_step_s", head.get("demo") and head["demo"]["rl_step_s"])) if value is not None})
    common.write_results("learner_cost", report, plot)


if __name__ == "__main__":
    main()

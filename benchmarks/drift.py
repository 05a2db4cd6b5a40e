"""Drafter drift under GRPO on the CPU lab: a static drafter vs the online learner (uniform KD and reward-weighted KD),
plus the day-0 run (learning from an untrained drafter) and optionally stock vLLM for reward parity.

    python benchmarks/drift.py [--preset tiny] [--steps 30] [--runs static,online_kd,online_rwkd,day0,vllm]
                               [--seeds 0,1,2]

Every run is stock verl GRPO from the same lab, seed and sizes; only the respec block differs. Acceptance length is
respec's own per-step metric (tokens per verify step, bonus token included), reward is verl's ``critic/score/mean``.
The actor learning rate is raised (``--actor-lr``) so the tiny actor drifts within a few dozen steps. Writes
``benchmarks/results/drift.json`` and ``drift.png`` (``--name`` changes the stem). With several ``--seeds`` every run
repeats once per seed and its summary is the mean over the seeds (``per_seed`` keeps each one): a single run's
step-1 acceptance, the denominator of the ratios, varies by several per cent between seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import common
from respec_lab.build import build_lab
from respec_lab.launch import respec_overrides

RUNS = ("static", "online_kd", "online_kd_sequential", "online_rwkd", "online_rwkd_floor",
        "online_rwkd_floor_sequential", "day0", "vllm")
DAY0_TARGET_ACCEPT_LENGTH = 2.0


def learner_runs(args) -> dict[str, dict]:
    """What sets each learner run apart; the rest of its learner block is shared (see :func:`overrides`)."""
    return {
        "online_kd": {"reward_weighting": "uniform"},
        # Trained after the actor update instead of during the next rollout (learner.overlap, the default).
        "online_kd_sequential": {"reward_weighting": "uniform", "overlap": False},
        "online_rwkd": {"reward_weighting": "reward"},  # ReSpec's w(r) = r: failed rollouts drop out
        # Failed rollouts keep a weight instead of dropping out.
        "online_rwkd_floor": {"reward_weighting": "reward", "weight_floor": args.rwkd_floor},
        "online_rwkd_floor_sequential": {"reward_weighting": "reward", "weight_floor": args.rwkd_floor,
                                         "overlap": False},
        "day0": {"reward_weighting": args.day0_weighting},
    }


def overrides(lab, name: str, args) -> list[str]:
    """The respec block of each run (none for stock vLLM)."""
    if name == "vllm":
        return []
    drafter = lab.day0_drafter_dir if name == "day0" else lab.drafter_dir
    arm = learner_runs(args).get(name)
    learner = {} if arm is None else {
        "learner": {"enable": True, "steps_per_rl_step": args.learner_steps, "learning_rate": args.learner_lr,
                    "replay_steps": args.learner_replay_steps, "weight_floor": 0.0,
                    "compare_with_initial": True, **arm}
    }
    return respec_overrides(drafter_path=drafter, num_speculative_tokens=args.num_speculative_tokens, **learner)


def run(lab, name: str, args, extra_respec: tuple[str, ...] = (), experiment: str = "bench_drift") -> dict:
    """One GRPO run of ``name`` (``extra_respec``: more respec overrides) under ``outputs/<experiment>/<name>``."""
    respec = overrides(lab, name, args) + list(extra_respec)
    result = common.lab_grpo_run(
        lab, experiment, name, rollout_name="vllm" if name == "vllm" else "respec", timeout_s=args.timeout_s,
        total_steps=args.steps, train_batch_size=args.train_batch_size, n=args.n, seed=args.seed,
        max_response_length=args.max_response_length,
        extra_overrides=[f"actor_rollout_ref.actor.optim.lr={args.actor_lr}", *respec],
    )
    steps = sorted(result.metrics)
    if not steps:
        raise SystemExit(f"{name} run logged no step (exit {result.returncode}); see {result.log_path}")
    common.warn_if_cut_short(name, result)

    def series(key: str) -> list[float | None]:
        return common.metric_series(result, key)

    return {
        "respec_overrides": respec,
        "ok": result.ok,
        "wall_s": result.wall_s,
        "steps": steps,
        "accept_length": series("respec/accept_length"),
        "reward": series("critic/score/mean"),
        "step_s": series("timing_s/step"),
        "learner_train_s": series("respec/learner/train_s"),
        "learner_publish_s": series("respec/learner/publish_s"),
        "learner_blocking_s": series("respec/learner/blocking_s"),
        "learner_tv": series("respec/learner/tv"),
        "published_version": series("respec/learner/published_version"),
        "rejected_versions": series("respec/learner/rejected_versions"),
        "drafter_version": series("respec/drafter_version"),
        "held_out_acceptance": series("respec/learner/held_out_acceptance"),
        "held_out_acceptance_initial": series("respec/learner/held_out_acceptance_initial"),
        "held_out_acceptance_ceiling": series("respec/learner/held_out_acceptance_ceiling"),
    }


def summarise(name: str, r: dict) -> dict:
    out = {"steps_run": len(r["steps"]), "reward_mean_last_10": statistics.fmean(r["reward"][-10:])}
    accept = r["accept_length"]
    if accept and accept[0] is not None:
        last_10 = statistics.fmean(accept[-10:])
        out.update(accept_length_step_1=accept[0], accept_length_last=accept[-1], accept_length_mean_last_10=last_10,
                   last_10_over_step_1=last_10 / accept[0], min_over_step_1=min(accept) / accept[0])
        steps_21_30 = [a for step, a in zip(r["steps"], accept) if 21 <= step <= 30 and a is not None]
        if steps_21_30:
            out["accept_length_ratio_21_30"] = statistics.fmean(steps_21_30) / accept[0]
    # Paired, on the same held-out prompts of the same run: the serving drafter vs the one the run started from, and
    # a drafter equal to the actor (the ceiling: how much of the fall the actor itself causes, its entropy). The
    # steps that report them (an overlapped learner reports its first a step later).
    held_out = {key: [value for value in r.get(f"held_out_acceptance{key}") or [] if value is not None]
                for key in ("", "_initial", "_ceiling")}
    if held_out["_initial"]:
        for key, values in held_out.items():
            out[f"held_out_acceptance{key}_first_3"] = statistics.fmean(values[:3])
            out[f"held_out_acceptance{key}_mean_last_10"] = statistics.fmean(values[-10:])
    out["step_s_mean"] = statistics.fmean(r["step_s"][1:])  # step 1 includes warm-up
    # The learner's training time on the actor ranks, and the part of the RL step the driver waited for it.
    for key, fraction in (("learner_train_s", "learner_train_fraction_of_step"),
                          ("learner_blocking_s", "learner_blocking_fraction_of_step")):
        if (r.get(key) or [None])[0] is not None:
            out[fraction] = statistics.fmean(t / s for t, s in zip(r[key], r["step_s"]) if t is not None)
    if name == "day0":
        out["steps_to_accept_length_2"] = next(
            (step for step, a in zip(r["steps"], accept) if a is not None and a >= DAY0_TARGET_ACCEPT_LENGTH), None)
    return out


def plot(report: dict, path: Path) -> None:
    plt = common.pyplot()
    first_seed = {name: next(iter(by_seed.values())) for name, by_seed in report["runs"].items()}
    paired = {name: r for name, r in first_seed.items() if (r.get("held_out_acceptance_initial") or [None])[0]}
    fig, axes = plt.subplots(1, 3 if paired else 2, figsize=(18 if paired else 12, 4))
    ax_accept, ax_reward = axes[0], axes[1]
    colors = {name: f"C{i}" for i, name in enumerate(report["runs"])}  # one colour per run in every panel
    for name, by_seed in report["runs"].items():
        for index, r in enumerate(by_seed.values()):  # one colour per run, one line per seed
            label = name if index == 0 else None
            style = dict(marker="o", markersize=3, label=label, color=colors[name], alpha=0.8)
            if r["accept_length"][0] is not None:
                ax_accept.plot(r["steps"], r["accept_length"], **style)
            ax_reward.plot(r["steps"], r["reward"], **style)
    ax_accept.set(xlabel="GRPO step", ylabel="tokens per verify step", title="Acceptance length per step")
    ax_reward.set(xlabel="GRPO step", ylabel="mean reward", title="Reward per step")
    ax_accept.legend()
    ax_reward.legend()
    if paired:
        ax_paired = axes[2]
        for name, r in paired.items():
            ax_paired.plot(r["steps"], r["held_out_acceptance"], marker="o", markersize=3, label=name,
                           color=colors[name])
            ax_paired.plot(r["steps"], r["held_out_acceptance_initial"], linestyle="--", color=colors[name])
            ax_paired.plot(r["steps"], r["held_out_acceptance_ceiling"], linestyle=":", color=colors[name])
        ax_paired.set(xlabel="GRPO step", ylabel="p(greedy draft) per position",
                      title="Held-out prompts (first seed): serving (solid), initial (dashed),\nceiling max p (dotted)")
        ax_paired.legend(fontsize=7, loc="lower left")
    fig.suptitle(f"lab {report['preset']}: drafter drift, k={report['config']['num_speculative_tokens']}, "
                 f"actor lr {report['config']['actor_lr']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def arguments(description: str = __doc__) -> argparse.ArgumentParser:
    """The GRPO run and learner options (benchmarks/learner_replay.py records its run with the same ones)."""
    parser = common.argument_parser(description)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--runs", default="static,online_kd,online_rwkd,day0")
    parser.add_argument("--train-batch-size", type=int, default=4)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-response-length", type=int, default=64)
    parser.add_argument("--num-speculative-tokens", type=int, default=3)
    parser.add_argument("--actor-lr", type=float, default=5e-4)
    parser.add_argument("--learner-steps", type=int, default=24, help="drafter optimizer steps per RL step")
    parser.add_argument("--learner-lr", type=float, default=2e-3, help="drafter AdamW learning rate")
    parser.add_argument("--learner-replay-steps", type=int, default=6, help="RL steps of trajectories trained on")
    parser.add_argument("--rwkd-floor", type=float, default=0.2, help="weight of a failed rollout in online_rwkd_floor")
    parser.add_argument("--day0-weighting", default="uniform", choices=("uniform", "reward", "advantage"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout-s", type=float, default=3600)
    parser.add_argument("--name", default="drift", help="results file stem: benchmarks/results/NAME.json and .png")
    return parser


def over_seeds(by_seed: dict[str, dict]) -> dict:
    """The mean over seeds of every figure each seed's summary has, with the seeds' own summaries in ``per_seed``."""
    summaries = list(by_seed.values())
    shared = [key for key, value in summaries[0].items()
              if isinstance(value, (int, float)) and all(isinstance(s.get(key), (int, float)) for s in summaries)]
    return {**{key: statistics.fmean(s[key] for s in summaries) for key in shared},
            "seeds": len(summaries), "per_seed": by_seed}


def main() -> None:
    parser = arguments()
    parser.add_argument("--seeds", help="comma-separated seeds: every run repeats per seed (default: --seed)")
    parser.add_argument("--add-seeds", action="store_true",
                        help="add these seeds' runs to the existing results file (same --name) instead of replacing it")
    args = parser.parse_args()
    common.setup_logging()
    names = common.selected(args.runs, RUNS, "--runs", "run")
    seeds = [int(seed) for seed in args.seeds.split(",")] if args.seeds else [args.seed]

    lab = build_lab(args.preset)
    report = {"preset": args.preset, "lab_sizes": lab.sizes, "config": vars(args), "runs": {}, "summary": {}}
    if args.add_seeds:
        report = json.loads((common.RESULTS / f"{args.name}.json").read_text())
        report.setdefault("added", []).append(vars(args))
    for seed in seeds:
        for name in names:  # results are written after every run, so a cut-short benchmark keeps what it measured
            runs = report["runs"].setdefault(name, {})
            runs[str(seed)] = run(lab, name, argparse.Namespace(**{**vars(args), "seed": seed}))
            report["summary"][name] = over_seeds({s: summarise(name, r) for s, r in runs.items()})
            common.write_results(args.name, report, plot)
            print(name, f"seed {seed}", json.dumps(report["summary"][name]["per_seed"][str(seed)]), flush=True)


if __name__ == "__main__":
    main()

"""Rollout speed of respec vs stock vLLM rollouts in the same GRPO job on the CPU lab, measured side by side.

    python benchmarks/respec_vs_vllm.py [--preset demo] [--steps 8]

Runs stock verl GRPO twice on one machine, one after the other, with the same lab, seed and sizes:
``rollout.name=vllm`` and ``rollout.name=respec`` (the lab's warmed-up EAGLE-3 drafter, static k). Both
throughputs come from verl's own metrics (generated tokens / ``timing_s/gen``), so neither side is measured by
our code alone. Step 1 (engine warm-up) is excluded from the means. Writes ``benchmarks/results/
respec_vs_vllm.json`` and ``.png``.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import common
from respec_lab.build import build_lab
from respec_lab.launch import respec_overrides, rollout_tokens_per_s


def run(lab, rollout: str, args) -> dict:
    extra = respec_overrides(drafter_path=lab.drafter_dir, num_speculative_tokens=args.num_speculative_tokens)
    result = common.lab_grpo_run(
        lab, "bench_respec_vs_vllm", rollout, rollout_name=rollout, timeout_s=args.timeout_s, total_steps=args.steps,
        train_batch_size=args.train_batch_size, n=args.n, seed=args.seed,
        extra_overrides=extra if rollout == "respec" else (),
    )
    if not result.ok or len(result.metrics) != args.steps:
        raise SystemExit(f"{rollout} run failed (exit {result.returncode}); see {result.log_path}")
    sequences = args.train_batch_size * args.n
    steps = sorted(result.metrics)
    return {
        "wall_s": result.wall_s,
        "steps": steps,
        "gen_tokens_per_s": [rollout_tokens_per_s(result.metrics[s], sequences) for s in steps],
        "step_s": common.metric_series(result, "timing_s/step"),
        "reward": common.metric_series(result, "critic/score/mean"),
        "accept_length": common.metric_series(result, "respec/accept_length"),
    }


def after_warmup_mean(values: list[float]) -> float:
    return statistics.fmean(values[1:])


def plot(report: dict, path: Path) -> None:
    plt = common.pyplot()
    fig, (ax_speed, ax_accept) = plt.subplots(1, 2, figsize=(11, 4))
    for rollout in ("vllm", "respec"):
        r = report["runs"][rollout]
        ax_speed.plot(r["steps"], r["gen_tokens_per_s"], marker="o", label=rollout)
    ax_speed.set(xlabel="GRPO step", ylabel="rollout tokens/s", title="Rollout throughput (same job, same machine)")
    ax_speed.legend()
    r = report["runs"]["respec"]
    ax_accept.plot(r["steps"], r["accept_length"], marker="o", color="tab:green")
    ax_accept.set(xlabel="GRPO step", ylabel="tokens per verify step", title="respec acceptance length")
    fig.suptitle(f"lab preset {report['preset']}: respec / vllm rollout tokens/s = {report['rollout_speedup']:.2f}x")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--train-batch-size", type=int, default=8)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--num-speculative-tokens", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout-s", type=float, default=2400)
    args = parser.parse_args()
    common.setup_logging()

    lab = build_lab(args.preset)
    runs = {rollout: run(lab, rollout, args) for rollout in ("vllm", "respec")}
    report = {
        "preset": args.preset,
        "lab_sizes": lab.sizes,
        "config": vars(args),
        "runs": runs,
        "rollout_speedup": after_warmup_mean(runs["respec"]["gen_tokens_per_s"])
        / after_warmup_mean(runs["vllm"]["gen_tokens_per_s"]),
        "step_time_ratio": after_warmup_mean(runs["respec"]["step_s"]) / after_warmup_mean(runs["vllm"]["step_s"]),
        "respec_accept_length": after_warmup_mean(runs["respec"]["accept_length"]),
    }
    path = common.write_results("respec_vs_vllm", report, plot)
    print(
        f"rollout tokens/s respec/vllm = {report['rollout_speedup']:.2f}x, step time respec/vllm = "
        f"{report['step_time_ratio']:.2f}x, acceptance length {report['respec_accept_length']:.2f} "
        f"(means over steps 2..{args.steps}); {path}"
    )


if __name__ == "__main__":
    main()

"""Where an RL step's time goes on the CPU lab: verl's own stage timers (``timing_s/*``) per step, for stock vLLM and
respec rollouts, and for respec with the Ray workers' threads as Ray sets them by default.

    python benchmarks/step_breakdown.py [--preset demo] [--steps 4] [--runs respec_one_thread,respec,vllm] [--update]

Every run is stock verl GRPO through the lab's launcher, one after the other:

- ``respec``: respec rollouts with the lab's drafter, the online learner and the adaptive tuner on; the lab's Ray
  workers use every core (``OMP_NUM_THREADS`` = the CPU count, as ``respec_lab.launch`` sets it);
- ``respec_one_thread``: the same with ``OMP_NUM_THREADS=1``, which Ray gives every worker it starts unless the
  variable is set: torch in the actor worker then updates the actor on one core (the lab before it set the variable);
- ``vllm``: stock vLLM rollouts (no speculation), every core.

The GRPO shape per preset is in ``SHAPES`` (the demo's: 8 prompts x 4, responses up to 64 tokens; the real-model
lab's: 4 prompts x 4, T = 1, natural EOS up to 512 tokens, micro-batches of 4 for the 49k-token vocabulary's logits).
Reported per run: every ``timing_s/*`` stage per step and its mean over steps 2..N (step 1 warms the engines up), the
acceptance length, the reward and respec's rollout tokens/s per step; ratios of the stage means of
``respec_one_thread`` and ``vllm`` to ``respec``. Writes benchmarks/results/step_breakdown_<preset>.{json,png}, after
every run, so a cut-short benchmark keeps what it measured; ``--update`` re-runs only ``--runs`` and keeps the other
runs of the existing result file.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import common
from respec_lab.build import build_lab
from respec_lab.launch import respec_overrides
from respec_plugin.core.report import ACCEPT_LENGTH, REWARD, ROLLOUT_TOKENS_PER_S, STEP_TIME

RUNS = ("respec_one_thread", "respec", "vllm")
REFERENCE = "respec"
TIMING_PREFIX = "timing_s/"
REPORTED = (ACCEPT_LENGTH, REWARD, ROLLOUT_TOKENS_PER_S, "response_length/mean", "respec/learner/blocking_s")


@dataclass(frozen=True)
class GrpoShape:
    """The GRPO step a preset's runs take."""

    train_batch_size: int
    n: int
    max_prompt_length: int
    max_response_length: int
    kv_cache_memory_bytes: int
    micro_batch_size: int | None = None  # per rank, for the actor update and the log-prob forwards


SHAPES = {
    "demo": GrpoShape(train_batch_size=8, n=4, max_prompt_length=128, max_response_length=64,
                      kv_cache_memory_bytes=256 << 20),
    "smollm2": GrpoShape(train_batch_size=4, n=4, max_prompt_length=320, max_response_length=512,
                         kv_cache_memory_bytes=1 << 30, micro_batch_size=4),
}


def run(lab, preset: str, name: str, args) -> dict:
    shape = SHAPES[preset]
    extra = []
    if name != "vllm":
        extra += respec_overrides(drafter_path=lab.drafter_dir, num_speculative_tokens=3,
                                  learner={"enable": True}, tuner={"mode": "adaptive"})
    if shape.micro_batch_size is not None:
        extra += [f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={shape.micro_batch_size}",
                  f"actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu={shape.micro_batch_size}"]
    # Ray's default for the workers it starts; the lab's launcher otherwise gives them every core.
    env_overrides = {"OMP_NUM_THREADS": "1"} if name == "respec_one_thread" else {}
    result = common.lab_grpo_run(lab, f"bench_step_breakdown_{preset}", name,
                                 rollout_name="vllm" if name == "vllm" else "respec", timeout_s=args.timeout_s,
                                 env_overrides=env_overrides, total_steps=args.steps,
                                 train_batch_size=shape.train_batch_size, n=shape.n,
                                 max_prompt_length=shape.max_prompt_length,
                                 max_response_length=shape.max_response_length,
                                 kv_cache_memory_bytes=shape.kv_cache_memory_bytes, seed=args.seed,
                                 extra_overrides=extra)
    common.warn_if_cut_short(name, result)
    steps = {step: {key: value for key, value in metrics.items()
                    if key.startswith(TIMING_PREFIX) or key in REPORTED}
             for step, metrics in result.metrics.items()}
    return {"ok": result.ok, "returncode": result.returncode, "wall_s": result.wall_s, "log": str(result.log_path),
            "omp_num_threads": env_overrides.get("OMP_NUM_THREADS", str(os.cpu_count() or 1)), "steps": steps}


def stage_means(r: dict) -> dict[str, float]:
    """Each metric's mean over steps 2..N (every step when the run logged only one)."""
    steps = [m for s, m in r["steps"].items() if s >= 2] or list(r["steps"].values())
    keys = sorted({key for m in steps for key in m})
    return {key: statistics.fmean(m[key] for m in steps if key in m) for key in keys}


def summarise(runs: dict) -> dict:
    means = {name: stage_means(r) for name, r in runs.items() if r["steps"]}
    ratios = {}
    if REFERENCE in means:
        for name, m in means.items():
            if name != REFERENCE:
                ratios[f"{name}/{REFERENCE}"] = {key: m[key] / means[REFERENCE][key] for key in m
                                                 if key.startswith(TIMING_PREFIX) and means[REFERENCE].get(key)}
    return {"means_steps_2_to_n": means, "ratios": ratios}


def plot(report: dict, path: Path) -> None:
    """Stacked stage means per run (the stages verl times inside ``timing_s/step``)."""
    plt = common.pyplot()
    means = report["summary"]["means_steps_2_to_n"]
    stages = sorted({key for m in means.values() for key in m if key.startswith(TIMING_PREFIX) and key != STEP_TIME
                     and "/" not in key[len(TIMING_PREFIX):]})
    fig, ax = plt.subplots(figsize=(9, 4.5))
    names = list(means)
    bottoms = [0.0] * len(names)
    for stage in stages:
        values = [means[n].get(stage, 0.0) for n in names]
        ax.barh(names, values, left=bottoms, label=stage[len(TIMING_PREFIX):])
        bottoms = [b + v for b, v in zip(bottoms, values)]
    ax.plot([means[n].get(STEP_TIME, 0.0) for n in names], names, "k|", markersize=20, label="step")
    ax.set_xlabel("seconds per RL step (mean of steps 2..N)")
    ax.set_title(f"{report['preset']} lab: verl's stage timers (timing_s/*), 2 CPU cores")
    ax.legend(fontsize=7, ncol=3, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--preset", default="demo", choices=sorted(SHAPES))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--runs", default=",".join(RUNS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout-s", type=float, default=1800, help="per run")
    parser.add_argument("--update", action="store_true", help="keep the result file's other runs")
    args = parser.parse_args()
    common.setup_logging()
    names = common.selected(args.runs, RUNS, "--runs", "run")
    start = time.monotonic()
    lab = build_lab(args.preset)
    report = {"preset": args.preset, "lab_sizes": lab.sizes, "shape": vars(SHAPES[args.preset]), "config": vars(args),
              "cpu_count": os.cpu_count(), "runs": {}}
    stem = f"step_breakdown_{args.preset}"
    if args.update:
        kept = json.loads((common.RESULTS / f"{stem}.json").read_text())["runs"]
        report["runs"] = {name: {**r, "steps": {int(step): m for step, m in r["steps"].items()}}
                          for name, r in kept.items() if name not in names}
    for name in names:
        report["runs"][name] = run(lab, args.preset, name, args)
        report["summary"] = summarise(report["runs"])
        report["wall_s"] = time.monotonic() - start
        common.write_results(stem, report, plot)
        print(f"{name}: exit {report['runs'][name]['returncode']}, "
              f"{json.dumps(report['summary']['means_steps_2_to_n'].get(name, {}), indent=1)}", flush=True)
    print(json.dumps(report["summary"]["ratios"], indent=1))


if __name__ == "__main__":
    main()

"""GRPO-shaped rollouts on the real-model lab (preset smollm2): stock vLLM against respec's speculation, static and
tuned, and against the oracle.

    python benchmarks/rollout_real.py [--prompts 8] [--repeats 3] [--calibration-rounds 10]
                                      [--draft-sampling greedy|probabilistic] [--name rollout_real]

A rollout is what verl's agent loop asks of vLLM in one GRPO step: ``--prompts`` prompts of the lab's validation
set, n = 4 samples each, temperature 1, natural EOS, the lab's response limit (512). Sampled rollouts differ in
length from one run to the next, and one runaway response decides a rollout's time, so configurations are compared
on the same work: each repeat first samples a rollout with stock vLLM (natural EOS; its time is stock vLLM's
rollout time), then every configuration regenerates those prompts with each response's length fixed to the length
that rollout sampled (temperature 1, ``ignore_eos``): the same batch size at every token position, the same long
tail, and tokens sampled from the actor as in RL.

Configurations, on two engines that stay up for the whole run (spec_engines):
- ``vllm``: stock vLLM (plain engine);
- ``k=1`` .. ``k=4``: respec's EAGLE-3 engine with one static k (``k=0`` too: SD off inside that engine);
- ``tuner``: respec's adaptive tuner, after ``--calibration-rounds`` rollouts it observed and re-planned after,
  measured with the schedule it settled on;
- ``oracle``: per batch-size bucket, the static k whose decode steps produced the most tokens per second in the
  calibration sweep (every static k once), installed as a schedule.
Within a repeat the configurations run in a fresh random order; ratios are per repeat (rollout time of stock vLLM over
that of the configuration, on the same lengths) and their minimum and median are reported. Per batch-size bucket the
benchmark also compares the decode steps of the tuner with those of SD off (k = 0) and of the best static k. Writes
benchmarks/results/<name>.{json,png}.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import statistics
import time
from collections import defaultdict

import common
import spec_engines
from respec_lab.build import PRESETS, build_lab
from respec_lab.data import read_prompts
from respec_lab.models import prompt_ids
from respec_plugin.core.config import DraftSampling, TunerConfig, choices
from respec_plugin.core.spec_stats import RequestSpecStats, aggregate_step_metrics
from respec_plugin.core.tuner.channel import StepRecord, take_steps
from respec_plugin.core.tuner.policy import Tuner

PRESET = "smollm2"
SAMPLES_PER_PROMPT = 4
K_MAX = 4
STATIC_KS = (0, 1, 2, 3, 4)
# Batch-size buckets of the per-bucket comparisons and of the oracle's schedule: [lo, hi] inclusive.
BUCKETS = ((1, 1), (2, 3), (4, 7), (8, 15), (16, 31), (32, 63), (64, 128))


def rollout(llm, prompts: list[list[int]], lengths: list[int] | None, max_tokens: int) -> dict:
    """One rollout of ``prompts`` x n samples at temperature 1: natural EOS up to ``max_tokens`` when ``lengths`` is
    None, else each sample generates exactly its length. Returns its wall seconds, the samples' lengths and, from an
    EAGLE-3 engine, the per-request speculation records. It starts from an empty prefix cache, as an RL step's new
    prompts do (only the n samples of a prompt share its blocks). No per-request seeds: vLLM CPU fails on a seeded
    request whose prompt is prefilled in chunks (the engines are seeded when they start)."""
    from vllm import SamplingParams

    n = SAMPLES_PER_PROMPT
    if lengths is None:
        params = SamplingParams(n=n, temperature=1.0, max_tokens=max_tokens, detokenize=False)
        requests = [{"prompt_token_ids": p} for p in prompts]
    else:  # one request per sample, so that each keeps its own length
        params = [SamplingParams(temperature=1.0, max_tokens=length, ignore_eos=True, detokenize=False)
                  for length in lengths]
        requests = [{"prompt_token_ids": p} for p in prompts for _ in range(n)]
    if not llm.reset_prefix_cache():
        raise RuntimeError("the engine refused to reset its prefix cache between rollouts")
    start = time.perf_counter()
    outputs = llm.generate(requests, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    completions = [c for o in outputs for c in o.outputs]
    records = [RequestSpecStats.from_vllm(c.spec_decode_metrics.per_step_drafted,
                                          c.spec_decode_metrics.per_step_accepted,
                                          num_output_tokens=len(c.token_ids), num_speculative_tokens=K_MAX,
                                          drafter_version=1, start_time=0.0, end_time=0.0)
               for c in completions if c.spec_decode_metrics is not None]
    return {"seconds": seconds, "lengths": [len(c.token_ids) for c in completions], "records": records}


def bucket_of(batch_size: int) -> str:
    return next(f"{lo}-{hi}" for lo, hi in BUCKETS if lo <= batch_size <= hi)


def bucket_speeds(steps: list[StepRecord]) -> dict[str, dict[str, float]]:
    """Per batch-size bucket, over decode steps: tokens generated per second of step time, and the step count."""
    tokens, seconds, count = defaultdict(int), defaultdict(float), defaultdict(int)
    for step in steps:
        if step.is_decode:
            b = bucket_of(step.batch_size)
            tokens[b] += step.num_generated_tokens
            seconds[b] += step.duration_s
            count[b] += 1
    return {b: {"tokens_per_s": tokens[b] / seconds[b], "steps": count[b]} for b in tokens if seconds[b] > 0}


def oracle_schedule(speeds_by_k: dict[int, dict[str, dict]], max_num_seqs: int, min_steps: int):
    """The best static k of each bucket measured with at least ``min_steps`` decode steps for every k (other
    buckets take the nearest measured bucket's k), as a schedule [(lo, hi, k)] with equal neighbours merged."""
    best = {}
    for lo, hi in BUCKETS:
        b = f"{lo}-{hi}"
        if all(speeds_by_k[k].get(b, {}).get("steps", 0) >= min_steps for k in speeds_by_k):
            best[(lo, hi)] = max(speeds_by_k, key=lambda k: speeds_by_k[k][b]["tokens_per_s"])
    if not best:
        raise RuntimeError("the calibration sweep measured no batch-size bucket with enough decode steps")
    schedule: list[tuple[int, int, int]] = []
    for lo, hi in BUCKETS:
        if lo > max_num_seqs:
            break
        nearest = min(best, key=lambda r: abs(r[0] - lo))
        k = best.get((lo, hi), best[nearest])
        hi = min(hi, max_num_seqs)
        if schedule and schedule[-1][2] == k:
            schedule[-1] = (schedule[-1][0], hi, k)
        else:
            schedule.append((lo, hi, k))
    return schedule, {f"{lo}-{hi}": k for (lo, hi), k in best.items()}


def run(args) -> dict:
    from transformers import AutoTokenizer

    lab = build_lab(PRESET)
    max_tokens = PRESETS[PRESET].max_response_length
    tokenizer = AutoTokenizer.from_pretrained(lab.actor_dir)
    prompts = [prompt_ids(tokenizer, m) for m in read_prompts(lab.val_parquet)]
    needed = args.prompts * (args.calibration_rounds + 1 + args.repeats)
    if needed > len(prompts):
        raise SystemExit(f"--prompts x (calibration rounds + 1 + repeats) = {needed} prompts; the lab has "
                         f"{len(prompts)}: lower one of them.")
    prompt_sets = [prompts[i * args.prompts:(i + 1) * args.prompts] for i in range(needed // args.prompts)]
    max_num_seqs = args.prompts * SAMPLES_PER_PROMPT
    max_model_len = max(map(len, prompts)) + max_tokens
    plain, _ = spec_engines.engine(lab, speculative=False, k_max=K_MAX, max_num_seqs=max_num_seqs,
                                   max_model_len=max_model_len)
    speculative, control_dir = spec_engines.engine(lab, speculative=True, k_max=K_MAX, max_num_seqs=max_num_seqs,
                                                   max_model_len=max_model_len, draft_sampling=args.draft_sampling)
    version = 0

    def run_config(name: str, schedule, prompt_set, lengths) -> dict:
        nonlocal version
        if name == "vllm":
            return rollout(plain, prompt_set, lengths, max_tokens)
        version += 1
        spec_engines.install(control_dir, schedule, version)
        result = rollout(speculative, prompt_set, lengths, max_tokens)
        result["steps"] = take_steps(control_dir)
        return result

    for llm in (plain, speculative):  # warm-up
        rollout(llm, prompt_sets[0][:2], [8] * 2 * SAMPLES_PER_PROMPT, max_tokens)

    # Calibration: the lengths of one stock rollout per set; every static k once (the oracle's sweep), then the tuner.
    natural = rollout(plain, prompt_sets[0], None, max_tokens)
    sweep = {k: run_config(f"k={k}", [(1, max_num_seqs, k)], prompt_sets[0], natural["lengths"])
             for k in STATIC_KS}
    oracle, oracle_best = oracle_schedule({k: bucket_speeds(r["steps"]) for k, r in sweep.items()}, max_num_seqs,
                                          args.min_steps)
    logging.info("oracle schedule from the sweep: %s", oracle)
    tuner = Tuner(TunerConfig(mode="adaptive", k_max=K_MAX, explore=args.explore, min_steps=args.min_steps),
                  default_k=args.default_k, max_batch_size=max_num_seqs, seed=args.seed)
    calibration = []
    for round_index in range(args.calibration_rounds):
        prompt_set = prompt_sets[1 + round_index]
        lengths = rollout(plain, prompt_set, None, max_tokens)["lengths"]
        version = tuner.version = max(version, tuner.version) + 1  # the channel's versions only count up
        spec_engines.install(control_dir, tuner.current_schedule(), version, tuner.alternate_schedule())
        result = rollout(speculative, prompt_set, lengths, max_tokens)
        metrics = tuner.observe(take_steps(control_dir), result["records"])
        calibration.append({"round": round_index, "schedule": tuner.current_schedule(),
                            "trials": tuner.alternate_schedule(), "seconds": result["seconds"], "metrics": metrics})
        tuner.schedule()
        logging.info("calibration round %d: %.1f s -> next schedule %s", round_index, result["seconds"],
                     tuner.current_schedule())
    tuner_schedule = tuner.current_schedule()

    schedules = {"vllm": None, **{f"k={k}": [(1, max_num_seqs, k)] for k in STATIC_KS}, "tuner": tuner_schedule,
                 "oracle": oracle}
    order = random.Random(args.seed)
    repeats = []
    for repeat in range(args.repeats):
        prompt_set = prompt_sets[1 + args.calibration_rounds + repeat]
        natural = rollout(plain, prompt_set, None, max_tokens)
        measured = {}
        for name in order.sample(list(schedules), len(schedules)):
            measured[name] = run_config(name, schedules[name], prompt_set, natural["lengths"])
        repeats.append({
            "stock_vllm_natural_s": natural["seconds"], "lengths": sorted(natural["lengths"]),
            "seconds": {name: r["seconds"] for name, r in measured.items()},
            "acceptance_length": {name: aggregate_step_metrics(r["records"])["respec/accept_length"]
                                  for name, r in measured.items() if r["records"]},
            "bucket_speeds": {name: bucket_speeds(r["steps"]) for name, r in measured.items() if "steps" in r},
            # Engine steps that ran prompt tokens (prefill, alone or mixed with decodes), where the drafter runs too.
            "prompt_steps_s": {name: sum(s.duration_s for s in r["steps"] if not s.is_decode)
                               for name, r in measured.items() if "steps" in r},
            "decode_steps_s": {name: sum(s.duration_s for s in r["steps"] if s.is_decode)
                               for name, r in measured.items() if "steps" in r},
            "trace": {name: [{"t": s.end_time - measured[name]["steps"][0].end_time, "batch_size": s.batch_size,
                              "k": s.k} for s in measured[name]["steps"]] for name in ("tuner", "oracle")},
        })
        logging.info("repeat %d: %s", repeat, {n: round(s, 1) for n, s in repeats[-1]["seconds"].items()})
        common.write_results(f"{args.name}.partial", {"repeats": repeats})
    for llm in (speculative, plain):
        spec_engines.shutdown(llm)
    shutil.rmtree(control_dir, ignore_errors=True)
    return summarize({"preset": PRESET, "lab_sizes": lab.sizes, "lab_metrics": lab.metrics, "config": vars(args),
                      "oracle": {"schedule": oracle, "best_k_by_bucket": oracle_best,
                                 "sweep_bucket_speeds": {k: bucket_speeds(r["steps"]) for k, r in sweep.items()}},
                      "tuner": {"schedule": tuner_schedule, "calibration": calibration, "state": tuner.state_dict()},
                      "repeats": repeats})


def _stats(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "per_rollout": values}


def summarize(report: dict) -> dict:
    """Per repeat ratios of rollout times (same lengths), and per bucket the tuner's decode steps against k = 0 and the
    best static k; their minimum over repeats and buckets are the headline figures."""
    repeats = report["repeats"]

    def speedup(a: str, b: str) -> list[float]:  # rollout time of b over that of a: > 1 when a is faster
        return [r["seconds"][b] / r["seconds"][a] for r in repeats]

    report["respec_vs_vllm"] = _stats(speedup("tuner", "vllm"))
    report["respec_vs_oracle"] = _stats(speedup("tuner", "oracle"))
    report["oracle_vs_vllm"] = _stats(speedup("oracle", "vllm"))
    report["static_vs_vllm"] = {f"k={k}": _stats(speedup(f"k={k}", "vllm")) for k in STATIC_KS}
    by_bucket = {}
    for lo, hi in BUCKETS:
        b = f"{lo}-{hi}"
        rows = [r["bucket_speeds"] for r in repeats if all(b in r["bucket_speeds"][name] for name in r["bucket_speeds"])]
        if not rows:
            continue
        statics = [f"k={k}" for k in STATIC_KS if k > 0]
        best = max(statics, key=lambda name: statistics.median(row[name][b]["tokens_per_s"] for row in rows))
        tuner = [row["tuner"][b]["tokens_per_s"] for row in rows]
        by_bucket[b] = {
            "best_static": best,
            "tuner_vs_sd_off": statistics.median(t / row["k=0"][b]["tokens_per_s"] for t, row in zip(tuner, rows)),
            "tuner_vs_best_static": statistics.median(t / row[best][b]["tokens_per_s"] for t, row in zip(tuner, rows)),
            "decode_steps_tuner": sum(row["tuner"][b]["steps"] for row in rows),
        }
    report["tuner_by_bucket"] = by_bucket
    # Whole rollouts (the long tail) count as one more cell, against stock vLLM and the best static k.
    best_static = max((f"k={k}" for k in STATIC_KS if k > 0),
                      key=lambda name: report["static_vs_vllm"][name]["median"])
    rollout_vs_sd_off = report["respec_vs_vllm"]["median"]
    rollout_vs_best = statistics.median(speedup("tuner", best_static))
    report["tuner_vs_sd_off_min"] = min([rollout_vs_sd_off, *(c["tuner_vs_sd_off"] for c in by_bucket.values())])
    report["tuner_vs_best_static_min"] = min([rollout_vs_best,
                                              *(c["tuner_vs_best_static"] for c in by_bucket.values())])
    report["rollout_best_static"] = best_static
    return report


def plot(report: dict, path) -> None:
    plt = common.pyplot()
    fig, (ax_bars, ax_trace) = plt.subplots(1, 2, figsize=(13, 4.5))
    names = ["vllm", *[f"k={k}" for k in STATIC_KS], "oracle", "tuner"]
    medians = [statistics.median(r["seconds"]["vllm"] / r["seconds"][name] for r in report["repeats"])
               for name in names]
    ax_bars.bar(names, medians, color=["tab:gray"] + ["tab:blue"] * len(STATIC_KS) + ["tab:green", "tab:red"])
    ax_bars.axhline(1.0, color="black", linewidth=0.8)
    ax_bars.set(ylabel="rollout speed vs stock vLLM (median)", title="GRPO-shaped rollouts, same lengths")
    trace = report["repeats"][-1]["trace"]["tuner"]
    ax_trace.plot([s["t"] for s in trace], [s["k"] for s in trace], drawstyle="steps-post", color="tab:red",
                  label="k (tuner)")
    ax_trace.set(xlabel="seconds into the rollout", ylabel="k", title="k against the running batch (last repeat)")
    ax_batch = ax_trace.twinx()
    ax_batch.plot([s["t"] for s in trace], [s["batch_size"] for s in trace], color="tab:gray", alpha=0.6)
    ax_batch.set_ylabel("running requests")
    fig.suptitle(f"respec on the {report['preset']} lab (vLLM CPU, EAGLE-3, temperature 1): tuner "
                 f"{report['respec_vs_vllm']['median']:.2f}x stock vLLM, {report['respec_vs_oracle']['median']:.2f}x "
                 "the oracle")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--prompts", type=int, default=8, help="prompts per rollout (n = 4 samples each)")
    parser.add_argument("--repeats", type=int, default=3)
    # A trial in a bucket the rollout drains through in a few steps needs several rollouts to settle (the tuner's
    # docstring); an RL run gives it hundreds.
    parser.add_argument("--calibration-rounds", type=int, default=10)
    parser.add_argument("--default-k", type=int, default=3)
    parser.add_argument("--explore", type=float, default=0.1)
    parser.add_argument("--min-steps", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--draft-sampling", choices=choices(DraftSampling), default="greedy",
                        help="how the EAGLE-3 engine drafts (respec.draft_sampling)")
    parser.add_argument("--name", default="rollout_real", help="results file stem")
    args = parser.parse_args()
    common.setup_logging()
    report = run(args)
    common.write_results(args.name, report, plot)
    print(json.dumps({key: report[key] for key in ("respec_vs_vllm", "respec_vs_oracle", "oracle_vs_vllm",
                                                     "tuner_vs_sd_off_min", "tuner_vs_best_static_min")}, indent=2))


if __name__ == "__main__":
    main()

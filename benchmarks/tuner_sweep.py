"""The SD configuration tuner against SD-off and every static k, on the lab with vLLM CPU, in one run.

    python benchmarks/tuner_sweep.py [--preset demo] [--calibration-rounds 6] [--from-partial]

1. Batch sweep: N in {1, 4, 16, 64, 256} greedy requests at once (fixed length, ignore_eos, so every
   configuration generates the same tokens), generated tokens / wall seconds for SD-off (a plain vLLM engine),
   static k in {1, 2, 3, 4, 6}, and the tuner. Static k and the tuner run on one EAGLE-3 engine with
   k_max = 6 and respec's scheduler: static k is the one-entry schedule [(1, max, k)] installed through the
   tuner's channel, exactly as the tuner installs its own. That engine skips the drafter in decode steps at k = 0,
   as respec's server sets it up (``tuner.k0_skips_drafter``); ``k=0`` is measured on it (what the tuner's SD-off
   costs against a plain engine).
2. Long-tail rollout: many requests whose lengths spread over a wide range, all submitted at once, so the
   batch drains to one request; every static k vs the tuner, and the tuner's k at every engine step (PNG).
The tuner learns only from its own runs: ``--calibration-rounds`` rounds of (sweep + long-tail rollout) under
its current schedule and trials (a challenger k in alternating blocks of steps), exploring as configured, with one
update per round (as between RL steps); it is then measured with the ks its trials settled on, without trial
blocks. The engines stay up and the configurations are measured per cell (batch size or long tail), after one
unmeasured round of every configuration: ``--repeats`` times, every other configuration once in a fresh random
order, with the tuner's schedule run before, between and after them; each configuration's tokens/s is taken
relative to the mean of the tuner's runs just before and after it (seconds apart, so a steady drift of the 2-core
machine's speed cancels), and ratios are medians over repeats. The engine steps each EAGLE-3 cell took are kept
too, so the tuner can be checked against the static k its schedule runs there (the same computation). Writes
benchmarks/results/tuner_sweep.json (medians, ratios and every sample) and .png.
"""

from __future__ import annotations

import json
import logging
import random
import statistics
import time
from pathlib import Path

import common
import spec_engines
from respec_plugin.core.config import TunerConfig
from respec_lab.build import build_lab
from respec_lab.data import read_problems
from respec_lab.models import chat_prompt_ids
from respec_plugin.core.spec_stats import RequestSpecStats
from respec_plugin.core.tuner.channel import take_steps
from respec_plugin.core.tuner.policy import Tuner

PARTIAL = "tuner_sweep.partial"  # benchmarks/results/tuner_sweep.partial.json: a run cut short
BATCH_SIZES = (1, 4, 16, 64, 256)
STATIC_KS = (1, 2, 3, 4, 6)
K_MAX = 6
MAX_NUM_SEQS = 256


def engine(lab, tuned: bool):
    """(LLM, control directory): the plain engine, or the EAGLE-3 one with respec's scheduler (spec_engines)."""
    return spec_engines.engine(lab, speculative=tuned, k_max=K_MAX, max_num_seqs=MAX_NUM_SEQS)


def generate(llm, prompts, lengths) -> tuple[int, float, list[RequestSpecStats]]:
    """Generate all prompts at once; (generated tokens, wall seconds, per-request spec stats)."""
    from vllm import SamplingParams

    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lengths]
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    seconds = time.perf_counter() - start
    records = []
    for output in outputs:
        metrics = output.outputs[0].spec_decode_metrics
        if metrics is not None:
            records.append(RequestSpecStats.from_vllm(
                metrics.per_step_drafted, metrics.per_step_accepted, num_output_tokens=len(output.outputs[0].token_ids),
                num_speculative_tokens=K_MAX, drafter_version=0, start_time=0.0, end_time=0.0))
    return sum(len(o.outputs[0].token_ids) for o in outputs), seconds, records


class Workloads:
    def __init__(self, prompts, args):
        self.prompts, self.args = prompts, args

    def sweep(self, batch_size: int):
        """One measurement at this concurrency: repeated for small batches so each covers enough tokens."""
        repeats = max(1, self.args.min_sequences // batch_size)
        return [self.prompts[:batch_size]] * repeats, [self.args.max_tokens] * batch_size

    def long_tail(self):
        n, lo, hi = self.args.tail_requests, self.args.tail_min_tokens, self.args.tail_max_tokens
        lengths = [lo + (hi - lo) * i // (n - 1) for i in range(n)]
        return [self.prompts[i % len(self.prompts)] for i in range(n)], lengths


def measure_sweep(llm, workloads, batch_size) -> tuple[float, list[RequestSpecStats]]:
    batches, lengths = workloads.sweep(batch_size)
    tokens, seconds, records = 0, 0.0, []
    for prompts in batches:
        t, s, r = generate(llm, prompts, lengths)
        tokens, seconds, records = tokens + t, seconds + s, records + r
    return tokens / seconds, records


def measure_cell(llm, workloads, cell: str) -> float:
    """Tokens/s of one cell: a batch size of the sweep, or the long-tail rollout."""
    if cell == "long_tail":
        tokens, seconds, _ = generate(llm, *workloads.long_tail())
        return tokens / seconds
    return measure_sweep(llm, workloads, int(cell))[0]


def save_partial(report: dict) -> None:
    """What is measured so far, in case the run is cut short (the full report replaces it)."""
    common.write_results(PARTIAL, report)


def run(args) -> dict:
    from transformers import AutoTokenizer

    lab = build_lab(args.preset)
    tokenizer = AutoTokenizer.from_pretrained(lab.actor_dir)
    problems = read_problems(lab.val_parquet)
    prompts = [chat_prompt_ids(tokenizer, problems[i % len(problems)].question) for i in range(MAX_NUM_SEQS)]
    workloads = Workloads(prompts, args)
    report: dict = {"preset": args.preset, "lab_sizes": lab.sizes, "config": vars(args)}

    # The engines stay up for the whole run, so every configuration is measured under the same conditions.
    plain, _ = engine(lab, tuned=False)
    generate(plain, prompts[:4], [8] * 4)  # warm-up
    speculative, control_dir = engine(lab, tuned=True)
    generate(speculative, prompts[:4], [8] * 4)

    # The tuner: calibration rounds (its own runs only), then measured with the ks its trials settled on.
    config = TunerConfig(mode="adaptive", k_max=K_MAX, explore=args.explore, min_steps=args.min_steps)
    tuner = Tuner(config, default_k=args.default_k, max_batch_size=MAX_NUM_SEQS, seed=args.seed)
    tuner.version = 1
    calibration = []
    for round_index in range(args.calibration_rounds):
        spec_engines.install(control_dir, tuner.current_schedule(), tuner.version, tuner.alternate_schedule())
        records, speeds = [], {}
        for b in BATCH_SIZES:
            speeds[str(b)], r = measure_sweep(speculative, workloads, b)
            records += r
        tokens, seconds, r = generate(speculative, *workloads.long_tail())
        speeds["long_tail"] = tokens / seconds
        metrics = tuner.observe(take_steps(control_dir), records + r)
        calibration.append({"round": round_index, "schedule": tuner.current_schedule(),
                            "trials": tuner.alternate_schedule(), "tokens_per_s": speeds, "metrics": metrics})
        tuner.schedule()
        save_partial({**report, "calibration": calibration})
        logging.info("calibration round %d: %s -> next schedule %s", round_index, speeds, tuner.current_schedule())
    # Measured: the ks the trials settled on (a trial still running counts its incumbent), without trial blocks.
    tuner_schedule = tuner.current_schedule()
    report["tuner_state"] = tuner.state_dict()

    # SD-off (the plain engine), every static k (one-entry schedules) and "k=0" (SD-off inside the EAGLE-3 engine: what
    # the tuner's k = 0 costs against the plain engine), each measured between two runs of the tuner's schedule.
    schedules = {"sd_off": None, **{f"k={k}": [(1, MAX_NUM_SEQS, k)] for k in (0, *STATIC_KS)}, "tuner": tuner_schedule}
    others = [name for name in schedules if name != "tuner"]
    cells = [*map(str, BATCH_SIZES), "long_tail"]
    samples: dict = {name: {cell: [] for cell in cells} for name in schedules}
    relative: dict = {name: {cell: [] for cell in cells} for name in others}
    engine_steps: dict = {name: {cell: [] for cell in cells} for name in schedules if name != "sd_off"}
    version = tuner.version
    trace = []

    def measure(name: str, cell: str, keep: bool) -> float:
        nonlocal version, trace
        if name != "sd_off":
            version += 1
            spec_engines.install(control_dir, schedules[name], version)
        tokens_per_s = measure_cell(plain if name == "sd_off" else speculative, workloads, cell)
        steps = take_steps(control_dir)  # none unless the EAGLE-3 engine ran
        if keep:
            samples[name][cell].append(tokens_per_s)
            if name != "sd_off":  # a schedule running the same k here takes as many steps (the same computation)
                engine_steps[name][cell].append(len(steps))
            if name == "tuner" and cell == "long_tail":
                trace = [{"t": s.end_time - steps[0].end_time, "batch_size": s.batch_size, "k": s.k} for s in steps]
        return tokens_per_s

    order = random.Random(args.seed)
    for cell in cells:  # a first, unmeasured round: the static schedules had not run yet (the tuner's had)
        for name in order.sample(list(schedules), len(schedules)):
            measure(name, cell, keep=False)
    for repeat in range(args.repeats):
        for cell in cells:
            # The tuner runs before, between and after the others (in a fresh random order): each configuration is
            # compared with the mean of the tuner's runs just before and just after it, which cancels a steady drift
            # of the machine's speed (~10% within tens of seconds on this 2-core machine).
            tuner_runs = [measure("tuner", cell, keep=True)]
            for name in order.sample(others, len(others)):
                tokens_per_s = measure(name, cell, keep=True)
                tuner_runs.append(measure("tuner", cell, keep=True))
                relative[name][cell].append(tokens_per_s / statistics.fmean(tuner_runs[-2:]))
        save_partial({**report, "calibration": calibration, "samples": samples, "relative_to_tuner": relative,
                      "engine_steps": engine_steps, "long_tail_trace": trace})
        logging.info("repeat %d of %d measured", repeat + 1, args.repeats)
    for llm in (speculative, plain):
        spec_engines.shutdown(llm)

    return summarize({**report, "calibration": calibration, "samples": samples, "relative_to_tuner": relative,
                      "engine_steps": engine_steps, "long_tail_trace": trace})


def summarize(report: dict) -> dict:
    """Medians and ratios from a report's samples; also completes a partial report of a run cut short. The tuner's
    schedule is the one its last calibration round left (the choice changes only when a round is observed)."""
    samples = report["samples"]
    report["tokens_per_s"] = {name: {cell: statistics.median(values) for cell, values in by_cell.items()}
                              for name, by_cell in samples.items()}
    report["tuner"] = {"schedule": report["calibration"][-1]["schedule"], "calibration": report["calibration"],
                       "state": report.pop("tuner_state", None), "long_tail_trace": report.pop("long_tail_trace", [])}
    report["repeats_measured"] = len(report["relative_to_tuner"]["sd_off"]["long_tail"])
    report["ratios"] = ratios(report)
    return report


def paired_ratio(relative: dict, a: str, b: str, cell: str) -> float:
    """Median over repeats of a's tokens/s over b's, both taken relative to the tuner's runs around them in that
    repeat (a or b may be the tuner itself)."""
    def against_tuner(name):
        return relative[name][cell] if name != "tuner" else [1.0] * len(relative["sd_off"][cell])
    return statistics.median(x / y for x, y in zip(against_tuner(a), against_tuner(b)))


def ratios(report: dict) -> dict:
    relative = report["relative_to_tuner"]
    static = [f"k={k}" for k in STATIC_KS]
    out = {"by_batch": {}}
    for b in map(str, BATCH_SIZES):
        best = max(static, key=lambda name: statistics.median(relative[name][b]))
        tuner_k = next(k for start, end, k in report["tuner"]["schedule"] if start <= int(b) <= end)
        out["by_batch"][b] = {"best_static": best, "tuner_k": tuner_k,
                              "tuner_vs_best_static": paired_ratio(relative, "tuner", best, b),
                              "tuner_vs_sd_off": paired_ratio(relative, "tuner", "sd_off", b),
                              # The same computation in two schedules: ~1.0 unless the measurement is off.
                              "tuner_vs_static_of_its_k": paired_ratio(relative, "tuner", f"k={tuner_k}", b),
                              "best_static_vs_sd_off": paired_ratio(relative, best, "sd_off", b),
                              "k0_in_eagle_engine_vs_sd_off": paired_ratio(relative, "k=0", "sd_off", b)}
    best_tail = max(static, key=lambda name: statistics.median(relative[name]["long_tail"]))
    out["long_tail"] = {"best_static": best_tail,
                        "tuner_vs_best_static": paired_ratio(relative, "tuner", best_tail, "long_tail"),
                        "tuner_vs_sd_off": paired_ratio(relative, "tuner", "sd_off", "long_tail")}
    return out


def plot(report: dict, path: Path) -> None:
    plt = common.pyplot()
    fig, (ax_sweep, ax_trace) = plt.subplots(1, 2, figsize=(13, 4.5))
    names = ["sd_off", *[f"k={k}" for k in (0, *STATIC_KS)], "tuner"]
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [paired_ratio(report["relative_to_tuner"], name, "sd_off", str(b)) for b in BATCH_SIZES]
        ax_sweep.bar([j + i * width for j in range(len(BATCH_SIZES))], values, width, label=name)
    ax_sweep.set_xticks([j + 0.4 - width / 2 for j in range(len(BATCH_SIZES))], [str(b) for b in BATCH_SIZES])
    ax_sweep.axhline(1.0, color="black", linewidth=0.8)
    ax_sweep.set(xlabel="concurrent requests", ylabel="tokens/s relative to SD-off", title="Batch sweep")
    ax_sweep.legend(fontsize=7, ncol=2)
    trace = report["tuner"]["long_tail_trace"]
    if not trace:  # partial reports of runs before the trace was saved with them
        ax_trace.text(0.5, 0.5, "trace not recorded in this run", ha="center", transform=ax_trace.transAxes)
    ax_trace.plot([s["t"] for s in trace], [s["k"] for s in trace], drawstyle="steps-post", color="tab:red",
                  label="k (tuner)")
    ax_trace.set(xlabel="seconds into the rollout", ylabel="k", title="Long-tail rollout: k per engine step")
    ax_batch = ax_trace.twinx()
    ax_batch.plot([s["t"] for s in trace], [s["batch_size"] for s in trace], color="tab:gray", alpha=0.6,
                  label="running requests")
    ax_batch.set_ylabel("running requests")
    r = report["ratios"]["long_tail"]
    ax_trace.set_title(f"Long tail: tuner {r['tuner_vs_best_static']:.2f}x best static ({r['best_static']}), "
                       f"{r['tuner_vs_sd_off']:.2f}x SD-off", fontsize=9)
    fig.suptitle(f"respec tuner on the {report['preset']} lab (vLLM CPU, EAGLE-3, greedy)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--max-tokens", type=int, default=64, help="response length in the batch sweep")
    parser.add_argument("--min-sequences", type=int, default=8, help="small batches repeat to this many sequences")
    parser.add_argument("--tail-requests", type=int, default=64)
    parser.add_argument("--tail-min-tokens", type=int, default=16)
    parser.add_argument("--tail-max-tokens", type=int, default=256)
    parser.add_argument("--calibration-rounds", type=int, default=6)
    parser.add_argument("--default-k", type=int, default=3)
    parser.add_argument("--explore", type=float, default=0.1)
    parser.add_argument("--min-steps", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=4, help="measured rounds per cell (ratios: medians over them)")
    parser.add_argument("--from-partial", action="store_true",
                        help="summarize benchmarks/results/tuner_sweep.partial.json (a run cut short), run nothing")
    args = parser.parse_args()
    common.setup_logging()

    if args.from_partial:  # a run cut short: its measured repeats, summarized
        report = summarize(json.loads((common.RESULTS / f"{PARTIAL}.json").read_text()))
    else:
        report = run(args)
    common.write_results("tuner_sweep", report, plot)
    print(json.dumps(report["ratios"], indent=2))
    for name, by_cell in report["tokens_per_s"].items():
        print(f"{name:>8}: " + "  ".join(f"N={b}: {by_cell[str(b)]:8.1f}" for b in BATCH_SIZES)
              + f"  long tail: {by_cell['long_tail']:8.1f} tok/s (medians)")


if __name__ == "__main__":
    main()

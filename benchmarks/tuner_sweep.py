"""The SD configuration tuner against SD-off and every static k, on the lab with vLLM CPU, in one run.

    python benchmarks/tuner_sweep.py [--preset demo] [--calibration-rounds 6] [--from-partial]

1. Batch sweep: N in {1, 4, 16, 64, 256} greedy requests at once (fixed length, ignore_eos, so every
   configuration generates the same tokens), generated tokens / wall seconds for SD-off (a plain vLLM engine),
   static k in {1, 2, 3, 4, 6}, and the tuner. Static k and the tuner run on one EAGLE-3 engine with
   k_max = 6 and respec's scheduler: static k is the one-entry schedule [(1, max, k)] installed through the
   tuner's channel, exactly as the tuner installs its own. That engine skips the drafter in decode steps at k = 0,
   as respec's server sets it up (``tuner.k0_skips_drafter``); ``k=0`` is measured on it, and on a third engine
   without the skip (``k=0_drafter_kept``, vLLM's own k = 0: the drafter's first forward still runs every step).
2. Long-tail rollout: many requests whose lengths spread over a wide range, all submitted at once, so the
   batch drains to one request; every static k vs the tuner, and the tuner's k at every engine step (PNG).
The tuner learns only from its own runs: ``--calibration-rounds`` rounds of (sweep + long-tail rollout) under
its current schedule and trials (a challenger k in alternating blocks of steps), exploring as configured, with one
update per round (as between RL steps); it is then measured with the ks its trials settled on, without trial
blocks. The engines stay up and the configurations are measured interleaved per cell
(batch size or long tail): every configuration once, in a fresh random order, ``--repeats`` times after one
unmeasured warm-up repeat. Ratios are medians of the ratios within a repeat (the two numbers were measured seconds
apart: a 2-core machine drifts by ~20% over minutes); the engine steps each EAGLE-3 cell took are kept too, so
the tuner can be checked against the static k its schedule runs there (the same computation). Writes
benchmarks/results/tuner_sweep.json (medians, ratios and every sample) and .png.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import random
import statistics
import time
from pathlib import Path

from respec_plugin.config import ReSpecConfig, TunerConfig
from respec_plugin.lab.build import build_lab
from respec_plugin.lab.data import read_problems
from respec_plugin.lab.models import chat_prompt_ids
from respec_plugin.rollout.spec_stats import request_stats
from respec_plugin.tuner.channel import take_steps, write_schedule
from respec_plugin.tuner.policy import Tuner
from respec_plugin.tuner.service import EngineTuner

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
BATCH_SIZES = (1, 4, 16, 64, 256)
STATIC_KS = (1, 2, 3, 4, 6)
K_MAX = 6
MAX_NUM_SEQS = 256


def engine(lab, tuned: bool, k0_skips_drafter: bool = True):
    """(LLM, control directory): a plain engine (no directory), or an EAGLE-3 one set up by the same code as respec's
    server with the tuner on (speculative config, scheduler, control directory, model runner)."""
    from vllm import LLM

    kwargs = dict(dtype="float32", enforce_eager=True, max_model_len=1024, gpu_memory_utilization=0.3,
                  kv_cache_memory_bytes=2 << 30, seed=0, max_num_seqs=MAX_NUM_SEQS, max_num_batched_tokens=4096)
    if not tuned:
        return LLM(model=lab.actor_dir, **kwargs), None
    respec = ReSpecConfig(drafter_path=lab.drafter_dir, num_speculative_tokens=K_MAX,
                          tuner=TunerConfig(mode="static", k_max=K_MAX, k0_skips_drafter=k0_skips_drafter))
    engine_tuner = EngineTuner(respec, MAX_NUM_SEQS)  # only its engine set-up: the benchmark drives the schedules
    kwargs.update(speculative_config=respec.speculative_config(), per_request_spec_decode_metrics="detailed")
    engine_tuner.configure_engine(kwargs, data_parallel_size=1)
    return LLM(model=lab.actor_dir, **kwargs), engine_tuner.control_dir


def shutdown(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def generate(llm, prompts, lengths) -> tuple[int, float, list[dict]]:
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
            stats = request_stats(metrics.per_step_drafted, metrics.per_step_accepted,
                                  num_output_tokens=len(output.outputs[0].token_ids), num_speculative_tokens=K_MAX,
                                  drafter_version=0, start_time=0.0, end_time=0.0)
            records.append(stats.to_extra_field())
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


def measure_sweep(llm, workloads, batch_size) -> tuple[float, list[dict]]:
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
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "tuner_sweep.partial.json").write_text(json.dumps(report, indent=2))


def install(control_dir: str, schedule, version: int, alternate=None) -> None:
    write_schedule(control_dir, schedule, version, alternate)
    take_steps(control_dir)  # steps of earlier runs are not the tuner's evidence


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
    drafter_kept, kept_dir = engine(lab, tuned=True, k0_skips_drafter=False)
    write_schedule(kept_dir, [(1, MAX_NUM_SEQS, 0)], 0)
    generate(drafter_kept, prompts[:4], [8] * 4)

    # The tuner: calibration rounds (its own runs only), then measured with the ks its trials settled on.
    config = TunerConfig(mode="adaptive", k_max=K_MAX, explore=args.explore, min_steps=args.min_steps)
    tuner = Tuner(config, default_k=args.default_k, max_batch_size=MAX_NUM_SEQS, seed=args.seed)
    tuner.version = 1
    calibration = []
    for round_index in range(args.calibration_rounds):
        install(control_dir, tuner.current_schedule(), tuner.version, tuner.alternate_schedule())
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

    # SD-off (the plain engine), every static k (one-entry schedules) and the tuner's schedule, interleaved per
    # cell: at each batch size (and the long tail) every configuration runs once, in a fresh random order, so the
    # configurations compared in a cell ran within seconds of each other (the machine drifts by ~20% over minutes:
    # measuring one configuration's whole sweep after the other's compared the machine's moods). A first, unmeasured
    # repeat runs every configuration once (the tuner's schedule had already run in calibration, the static ones not).
    # "k=0" is SD-off inside the EAGLE-3 engine: what the tuner's k = 0 costs against the plain engine
    # ("k=0_drafter_kept": the same in vLLM's own way, on the third engine, whose schedule never changes).
    schedules = {"sd_off": None, **{f"k={k}": [(1, MAX_NUM_SEQS, k)] for k in (0, *STATIC_KS)},
                 "k=0_drafter_kept": None, "tuner": tuner_schedule}
    engines = {"sd_off": plain, "k=0_drafter_kept": drafter_kept}
    names = list(schedules)
    cells = [*map(str, BATCH_SIZES), "long_tail"]
    samples: dict = {name: {cell: [] for cell in cells} for name in names}
    engine_steps: dict = {name: {cell: [] for cell in cells} for name in names if name not in engines}
    version = tuner.version
    trace = []
    order = random.Random(args.seed)
    for repeat in range(-1, args.repeats):  # -1: the warm-up repeat
        for cell in cells:
            for name in order.sample(names, len(names)):
                if name in engine_steps:  # an EAGLE-3 configuration: its schedule, installed
                    version += 1
                    install(control_dir, schedules[name], version)
                tokens_per_s = measure_cell(engines.get(name, speculative), workloads, cell)
                steps = take_steps(control_dir)  # none unless the tuned engine ran
                if repeat < 0:
                    continue
                samples[name][cell].append(tokens_per_s)
                if name in engine_steps:
                    # Engine steps per cell: a schedule running the same k here takes as many (the same computation).
                    engine_steps[name][cell].append(len(steps))
                if name == "tuner" and cell == "long_tail":
                    trace = [{"t": s.end_time - steps[0].end_time, "batch_size": s.batch_size, "k": s.k} for s in steps]
        if repeat >= 0:
            save_partial({**report, "calibration": calibration, "samples": samples, "engine_steps": engine_steps,
                          "long_tail_trace": trace})
        logging.info("repeat %d of %d measured", repeat + 1, args.repeats)
    for llm in (drafter_kept, speculative, plain):
        shutdown(llm)

    return summarize({**report, "calibration": calibration, "samples": samples, "engine_steps": engine_steps,
                      "long_tail_trace": trace})


def summarize(report: dict) -> dict:
    """Medians and ratios from a report's samples; also completes a partial report of a run cut short. The tuner's
    schedule is the one its last calibration round left (the choice changes only when a round is observed)."""
    samples = report["samples"]
    report["sweep"] = {name: {b: statistics.median(by_cell[b]) for b in map(str, BATCH_SIZES)}
                       for name, by_cell in samples.items()}
    report["long_tail"] = {name: {"tokens_per_s": statistics.median(by_cell["long_tail"])}
                           for name, by_cell in samples.items()}
    report["tuner"] = {"schedule": report["calibration"][-1]["schedule"], "calibration": report["calibration"],
                       "state": report.pop("tuner_state", None), "long_tail_trace": report.pop("long_tail_trace", [])}
    report["repeats_measured"] = len(samples["tuner"]["long_tail"])
    report["ratios"] = ratios(report)
    return report


def paired_ratio(samples: dict, a: str, b: str, cell: str) -> float:
    """Median over repeats of a's tokens/s over b's in the same repeat of this cell (measured seconds apart)."""
    return statistics.median(x / y for x, y in zip(samples[a][cell], samples[b][cell]))


def ratios(report: dict) -> dict:
    samples, sweep, tail = report["samples"], report["sweep"], report["long_tail"]
    static = [f"k={k}" for k in STATIC_KS]
    out = {"by_batch": {}}
    for b in map(str, BATCH_SIZES):
        best = max(static, key=lambda name: sweep[name][b])  # by median tokens/s
        tuner_k = next(k for start, end, k in report["tuner"]["schedule"] if start <= int(b) <= end)
        out["by_batch"][b] = {"best_static": best, "tuner_k": tuner_k,
                              "tuner_vs_best_static": paired_ratio(samples, "tuner", best, b),
                              "tuner_vs_sd_off": paired_ratio(samples, "tuner", "sd_off", b),
                              # The same computation in two schedules: ~1.0 unless the measurement is off.
                              "tuner_vs_static_of_its_k": paired_ratio(samples, "tuner", f"k={tuner_k}", b),
                              "best_static_vs_sd_off": paired_ratio(samples, best, "sd_off", b),
                              "k0_in_eagle_engine_vs_sd_off": paired_ratio(samples, "k=0", "sd_off", b),
                              "k0_drafter_kept_vs_sd_off": paired_ratio(samples, "k=0_drafter_kept", "sd_off", b)}
    best_tail = max(static, key=lambda name: tail[name]["tokens_per_s"])
    out["long_tail"] = {"best_static": best_tail,
                        "tuner_vs_best_static": paired_ratio(samples, "tuner", best_tail, "long_tail"),
                        "tuner_vs_sd_off": paired_ratio(samples, "tuner", "sd_off", "long_tail")}
    return out


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_sweep, ax_trace) = plt.subplots(1, 2, figsize=(13, 4.5))
    names = ["sd_off", "k=0_drafter_kept", *[f"k={k}" for k in (0, *STATIC_KS)], "tuner"]
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        base = [report["sweep"]["sd_off"][str(b)] for b in BATCH_SIZES]
        values = [report["sweep"][name][str(b)] / s for b, s in zip(BATCH_SIZES, base)]
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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    parser.add_argument("--repeats", type=int, default=4, help="interleaved measurements per configuration (median)")
    parser.add_argument("--from-partial", action="store_true",
                        help="summarize benchmarks/results/tuner_sweep.partial.json (a run cut short), run nothing")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    if args.from_partial:  # a run cut short: its measured repeats, summarized
        report = summarize(json.loads((RESULTS / "tuner_sweep.partial.json").read_text()))
    else:
        report = run(args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "tuner_sweep.json").write_text(json.dumps(report, indent=2))
    plot(report, RESULTS / "tuner_sweep.png")
    print(json.dumps(report["ratios"], indent=2))
    for name in report["sweep"]:
        print(f"{name:>16}: " + "  ".join(f"N={b}: {report['sweep'][name][str(b)]:8.1f}" for b in BATCH_SIZES)
              + f"  long tail: {report['long_tail'][name]['tokens_per_s']:8.1f} tok/s")


if __name__ == "__main__":
    main()

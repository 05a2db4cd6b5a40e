"""End-to-end GRPO on the CPU lab: no speculation (twice), n-gram, static EAGLE-3 and full respec rollouts.

    python benchmarks/e2e.py [--preset tiny] [--steps 10] [--runs vllm,nosd,ngram,static,full]

Every run is stock verl GRPO (``python -m verl.trainer.main_ppo``) from the same lab, seed and sizes, one after the
other on this machine; only the rollout name and the respec block differ:

- ``vllm``: ``rollout.name=vllm``, no speculation (the baseline);
- ``nosd``: respec with ``num_speculative_tokens=0``: the same vLLM engine without speculation, behind respec's
  server, which measures the rollout's own span (below);
- ``ngram``: vLLM's own model-free n-gram (prompt-lookup) proposer, through respec with ``method=ngram``, static k.
  Suffix decoding (vLLM's ``method=suffix``) is not run: it needs arctic-inference, and PyPI has no wheel of it for
  this platform (CPython 3.11, Linux x86_64) at the version vLLM asks for (0.1.1) or the latest (0.3.0, sdist only);
  the only wheels are the pure-Python 0.0.1-0.0.4, which predate suffix decoding (checked with ``pip download
  --only-binary :all:``);
- ``static``: respec with the lab's warmed-up EAGLE-3 drafter, fixed k, no learner, no tuner;
- ``full``: the same drafter with the online learner on (``learner.enable=True``) and the adaptive k tuner
  (``tuner.mode=adaptive``; k is the tuner's default until it is calibrated).

Rollout tokens/s is measured two ways. ``verl``: generated tokens / ``timing_s/gen``, the same for every backend;
but verl 0.9.1's v1 trainer times ``gen`` as its replay buffer's wait for the batch, which polls TransferQueue every
2 s (``ReplayBuffer.poll_interval``, not configurable), so a rollout shorter than that (the tiny lab's take 1-2 s)
reads as 2.02 s or 4.03 s whatever the backend. ``span``: ``respec/rollout_tokens_per_s``, generated tokens / (last
request's end - first request's start) in the respec server, for every respec run; ``nosd`` is its no-speculation
baseline. RL step time is ``timing_s/step`` (it includes the poll wait). Summary ratios are means over steps 2..N
(step 1 warms the engines up), to ``vllm`` (and ``nosd``) and also to ``ngram`` and ``static``. Results
(``benchmarks/results/e2e.json`` and the dashboard ``e2e.png``, rollout speedup by span vs ``nosd``) are written after
every run, so a cut-short benchmark keeps what it measured.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import common
from respec_lab.build import build_lab
from respec_lab.launch import respec_overrides, rollout_tokens_per_s
from respec_plugin.core.report import (
    ACCEPT_LENGTH,
    LEARNER_LOSS,
    REWARD,
    ROLLOUT_TOKENS_PER_S,
    STATIC_K,
    STEP_TIME,
    TUNER_K,
    draw_dashboard,
)

RUNS = ("vllm", "nosd", "ngram", "static", "full")
SPAN_BASELINE = "nosd"  # the dashboard's rollout speedup: span tokens/s vs respec's server without speculation
# Rollout tokens/s as verl measures it for any backend (generated tokens / timing_s/gen, quantised by its 2 s poll);
# respec's span measure (ROLLOUT_TOKENS_PER_S) exists for respec rollouts only.
TOKENS_PER_S = "e2e/rollout_tokens_per_s"
REPORTED = (TOKENS_PER_S, ROLLOUT_TOKENS_PER_S, STEP_TIME, ACCEPT_LENGTH, REWARD, TUNER_K, STATIC_K, LEARNER_LOSS)
RATIOS = ((TOKENS_PER_S, "rollout_tokens_per_s_verl"), (ROLLOUT_TOKENS_PER_S, "rollout_tokens_per_s_span"),
          (STEP_TIME, "step_time"))
# Each run's ratios are taken to these references (when both ran).
REFERENCES = {"nosd": ("vllm",), "ngram": ("vllm", "nosd"), "static": ("vllm", "nosd", "ngram"),
              "full": ("vllm", "nosd", "ngram", "static")}
SUFFIX_NOT_RUN = ("vLLM suffix decoding needs arctic-inference; PyPI has no wheel of it for CPython 3.11 Linux x86_64 "
                  "at 0.1.1 (what vLLM asks for) or 0.3.0 (sdist only); wheels 0.0.1-0.0.4 predate suffix decoding")


def overrides(lab, name: str, args) -> list[str]:
    """The respec block of each run (none for stock vLLM)."""
    if name == "vllm":
        return []
    if name == "nosd":
        return respec_overrides(num_speculative_tokens=0)
    if name == "ngram":
        return respec_overrides(method="ngram", num_speculative_tokens=args.num_speculative_tokens)
    full = {"learner": {"enable": True}, "tuner": {"mode": "adaptive"}} if name == "full" else {}
    return respec_overrides(drafter_path=lab.drafter_dir, num_speculative_tokens=args.num_speculative_tokens, **full)


def run(lab, name: str, args) -> dict:
    result = common.lab_grpo_run(
        lab, "bench_e2e", name, rollout_name="vllm" if name == "vllm" else "respec", timeout_s=args.timeout_s,
        total_steps=args.steps, train_batch_size=args.train_batch_size, n=args.n, seed=args.seed,
        max_response_length=args.max_response_length, extra_overrides=overrides(lab, name, args),
    )
    common.warn_if_cut_short(name, result)
    sequences = args.train_batch_size * args.n
    per_step = {}
    for step, metrics in result.metrics.items():
        metrics = {**metrics, TOKENS_PER_S: rollout_tokens_per_s(metrics, sequences)}
        per_step[step] = {key: metrics[key] for key in REPORTED if metrics.get(key) is not None}
    return {"ok": result.ok, "returncode": result.returncode, "wall_s": result.wall_s, "log": str(result.log_path),
            "steps": per_step}


def mean_after_warmup(r: dict, key: str, steps: list[int]) -> float | None:
    values = [r["steps"][s][key] for s in steps if key in r["steps"][s]]
    return statistics.fmean(values) if values else None


def summarise(runs: dict) -> dict:
    """Per run: means over steps 2..N; per pair: ratios of the means over the steps 2..N both runs reached."""
    summary = {"means": {}, "ratios": {}}
    for name, r in runs.items():
        steps = [s for s in r["steps"] if s >= 2]
        summary["means"][name] = {key: mean_after_warmup(r, key, steps) for key in REPORTED}
    for name, references in REFERENCES.items():
        for reference in references:
            if name not in runs or reference not in runs:
                continue
            steps = sorted(s for s in set(runs[name]["steps"]) & set(runs[reference]["steps"]) if s >= 2)
            ratio = {}
            for key, label in RATIOS:
                ours, theirs = mean_after_warmup(runs[name], key, steps), mean_after_warmup(runs[reference], key, steps)
                ratio[label] = ours / theirs if ours is not None and theirs else None
            summary["ratios"][f"{name}/{reference}"] = {**ratio, "steps_compared": len(steps)}
    return summary


def print_run(name: str, r: dict) -> None:
    print(f"\n{name}: exit {r['returncode']}, {r['wall_s']:.0f} s wall")
    print(f"{'step':>4} {'tok/s':>7} {'span':>7} {'step_s':>7} {'accept':>7} {'reward':>7} {'k':>7} {'loss':>7}")
    for step, m in sorted(r["steps"].items()):
        k = m.get(TUNER_K, m.get(STATIC_K))
        cells = [m.get(TOKENS_PER_S), m.get(ROLLOUT_TOKENS_PER_S), m.get(STEP_TIME), m.get(ACCEPT_LENGTH),
                 m.get(REWARD), k, m.get(LEARNER_LOSS)]
        print(f"{step:>4} " + " ".join("      -" if v is None else f"{v:7.3g}" for v in cells), flush=True)


def main() -> None:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--runs", default=",".join(RUNS))
    parser.add_argument("--train-batch-size", type=int, default=4)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-response-length", type=int, default=64)
    parser.add_argument("--num-speculative-tokens", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout-s", type=float, default=340, help="per run (5 runs stay within 30 min)")
    args = parser.parse_args()
    common.setup_logging()
    names = common.selected(args.runs, RUNS, "--runs", "run")

    start = time.monotonic()
    lab = build_lab(args.preset)
    print(f"lab {args.preset}: {json.dumps(lab.sizes)}", flush=True)
    report = {"preset": args.preset, "lab_sizes": lab.sizes, "config": vars(args), "suffix_not_run": SUFFIX_NOT_RUN,
              "runs": {}}
    sizes = lab.sizes
    title = (f"lab {args.preset} (actor {sizes['actor_params'] / 1e6:.2f} M, drafter "
             f"{sizes['drafter_params'] / 1e6:.2f} M params): GRPO {args.train_batch_size} prompts x {args.n}, "
             f"k={args.num_speculative_tokens}, 2 CPU cores; rollout tokens/s = respec's request span")

    def plot(report: dict, path: Path) -> None:
        draw_dashboard({n: r["steps"] for n, r in report["runs"].items()}, path,
                       baseline=SPAN_BASELINE if SPAN_BASELINE in report["runs"] else None, title=title)

    for name in names:  # results are written after every run, so a cut-short benchmark keeps what it measured
        report["runs"][name] = run(lab, name, args)
        report["summary"] = summarise(report["runs"])
        report["wall_s"] = time.monotonic() - start
        common.write_results("e2e", report, plot)
        print_run(name, report["runs"][name])
    print(f"\nratios of means over steps 2..{args.steps}:")
    for pair, ratio in report["summary"]["ratios"].items():
        print(f"  {pair}: " + ", ".join(f"{k} {v:.3f}" for k, v in ratio.items() if isinstance(v, float)))
    print(f"wall time {report['wall_s']:.0f} s; {common.RESULTS / 'e2e.json'}, {common.RESULTS / 'e2e.png'}")


if __name__ == "__main__":
    main()

"""Plain vLLM CPU decode speed under the lab's two ways of keeping linear weights loadable in a live engine
(lab/respec_lab/vllm_cpu_weights.py): ``plain`` (``F.linear`` on the weights) and ``repack`` (vLLM's packed
oneDNN / SGL GEMM, re-packed after an in-place load).

    python benchmarks/cpu_gemm.py [--model PATH] [--concurrency 1,4,8,32] [--rounds 2] [--max-tokens 96]

``--model``: a float32 HF checkpoint; by default the real-model lab's actor (SmolLM2-135M-Instruct, preset
``smollm2``, built first if needed). Each engine runs in its own subprocess with ``RESPEC_CPU_LINEAR`` set to its
variant, reports which ``cpu_linear`` its layers really got, and generates greedily (``ignore_eos``, no
speculation, ``enforce_eager``) ``--max-tokens`` tokens for 1, 4, 8, 32 concurrent sequences (short random prompts,
after one warm-up batch). The variants alternate (plain, repack, plain, repack, ...) so that ratios come from the
same minutes; tokens/s per concurrency is the mean over rounds. Writes ``benchmarks/results/cpu_gemm.json`` and
``.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import common

VARIANTS = ("plain", "repack")
RESULT_MARK = "CPU_GEMM_RESULT "


def engine_run(args) -> None:
    """In the subprocess: one engine, every concurrency; prints the result as one JSON line."""
    import random

    from vllm import LLM, SamplingParams

    def linear_kinds(worker) -> dict[str, int]:
        kinds: dict[str, int] = {}
        for module in worker.model_runner.model.modules():
            if hasattr(module, "cpu_linear"):
                kind = getattr(module.cpu_linear, "__name__", type(module.cpu_linear).__name__)
                kinds[kind] = kinds.get(kind, 0) + 1
        return kinds

    concurrency = [int(c) for c in args.concurrency.split(",")]
    llm = LLM(model=args.model, dtype="float32", enforce_eager=True, seed=0, skip_tokenizer_init=True,
              max_num_seqs=max(concurrency), max_model_len=args.prompt_len + args.max_tokens + 8,
              kv_cache_memory_bytes=1 << 30)
    kinds = llm.collective_rpc(linear_kinds)[0]
    print(f"RESPEC_CPU_LINEAR={os.environ.get('RESPEC_CPU_LINEAR')}: cpu_linear kinds {kinds}", flush=True)
    rng = random.Random(0)
    vocab = llm.llm_engine.model_config.get_vocab_size()

    def prompts(n: int) -> list[dict]:
        return [{"prompt_token_ids": [rng.randrange(100, vocab) for _ in range(args.prompt_len)]} for _ in range(n)]

    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True, detokenize=False)
    llm.generate(prompts(max(concurrency)), SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True,
                                                           detokenize=False), use_tqdm=False)  # warm-up
    tokens_per_s = {}
    for n in concurrency:
        start = time.perf_counter()
        outputs = llm.generate(prompts(n), params, use_tqdm=False)
        wall = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        tokens_per_s[str(n)] = tokens / wall
        print(f"  {n:>3} seqs: {tokens} tokens in {wall:.1f} s = {tokens / wall:.1f} tok/s", flush=True)
    print(RESULT_MARK + json.dumps({"kinds": kinds, "tokens_per_s": tokens_per_s}), flush=True)


def run_variant(variant: str, args) -> dict:
    argv = [sys.executable, __file__, "--engine", "--model", args.model, "--concurrency", args.concurrency,
            "--max-tokens", str(args.max_tokens), "--prompt-len", str(args.prompt_len)]
    env = {**os.environ, "RESPEC_CPU_LINEAR": variant, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=args.timeout_s)
    lines = [line for line in result.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if result.returncode != 0 or not lines:
        raise SystemExit(f"{variant} engine failed (exit {result.returncode}):\n{result.stdout[-2000:]}"
                         f"\n{result.stderr[-4000:]}")
    measured = json.loads(lines[-1][len(RESULT_MARK):])
    expected = {"plain": "_plain_linear", "repack": "RepackingLinear"}[variant]
    if set(measured["kinds"]) != {expected}:
        raise SystemExit(f"{variant}: the engine's layers computed with {measured['kinds']}, not {expected}")
    return measured


def summarize(report: dict) -> None:
    means = {v: {} for v in VARIANTS}
    for n in report["concurrency"]:
        for v in VARIANTS:
            values = [r["tokens_per_s"][str(n)] for r in report["runs"] if r["variant"] == v]
            if values:
                means[v][str(n)] = statistics.fmean(values)
    report["mean_tokens_per_s"] = means
    report["repack_over_plain"] = {
        n: means["repack"][n] / means["plain"][n] for n in means["plain"] if n in means["repack"]
    }


def plot(report: dict, path: Path) -> None:
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    concurrency = report["concurrency"]
    width = 0.38
    for i, variant in enumerate(VARIANTS):
        means = report["mean_tokens_per_s"][variant]
        xs = [j + (i - 0.5) * width for j, n in enumerate(concurrency) if str(n) in means]
        ax.bar(xs, [means[str(n)] for n in concurrency if str(n) in means], width, label=variant)
        for run in (r for r in report["runs"] if r["variant"] == variant):
            ax.plot(xs, [run["tokens_per_s"][str(n)] for n in concurrency if str(n) in means], "k.", ms=4)
    ax.set_xticks(range(len(concurrency)), [str(n) for n in concurrency])
    ratios = ", ".join(f"{n}: {r:.2f}x" for n, r in report["repack_over_plain"].items())
    ax.set(xlabel="concurrent sequences", ylabel="decode tokens/s",
           title=f"vLLM CPU linear weights: repack / plain = {ratios}")
    ax.title.set_fontsize(9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--model", default=None, help="default: the smollm2 lab's actor")
    parser.add_argument("--concurrency", default="1,4,8,32")
    parser.add_argument("--rounds", type=int, default=2, help="engines per variant, alternating")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--timeout-s", type=float, default=900)
    parser.add_argument("--engine", action="store_true", help=argparse.SUPPRESS)  # the subprocess of one engine
    args = parser.parse_args()
    if args.engine:
        engine_run(args)
        return
    common.setup_logging()
    if args.model is None:
        from respec_lab.build import build_lab

        args.model = build_lab("smollm2").actor_dir
    report = {"model": args.model, "concurrency": [int(c) for c in args.concurrency.split(",")],
              "max_tokens": args.max_tokens, "prompt_len": args.prompt_len, "dtype": "float32",
              "cpu_count": os.cpu_count(), "runs": []}
    for round_ in range(args.rounds):
        for variant in VARIANTS:
            measured = run_variant(variant, args)
            report["runs"].append({"round": round_, "variant": variant, **measured})
            print(f"round {round_} {variant}: " + ", ".join(f"{n}: {t:.1f}" for n, t in
                                                           measured["tokens_per_s"].items()) + " tok/s", flush=True)
            summarize(report)
            common.write_results("cpu_gemm", report, plot if len(report["runs"]) >= len(VARIANTS) else None)
    print(f"{'seqs':>5} " + " ".join(f"{v:>8}" for v in VARIANTS) + "  repack/plain")
    for n in report["concurrency"]:
        means = report["mean_tokens_per_s"]
        print(f"{n:>5} " + " ".join(f"{means[v][str(n)]:8.1f}" for v in VARIANTS)
              + f"  {report['repack_over_plain'][str(n)]:.2f}x")


if __name__ == "__main__":
    main()

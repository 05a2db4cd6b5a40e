"""CPU demo: build the lab, run stock verl GRPO with respec rollouts, print reward / acceptance / tokens/s per step.

    python examples/cpu_demo/run_grpo.py [--rollout respec|vllm] [--steps 10] [--preset demo]

Everything verl writes (its log, the offline wandb run) goes to ``outputs/cpu_demo/<rollout>/``; the per-step
summary also lands there as ``summary.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
from pathlib import Path

from respec_lab.build import build_lab
from respec_lab.launch import (
    grpo_command,
    parse_console_metrics,
    respec_overrides,
    rollout_tokens_per_s,
    run_logged,
)

REPO = Path(__file__).resolve().parents[2]
COLUMNS = (
    ("step", None),
    ("reward", "critic/score/mean"),
    ("accept_len", "respec/accept_length"),
    ("accept_rate", "respec/accept_rate"),
    ("respec_tok/s", "respec/rollout_tokens_per_s"),
    ("gen_tok/s", "gen_tokens_per_s"),
    ("gen_s", "timing_s/gen"),
    ("step_s", "timing_s/step"),
)


def format_row(step: int, metrics: dict[str, float]) -> str:
    cells = []
    for name, key in COLUMNS:
        value = step if key is None else metrics.get(key)
        cells.append(f"{'-' if value is None else (f'{value:.3f}' if isinstance(value, float) else value):>13}")
    return "".join(cells)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rollout", choices=("respec", "vllm"), default="respec")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--train-batch-size", type=int, default=8)
    parser.add_argument("--n", type=int, default=4, help="GRPO group size (responses per prompt)")
    parser.add_argument("--num-speculative-tokens", type=int, default=3)
    parser.add_argument("--timeout-s", type=float, default=3600)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    lab = build_lab(args.preset)
    out_dir = REPO / "outputs" / "cpu_demo" / args.rollout
    respec_block = respec_overrides(drafter_path=lab.drafter_dir, num_speculative_tokens=args.num_speculative_tokens)
    argv, env = grpo_command(
        lab.train_parquet,
        lab.val_parquet,
        lab.actor_dir,
        experiment_dir=out_dir,
        rollout_name=args.rollout,
        total_steps=args.steps,
        train_batch_size=args.train_batch_size,
        n=args.n,
        extra_overrides=respec_block if args.rollout == "respec" else (),
    )
    log_path = out_dir / "verl.log"
    num_sequences = args.train_batch_size * args.n
    print(f"lab: {lab.root}\nverl log: {log_path}\n" + "".join(f"{name:>13}" for name, _ in COLUMNS), flush=True)

    result = {}
    runner = threading.Thread(
        target=lambda: result.update(run=run_logged(argv, env, log_path, timeout_s=args.timeout_s, cwd=REPO))
    )
    runner.start()
    printed: set[int] = set()
    while True:
        finished = not runner.is_alive()
        steps = parse_console_metrics(log_path.read_text(errors="replace")) if log_path.exists() else {}
        for step in sorted(set(steps) - printed):
            steps[step]["gen_tokens_per_s"] = rollout_tokens_per_s(steps[step], num_sequences)
            print(format_row(step, steps[step]), flush=True)
            printed.add(step)
        if finished:
            break
        runner.join(timeout=5)

    run = result["run"]
    per_step = {step: m | {"gen_tokens_per_s": rollout_tokens_per_s(m, num_sequences)} for step, m in run.metrics.items()}
    (out_dir / "summary.json").write_text(json.dumps({"rollout": args.rollout, "wall_s": run.wall_s, "steps": per_step}))
    if not run.ok or not per_step:
        raise SystemExit(f"verl run failed (exit {run.returncode}); see {log_path}")
    first, last = per_step[min(per_step)], per_step[max(per_step)]
    print(
        f"done: {len(per_step)} steps in {run.wall_s:.0f} s; reward {first.get('critic/score/mean', float('nan')):.3f}"
        f" -> {last.get('critic/score/mean', float('nan')):.3f}; summary {out_dir / 'summary.json'}"
    )


if __name__ == "__main__":
    main()

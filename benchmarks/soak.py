"""A long run with nothing leaking: 100 GRPO steps on the tiny lab with the learner and the tuner on, a checkpoint
every 10 steps (verl keeps the last two), and one SIGKILL + resume in the middle.

    python benchmarks/soak.py [--steps 100] [--kill-at 50] [--save-freq 10] [--baseline-steps 50]

While verl runs, every second the benchmark reads /proc for every process of the run (the driver, verl's Ray
workers, the vLLM engines): its resident memory and open file descriptors, tagged with the step verl last logged.
After each step it also measures respec's files on disk (its state in the checkpoints, the tuner's control
directories). Per process role it fits a line through the per-step peaks (steps after the first 10, each run on its
own) and reports the slope per 100 steps; and again over each run's later half, which a level that settles early
does not reach (``--refit`` fits the committed samples again).

The kill comes within milliseconds of verl marking the step-50 checkpoint as the latest, inside that step (before its
weight sync and metrics): the moment a run lost respec's state when respec wrote it after verl's marker. Across it
the benchmark checks that nothing is lost: the resumed run continues at the step after the checkpoint, restores the
learner's and the tuner's state from that very checkpoint, carries on the learner's counters, and serves no older
drafter than the killed run had. Then the same job runs as a baseline with verl's own vLLM rollout, monitored the
same way (``--baseline-only NAME`` adds another of ``BASELINES`` to the committed result). Writes
``benchmarks/results/soak.{json,png}``.

Every process runs with oneDNN's primitive cache off (``--onednn-cache 0``). vLLM's CPU GEMMs and torch's CPU
kernels keep one compiled oneDNN primitive per new shape, up to 1024 per process by default. Within 100 steps that
cache is still filling, in stock verl as much as in respec: its growth looks linear and would hide a real leak,
though it is bounded and CPU-only. The ``stock_vllm_default_onednn_cache`` baseline shows it.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import statistics
import tempfile
import threading
from collections import defaultdict
from pathlib import Path

import common
from respec_lab.build import build_lab
from respec_lab.launch import grpo_command, parse_console_metrics, respec_overrides, run_logged
from respec_plugin.core.config import LearnerConfig

ROLES = (("driver", "TaskRunner"), ("actor_worker", "WorkerDict"), ("vllm_server", "ReSpecHttpServer"),
         ("vllm_engine_core", "EngineCore"), ("vllm_worker", "VLLM::Worker"), ("agent_loop", "AgentLoopWorker"),
         ("reward", "Reward"), ("transfer_queue", "Storage"))
CONTROL_DIRS = os.path.join(tempfile.gettempdir(), "respec-control-*")


def role(command_line: str) -> str | None:
    for name, marker in ROLES:
        if marker in command_line:
            return name
    return None


def _session_processes(session_id: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[3]) == session_id:
                        pids.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return pids


def _sample(pid: int) -> tuple[str, float, int] | None:
    """(role, RSS in MB, open file descriptors) of one process, None if it is gone or has no role."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        name = role(command) or role(Path(f"/proc/{pid}/comm").read_text())
        if name is None:
            return None
        rss_kb = int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1))
        return name, rss_kb / 1024, len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, AttributeError):
        return None


def respec_disk_bytes(checkpoints: Path) -> int:
    """respec's files: its state in every checkpoint folder, the dashboard, the tuner's control directories."""
    paths = [*checkpoints.glob("global_step_*/respec_*"), *checkpoints.glob("respec_*"),
             *map(Path, glob.glob(CONTROL_DIRS))]
    total = 0
    for path in paths:
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        total += sum(p.stat().st_size for p in files if p.exists())
    return total


class Monitor(threading.Thread):
    """Samples the run's processes every ``interval_s`` until stopped; per step, the peak per role."""

    def __init__(self, log_path: Path, checkpoints: Path, interval_s: float = 1.0):
        super().__init__(daemon=True)
        self.log_path, self.checkpoints, self.interval_s = log_path, checkpoints, interval_s
        self.session_id: int | None = None
        self.per_step: dict[int, dict] = defaultdict(lambda: {"rss_mb": {}, "fds": {}})
        self._stopping = threading.Event()

    def run(self) -> None:
        while not self._stopping.wait(self.interval_s):
            if self.session_id is None or not self.log_path.exists():
                continue
            steps = parse_console_metrics(self.log_path.read_text(errors="replace"))
            step = (max(steps) + 1) if steps else 1  # the step being run now
            record = self.per_step[step]
            totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
            for pid in _session_processes(self.session_id):
                sample = _sample(pid)
                if sample is not None:
                    name, rss, fds = sample
                    totals[name][0] += rss
                    totals[name][1] += fds
            for name, (rss, fds) in totals.items():
                record["rss_mb"][name] = max(record["rss_mb"].get(name, 0.0), rss)
                record["fds"][name] = max(record["fds"].get(name, 0), fds)
            record["respec_disk_bytes"] = respec_disk_bytes(self.checkpoints)

    def stop(self) -> None:
        self._stopping.set()
        self.join()


# What generates the rollouts (``soak_run``'s ``rollout``): respec with its learner and tuner (the soak itself), respec
# with its tuner only, verl's own vLLM rollout, and verl's own rollout speculating with the same day-0 drafter, k = 3,
# through vLLM's ``speculative_config`` (what respec's engine runs, without respec).
ROLLOUTS = ("respec", "respec_tuner_only", "vllm", "vllm_eagle3")
# The runs set against the soak (``soak_run`` options): all with the soak's oneDNN cache but the last, verl's own
# rollout with oneDNN's default cache.
BASELINES = {"stock_vllm": {"rollout": "vllm"},
             "stock_vllm_eagle3": {"rollout": "vllm_eagle3"},
             "respec_without_learner": {"rollout": "respec_tuner_only"},
             "stock_vllm_default_onednn_cache": {"rollout": "vllm", "onednn_cache": -1}}


def rollout_overrides(lab, rollout: str) -> list[str]:
    """The Hydra overrides that make ``rollout`` (one of :data:`ROLLOUTS`) generate the run's rollouts."""
    if rollout not in ROLLOUTS:
        raise ValueError(f"unknown rollout {rollout!r}: expected one of {', '.join(ROLLOUTS)}")
    if rollout.startswith("respec"):
        learner = {"enable": True, "reward_weighting": "uniform", "steps_per_rl_step": 4} if rollout == "respec" else {}
        return respec_overrides(drafter_path=lab.day0_drafter_dir, num_speculative_tokens=3,
                                tuner={"mode": "adaptive", "k_max": 4, "min_steps": 2}, learner=learner)
    if rollout == "vllm_eagle3":
        speculative_config = {"method": "eagle3", "model": lab.day0_drafter_dir, "num_speculative_tokens": 3}
        return [f"+actor_rollout_ref.rollout.engine_kwargs.vllm.speculative_config.{key}={value}"
                for key, value in speculative_config.items()]
    return []  # vllm


def soak_run(lab, args, experiment_dir: Path, log_name: str, kill_at: int | None, rollout: str = "respec",
             steps: int | None = None, onednn_cache: int | None = None) -> tuple[dict, dict]:
    """One GRPO run (killed as it marks checkpoint ``kill_at`` the latest, or to the end), monitored; its metrics
    and samples. ``rollout``: one of :data:`ROLLOUTS`; ``onednn_cache``: oneDNN's primitive cache capacity in every
    process (-1: oneDNN's default; None: ``args``')."""
    argv, env = grpo_command(
        lab.train_parquet, lab.val_parquet, lab.actor_dir, experiment_dir=experiment_dir,
        rollout_name="respec" if rollout.startswith("respec") else "vllm", total_steps=steps or args.steps,
        train_batch_size=4, n=4, max_response_length=48,
        extra_overrides=[
            *rollout_overrides(lab, rollout),
            f"trainer.save_freq={args.save_freq}", "trainer.resume_mode=auto",
            f"trainer.max_actor_ckpt_to_keep={args.keep}",
        ])
    capacity = args.onednn_cache if onednn_cache is None else onednn_cache
    if capacity >= 0:
        env = {**env, "ONEDNN_PRIMITIVE_CACHE_CAPACITY": str(capacity)}
    log_path = experiment_dir / log_name
    monitor = Monitor(log_path, experiment_dir / "checkpoints")
    monitor.start()
    try:
        kill = None if kill_at is None else (experiment_dir / "checkpoints", kill_at)
        result = run_logged(argv, env, log_path, timeout_s=args.timeout_s, kill_at_checkpoint=kill,
                            on_start=lambda pid: setattr(monitor, "session_id", pid))
    finally:
        monitor.stop()
    return result.metrics, dict(monitor.per_step)


def _slope_per_100(points: list[tuple[int, float]]) -> float | None:
    if len(points) < 3:
        return None
    xs, ys = zip(*points)
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mean_x) ** 2 for x in xs)
    return 100 * sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / var if var else None


def slopes(runs: list[dict], key: str, warmup: int, later_half: bool = False) -> dict[str, float | None]:
    """Per role, the slope per 100 steps of the per-step peaks, fitted on each run's steps after ``warmup`` (with
    ``later_half``: on the later half of each run's steps) and averaged over the runs (a resumed run starts its
    processes afresh). The later half tells a level that settles (one-off allocations at the first checkpoints, a
    cache that fills) from growth that goes on."""
    by_role: dict[str, list[float]] = defaultdict(list)
    for samples in runs:
        # The last is partial: the step a kill cut short, or the shutdown after the end. The first of a resumed run
        # is its start-up (tagged 1: it has logged no step yet), so the warm-up counts sampled steps, not step numbers.
        steps = sorted(samples)[:-1]
        if not steps:
            continue
        start = steps[len(steps) // 2] if later_half else steps[min(warmup + 1, len(steps) - 1)]
        names = {name for record in samples.values() for name in record[key]}
        for name in names:
            points = [(step, samples[step][key][name]) for step in steps
                      if step >= start and name in samples[step][key]]
            slope = _slope_per_100(points)
            if slope is not None:
                by_role[name].append(slope)
    return {name: statistics.fmean(values) for name, values in sorted(by_role.items())}


def fitted(runs: list[dict], warmup: int) -> dict[str, dict[str, float | None]]:
    """The report's slope keys for ``runs`` (per-step samples keyed by int step)."""
    return {
        "rss_slope_mb_per_100_steps": slopes(runs, "rss_mb", warmup),
        "rss_slope_mb_per_100_steps_later_half": slopes(runs, "rss_mb", warmup, later_half=True),
        "fd_slope_per_100_steps": slopes(runs, "fds", warmup),
        "fd_slope_per_100_steps_later_half": slopes(runs, "fds", warmup, later_half=True),
    }


def _excess(report: dict, base: dict) -> dict[str, float]:
    """Per role, the soak's slope minus the baseline's."""
    base_slopes = base["rss_slope_mb_per_100_steps"]
    return {name: slope - base_slopes[name]
            for name, slope in report["rss_slope_mb_per_100_steps"].items() if name in base_slopes}


def refit(report: dict, warmup: int) -> None:
    """Fit the slopes of a written report again from its samples (after a change to how they are fitted)."""
    def by_step(samples: dict) -> dict:
        return {int(step): record for step, record in samples.items()}

    report.update(fitted([by_step(samples) for samples in report["samples"].values()], warmup))
    for key, base in report.items():
        if key.startswith("baseline_"):
            base.update(fitted([by_step(base["samples"])], warmup))
            base["respec_excess_rss_mb_per_100_steps"] = _excess(report, base)


def _decided(metrics: dict) -> float:
    """Candidates the learner has decided on (published or refused) by this step's metrics."""
    return metrics.get("respec/learner/published_version", -1) + metrics.get("respec/learner/rejected_versions", -1)


def lost_after_resume(killed: dict, resumed: dict, kill_at: int, resumed_log: str) -> dict[str, bool]:
    """What the resumed run should carry on from the one killed at checkpoint ``kill_at`` (each True when kept)."""
    first = min(resumed) if resumed else None
    before = killed.get(kill_at - 1, {})
    cont = resumed.get(first, {})
    folder = Path(f"global_step_{kill_at}")
    return {
        "killed_inside_the_checkpointed_step": kill_at not in killed and kill_at - 1 in killed,
        "resumed_at_the_step_after_the_checkpoint": first == kill_at + 1,
        "learner_state_restored_from_that_checkpoint":
            f"{folder.name}/respec_learner: drafter v" in resumed_log,
        "tuner_state_restored_from_that_checkpoint": ("respec tuner: no saved state" not in resumed_log
                                                      and "restoring it from step" not in resumed_log),
        # The checkpoint's candidate is decided at the first resumed step, after the killed run's last one.
        "learner_counters_continue": _decided(cont) > _decided(before) >= 0,
        "no_older_drafter_served": (cont.get("respec/drafter_version", -1)
                                    >= before.get("respec/learner/published_version", 0)),
    }


def untrained_learner_steps(resumed: dict, kill_at: int, overlap: bool) -> int:
    """RL steps whose rows the learner never trained on because of the kill: by the first resumed step, every step
    up to it (with ``learner.overlap``: up to the one before) has had its candidate decided, unless the kill lost its
    rows. Overlapped, the killed step's rows wait for the next rollout and are not in the checkpoint (the features are
    too large to save); trained after the actor update, its candidate is."""
    first = min(resumed)
    return int(first - (1 if overlap else 0) - _decided(resumed[first]))


def plot(report: dict, path: Path) -> None:
    plt = common.pyplot()
    fig, (ax_rss, ax_fds, ax_disk, ax_step) = plt.subplots(1, 4, figsize=(22, 4))
    for run_name, samples in report["samples"].items():
        steps = sorted(int(s) for s in samples)
        roles = sorted({name for record in samples.values() for name in record["rss_mb"]})
        for i, name in enumerate(roles):
            style = {"color": f"C{i}", "linestyle": "-" if run_name == "killed" else "--"}
            ax_rss.plot(steps, [samples[str(s)]["rss_mb"].get(name) for s in steps], label=f"{name} ({run_name})",
                        **style)
            ax_fds.plot(steps, [samples[str(s)]["fds"].get(name) for s in steps], **style)
        ax_disk.plot(steps, [samples[str(s)].get("respec_disk_bytes", 0) / 1e6 for s in steps], label=run_name)
    base = report.get("baseline_stock_vllm")
    if base:
        samples = base["samples"]
        steps = sorted(int(s) for s in samples)
        for name in sorted({name for record in samples.values() for name in record["rss_mb"]}):
            ax_rss.plot(steps, [samples[str(s)]["rss_mb"].get(name) for s in steps], linestyle=":", color="gray",
                        label=f"{name} (stock verl)")
    metrics = report["metrics"]
    steps = sorted(int(s) for s in metrics)
    ax_step.plot(steps, [metrics[str(s)].get("timing_s/step") for s in steps], label="RL step (s)")
    ax_step.plot(steps, [metrics[str(s)].get("respec/accept_length") for s in steps], label="acceptance length")
    ax_step.axvline(report["kill_at"], color="red", linestyle=":", label="SIGKILL at the checkpoint + resume")
    ax_rss.set(xlabel="GRPO step", ylabel="MB", title="Resident memory per process role (peak in step)")
    ax_fds.set(xlabel="GRPO step", ylabel="open file descriptors", title="Open files per process role")
    ax_disk.set(xlabel="GRPO step", ylabel="MB", title="respec's files on disk")
    ax_step.set(xlabel="GRPO step", title="Step time and acceptance length")
    ax_rss.legend(fontsize=5)
    ax_disk.legend(fontsize=7)
    ax_step.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def baseline(lab, args, report: dict, name: str = "stock_vllm") -> dict:
    """The same GRPO job as a baseline of ``BASELINES``, monitored the same way: a resource that grows as fast in
    stock verl grows in verl or vLLM, not in respec; one that grows as fast without the learner does not grow in it.
    Per role, ``respec_excess`` is the soak's slope minus the baseline's."""
    experiment_dir = common.OUTPUTS / f"bench_soak_baseline_{name}"
    shutil.rmtree(experiment_dir, ignore_errors=True)  # a run of its own, not a resume of an earlier one
    options = {"onednn_cache": args.onednn_cache, **BASELINES[name]}
    metrics, samples = soak_run(lab, args, experiment_dir, "verl.log", kill_at=None, steps=args.baseline_steps,
                                **options)
    result = {"steps": max(metrics) if metrics else 0, "onednn_cache": options["onednn_cache"],
              **fitted([samples], args.warmup)}
    return {**result, "respec_excess_rss_mb_per_100_steps": _excess(report, result),
            "samples": {str(k): v for k, v in samples.items()}}


def main() -> None:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--kill-at", type=int, default=50, help="a checkpointed step")
    parser.add_argument("--save-freq", type=int, default=10)
    parser.add_argument("--keep", type=int, default=2, help="trainer.max_actor_ckpt_to_keep")
    parser.add_argument("--warmup", type=int, default=10, help="steps of each run left out of the slopes")
    parser.add_argument("--timeout-s", type=float, default=7200)
    parser.add_argument("--baseline-steps", type=int, default=50,
                        help="steps of a baseline run, whose slopes the soak's are set against")
    parser.add_argument("--onednn-cache", type=int, default=0,
                        help="oneDNN's primitive cache capacity in every process of the runs (-1: oneDNN's default)")
    parser.add_argument("--baseline-only", default=None, choices=sorted(BASELINES),
                        help="run only this baseline and add it to the committed benchmarks/results/soak.json")
    parser.add_argument("--refit", action="store_true",
                        help="fit the slopes of the committed benchmarks/results/soak.json again from its samples")
    args = parser.parse_args()
    common.setup_logging()
    if args.refit:
        report = json.loads((common.RESULTS / "soak.json").read_text())
        refit(report, report["config"]["warmup"])
        common.write_results("soak", report, plot)
        return
    lab = build_lab("tiny")
    if args.baseline_only:
        report = json.loads((common.RESULTS / "soak.json").read_text())
        key = f"baseline_{args.baseline_only}"
        report[key] = baseline(lab, args, report, args.baseline_only)
        print(json.dumps(report[key]["rss_slope_mb_per_100_steps"], indent=2))
        common.write_results("soak", report, plot)
        return
    experiment_dir = common.OUTPUTS / "bench_soak"
    shutil.rmtree(experiment_dir, ignore_errors=True)  # a run of its own, not a resume of an earlier one
    if args.kill_at % args.save_freq:
        parser.error(f"--kill-at {args.kill_at} is not a checkpointed step (--save-freq {args.save_freq})")
    killed, killed_samples = soak_run(lab, args, experiment_dir, "verl.log", kill_at=args.kill_at)
    resumed, resumed_samples = soak_run(lab, args, experiment_dir, "verl-resumed.log", kill_at=None)
    metrics = {**killed, **resumed}
    lost = lost_after_resume(killed, resumed, args.kill_at,
                             (experiment_dir / "verl-resumed.log").read_text(errors="replace"))
    runs = [killed_samples, resumed_samples]
    final_disk = max(resumed_samples.values(), key=lambda r: r.get("respec_disk_bytes", 0)).get("respec_disk_bytes")
    report = {
        "steps": max(metrics) if metrics else 0,
        "kill_at": args.kill_at,
        **fitted(runs, args.warmup),
        "disk_bytes_final": respec_disk_bytes(experiment_dir / "checkpoints"),
        "disk_bytes_peak": final_disk,
        "lost_after_resume": sum(not kept for kept in lost.values()),
        "drafter_restores": max((m.get("respec/drafter_restores", 0.0) for m in metrics.values()), default=None),
        "kept_across_the_kill": lost,
        "untrained_learner_steps_across_the_kill": untrained_learner_steps(resumed, args.kill_at,
                                                                           LearnerConfig().overlap),
        "config": vars(args),
        "metrics": {str(k): v for k, v in metrics.items()},
        "samples": {"killed": {str(k): v for k, v in killed_samples.items()},
                    "resumed": {str(k): v for k, v in resumed_samples.items()}},
    }
    report["baseline_stock_vllm"] = baseline(lab, args, report)
    print(json.dumps({k: report[k] for k in ("steps", "rss_slope_mb_per_100_steps",
                                             "rss_slope_mb_per_100_steps_later_half", "fd_slope_per_100_steps",
                                             "disk_bytes_final", "lost_after_resume", "kept_across_the_kill",
                                             "untrained_learner_steps_across_the_kill")},
                     indent=2))
    common.write_results("soak", report, plot)


if __name__ == "__main__":
    main()

"""The tuner's vLLM scheduler on vLLM CPU with the tiny lab: a schedule installed into the running engine
takes effect at the next step (drafted-token counts follow it, per batch size), every k is lossless (greedy
outputs token-identical to plain vLLM), and the step records it writes describe what ran. With
``tuner.k0_skips_drafter`` the drafter skips the decode steps at k = 0 that verify nothing, and outputs stay the
same."""

import gc

import pytest

pytest.importorskip("vllm")

from transformers import AutoTokenizer  # noqa: E402

from respec_lab.data import read_problems  # noqa: E402
from respec_lab.models import chat_prompt_ids  # noqa: E402
from respec_plugin.core.tuner.channel import take_steps, write_schedule  # noqa: E402
from respec_plugin.core.tuner.channel import CONTROL_DIR_KEY, K0_SKIPS_DRAFTER_KEY, SCHEDULER_CLS  # noqa: E402
from respec_plugin.integrations.vllm.scheduler import ALTERNATE_BLOCK_STEPS  # noqa: E402

K_MAX = 4
NUM_PROMPTS = 6
MAX_TOKENS = 32
MAX_NUM_SEQS = 16
ENGINE_KWARGS = dict(dtype="float32", enforce_eager=True, max_model_len=512, gpu_memory_utilization=0.3,
                     kv_cache_memory_bytes=256 << 20, seed=0, max_num_seqs=MAX_NUM_SEQS)


def _generate(llm, prompts, max_tokens=MAX_TOKENS):
    from vllm import SamplingParams

    # Different lengths give the batch a tail: the last requests decode alone.
    params = [SamplingParams(temperature=0.0, max_tokens=max_tokens + 4 * i) for i in range(len(prompts))]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs], [o.outputs[0].spec_decode_metrics for o in outputs]


def _shutdown(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def _tuned_engine(tiny_lab, control_dir: str, **additional_config):
    from vllm import LLM

    return LLM(
        model=tiny_lab.actor_dir,
        speculative_config={"method": "eagle3", "model": tiny_lab.drafter_dir, "num_speculative_tokens": K_MAX,
                            "num_speculative_tokens_per_batch_size": [(1, MAX_NUM_SEQS, K_MAX)]},
        per_request_spec_decode_metrics="detailed",
        scheduler_cls=SCHEDULER_CLS,
        additional_config={CONTROL_DIR_KEY: control_dir, **additional_config},
        **ENGINE_KWARGS,
    )


def _serve(llm, control_dir: str, prompts, schedules) -> dict:
    """Generate under each schedule in turn: a schedule, or (schedule, alternate) for a trial."""
    served = {}
    for version, (name, schedule) in enumerate(schedules.items()):
        schedule, alternate = schedule if isinstance(schedule, tuple) else (schedule, None)
        write_schedule(control_dir, schedule, version, alternate)
        take_steps(control_dir)
        tokens, metrics = _generate(llm, prompts)
        served[name] = {"version": version, "tokens": tokens, "metrics": metrics, "steps": take_steps(control_dir)}
    return served


# Off while 3+ requests run, deep speculation in the tail.
TAIL_SCHEDULE = [(1, 2, K_MAX), (3, MAX_NUM_SEQS, 0)]
# A trial: k=2 everywhere, alternating with the tail schedule.
TRIAL = ([(1, MAX_NUM_SEQS, 2)], TAIL_SCHEDULE)


@pytest.fixture(scope="module")
def prompts(tiny_lab):
    tokenizer = AutoTokenizer.from_pretrained(tiny_lab.actor_dir)
    return [chat_prompt_ids(tokenizer, p.question) for p in read_problems(tiny_lab.val_parquet)[:NUM_PROMPTS]]


@pytest.fixture(scope="module")
def runs(tiny_lab, prompts, tmp_path_factory):
    """Plain vLLM once, then one tuner-scheduled engine serving under several installed schedules."""
    from vllm import LLM

    plain = LLM(model=tiny_lab.actor_dir, **ENGINE_KWARGS)
    plain_tokens, _ = _generate(plain, prompts)
    _shutdown(plain)

    control_dir = str(tmp_path_factory.mktemp("tuner"))
    llm = _tuned_engine(tiny_lab, control_dir)
    schedules = {f"k={k}": [(1, MAX_NUM_SEQS, k)] for k in range(K_MAX + 1)}
    schedules["tail"] = TAIL_SCHEDULE
    schedules["trial"] = TRIAL
    served = _serve(llm, control_dir, prompts, schedules)
    _shutdown(llm)
    return plain_tokens, served


@pytest.fixture(scope="module")
def skipping_run(tiny_lab, prompts, tmp_path_factory):
    """A tuner-scheduled engine with the k = 0 drafter skip, in this process, counting its drafter's forwards."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in this process: its drafter is reachable
        control_dir = str(tmp_path_factory.mktemp("tuner_skip"))
        llm = _tuned_engine(tiny_lab, control_dir, **{K0_SKIPS_DRAFTER_KEY: True})
        forwards = []
        llm.collective_rpc(_count_drafter_forwards, args=(forwards,))
        served = {}
        for name, schedule in {"k=0": [(1, MAX_NUM_SEQS, 0)], "tail": TAIL_SCHEDULE}.items():
            forwards.clear()
            served[name] = _serve(llm, control_dir, prompts, {name: schedule})[name]
            served[name]["drafter_forwards"] = len(forwards)
        _shutdown(llm)
    return served


def _count_drafter_forwards(worker, forwards: list) -> None:
    drafter = worker.model_runner.drafter.model
    forward = drafter.forward

    def counted(*args, **kwargs):
        forwards.append(1)
        return forward(*args, **kwargs)

    drafter.forward = counted


@pytest.mark.parametrize("name", [f"k={k}" for k in range(K_MAX + 1)] + ["tail", "trial"])
def test_lossless_for_every_schedule(runs, name):
    plain_tokens, served = runs
    assert served[name]["tokens"] == plain_tokens


@pytest.mark.parametrize("k", range(K_MAX + 1))
def test_drafted_tokens_follow_installed_k(runs, k):
    _, served = runs
    run = served[f"k={k}"]
    for metrics in run["metrics"]:
        drafted = list(metrics.per_step_drafted) if metrics else []
        # Every verify step of every request verified exactly k drafts (none at k=0).
        assert all(d == k for d in drafted) and (k == 0 or drafted), drafted
    decode_steps = [s for s in run["steps"] if s.is_decode]
    assert decode_steps and all(s.schedule_version == run["version"] and s.k == k for s in run["steps"])
    assert all(s.num_draft_tokens in (0, s.batch_size * k) for s in decode_steps)


def test_schedule_follows_batch_size(runs):
    _, served = runs
    steps = served["tail"]["steps"]
    assert {s.k for s in steps if s.batch_size >= 3} == {0}
    assert {s.k for s in steps if s.batch_size <= 2} == {K_MAX}
    # The long tail speculated: tail steps generated more than one token per request on average.
    tail = [s for s in steps if s.batch_size <= 2 and s.num_draft_tokens > 0]
    assert sum(s.num_generated_tokens for s in tail) > 1.5 * sum(s.batch_size for s in tail)


def test_a_trial_alternates_the_two_schedules_in_blocks(runs):
    _, served = runs
    steps = served["trial"]["steps"]
    assert len(steps) > 2 * ALTERNATE_BLOCK_STEPS
    assert [s.alternate for s in steps] == [(i // ALTERNATE_BLOCK_STEPS) % 2 == 1 for i in range(len(steps))]
    for s in steps:
        assert s.k == (dict(((b, k) for start, end, k in TAIL_SCHEDULE for b in range(start, end + 1)))[s.batch_size]
                       if s.alternate else 2), s
    # The drafts verified in a step are the ones the previous step asked for (the block's first step verifies the
    # other schedule's).
    for previous, s in zip(steps, steps[1:]):
        if s.is_decode and s.batch_size == previous.batch_size:
            assert s.num_draft_tokens == s.batch_size * previous.k, (previous, s)


def test_step_records_account_for_every_token(runs):
    _, served = runs
    run = served["k=2"]
    generated = sum(len(t) for t in run["tokens"])
    assert sum(s.num_generated_tokens for s in run["steps"]) == generated
    assert all(s.duration_s > 0 for s in run["steps"])


@pytest.mark.parametrize("name", ["k=0", "tail"])
def test_k0_skips_the_drafter_in_decode_steps_and_stays_lossless(runs, skipping_run, name):
    plain_tokens, _ = runs
    run = skipping_run[name]
    assert run["tokens"] == plain_tokens
    steps = run["steps"]
    # Skipped: decode steps at k = 0 with nothing to verify (one token per request). Prefills still run it.
    skipped = [s.k == 0 and s.num_scheduled_tokens == s.batch_size for s in steps]
    assert any(skipped) and not all(skipped)
    # Every other step runs the drafter's first pass, plus k - 1 more to draft k tokens (vLLM's EAGLE proposer).
    assert run["drafter_forwards"] == sum(max(s.k, 1) for s, skip in zip(steps, skipped) if not skip)

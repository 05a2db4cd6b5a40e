"""The acceptance watchdog in a live respec server (a Ray actor around vLLM CPU): drafter weights garbled inside the
engine, bypassing every check (as vLLM's level-2 sleep has been reported to leave them, vllm-project/vllm#52479), are
noticed after the next rollout and restored; garbled again right after the restore, the engine stops speculating.
Greedy outputs stay identical throughout: the target verifies every draft."""

import asyncio

import pytest

pytest.importorskip("vllm")

import ray  # noqa: E402

from respec_plugin.core.spec_stats import RequestSpecStats  # noqa: E402
from tests.engine.servers import generate, start_server  # noqa: E402

# vLLM carries a callable through collective_rpc only with insecure serialization on (the garbling is test code).
GARBLE_ENV = {"VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}


@pytest.fixture(scope="module")
def server(ray_cluster, tiny_lab):
    handle = start_server(tiny_lab.actor_dir, {"drafter_path": tiny_lab.drafter_dir, "num_speculative_tokens": 3,
                                               "watchdog": {"min_draft_steps": 16}}, env=GARBLE_ENV)
    yield handle
    ray.kill(handle)


def _garble_drafter(server) -> int:
    """Overwrite the drafter's own weights (not those it shares with the actor) with noise in every vLLM worker,
    through collective_rpc, without any of respec's checks; returns the tensors garbled per worker."""

    def garble(worker) -> int:
        import torch

        runner = worker.model_runner
        actor_tensors = {param.data_ptr() for param in runner.get_model().parameters()}
        generator = torch.Generator().manual_seed(0)
        garbled = 0
        with torch.no_grad():
            for param in runner.get_draft_model().parameters():
                if param.data_ptr() not in actor_tensors and param.is_floating_point():
                    param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype))
                    garbled += 1
        return garbled

    def on_server(respec_server) -> list[int]:
        # The server's engine lives on its event loop; this runs on another thread of the actor.
        loop = respec_server.engine.output_handler.get_loop()
        return asyncio.run_coroutine_threadsafe(respec_server.engine.collective_rpc(garble), loop).result(120)

    counts = ray.get(server.__ray_call__.remote(on_server))
    assert counts and min(counts) > 0
    return counts[0]


def _rollout(server, prompts):
    """(token ids per prompt, acceptance length over the rollout, verify steps that drafted), then the watchdog's
    report on it."""
    outputs = generate(server, prompts)
    stats = [RequestSpecStats.from_extra_fields(output.extra_fields) for output in outputs]
    draft_steps = sum(s.drafted_per_pos[0] if s.drafted_per_pos else 0 for s in stats)
    accept_length = 1.0 + sum(s.num_accepted_tokens for s in stats) / max(draft_steps, 1)
    report = ray.get(server.watchdog_check.remote())
    return [list(o.token_ids) for o in outputs], accept_length, draft_steps, report


def test_garbled_drafter_is_restored_then_speculation_turns_off(server, prompts):
    tokens, healthy, _, report = _rollout(server, prompts)
    assert healthy > 1.3 and report.restores == 0 and not report.speculation_off

    _garble_drafter(server)
    garbled_tokens, collapsed, _, report = _rollout(server, prompts)
    print(f"acceptance length: healthy {healthy:.3f}, garbled {collapsed:.3f}")
    assert collapsed < 1.05 and report.restores == 1 and not report.speculation_off
    assert garbled_tokens == tokens  # lossless even with a garbage drafter

    restored_tokens, restored, _, report = _rollout(server, prompts)
    print(f"acceptance length after the restore: {restored:.3f}")
    assert restored == pytest.approx(healthy) and report.restores == 1
    assert restored_tokens == tokens

    _garble_drafter(server)
    _, _, _, report = _rollout(server, prompts)
    assert report.restores == 2 and not report.speculation_off  # restored again...
    _garble_drafter(server)
    _, _, _, report = _rollout(server, prompts)
    assert report.restores == 2 and report.speculation_off  # ...but collapsed right after: speculation off
    off_tokens, _, draft_steps, _ = _rollout(server, prompts)
    assert draft_steps == 0 and off_tokens == tokens

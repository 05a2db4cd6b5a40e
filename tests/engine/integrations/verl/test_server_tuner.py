"""The tuner inside the respec server as verl starts it (Ray actor, vLLM CPU, engine args through verl's CLI):
the default k serves until measured, an update reports ``respec/tuner/*`` metrics, and a restored state's
schedule takes effect on the next requests without changing a greedy token."""

import pytest

pytest.importorskip("vllm")

import ray  # noqa: E402

from respec_plugin.core.spec_stats import RequestSpecStats  # noqa: E402
from tests.engine.servers import generate, start_server  # noqa: E402

DEFAULT_K = 2
K_MAX = 4


@pytest.fixture(scope="module")
def server(ray_cluster, tiny_lab):
    handle = start_server(
        tiny_lab.actor_dir,
        {"drafter_path": tiny_lab.drafter_dir, "num_speculative_tokens": DEFAULT_K, "tuner.mode": "adaptive",
         "tuner.k_max": K_MAX, "tuner.explore": 0.0},
    )
    yield handle
    ray.kill(handle)


def _drafts_per_verify_step(outputs) -> set[float]:
    records = [RequestSpecStats.from_extra_fields(o.extra_fields) for o in outputs]
    return {r.num_draft_tokens / r.num_verify_steps for r in records if r.num_verify_steps}


def test_tuner_serves_updates_and_restores(server, prompts):
    first = generate(server, prompts)
    assert _drafts_per_verify_step(first) == {DEFAULT_K}

    metrics = ray.get(server.tuner_update.remote())
    assert metrics["respec/tuner/k_mean"] == pytest.approx(DEFAULT_K)
    assert metrics["respec/tuner/explore_frac"] == 0.0
    # One k seen: the buckets the rollout ran try SD-off next (the anchor to compare with), all keep the default.
    state = ray.get(server.tuner_state.remote())
    ran = {bucket for bucket, k, *_ in state["measured"] if k == DEFAULT_K}
    assert ran and state["choice"] == [DEFAULT_K] * len(state["choice"])
    assert all(k == (0 if bucket in ran else None) for bucket, k in enumerate(state["challenger"]))
    for bucket, (start, end) in enumerate(state["ranges"]):
        assert metrics[f"respec/tuner/k_by_bucket/{start}-{end}"] == state["choice"][bucket]
        assert metrics.get(f"respec/tuner/trial_k_by_bucket/{start}-{end}") == state["challenger"][bucket]

    for k in (K_MAX, 0):
        fixed = {**state, "choice": [k] * len(state["choice"]), "challenger": [None] * len(state["choice"])}
        ray.get(server.load_tuner_state.remote(fixed))
        outputs = generate(server, prompts)
        assert [o.token_ids for o in outputs] == [o.token_ids for o in first]
        if k:
            assert _drafts_per_verify_step(outputs) == {k}
        else:
            assert all(RequestSpecStats.from_extra_fields(o.extra_fields).num_draft_tokens == 0 for o in outputs)

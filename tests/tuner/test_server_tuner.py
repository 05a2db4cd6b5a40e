"""The tuner inside the respec server as verl starts it (Ray actor, vLLM CPU, engine args through verl's CLI):
the default k serves until calibrated, an update reports ``respec/tuner/*`` metrics, and a restored state's
schedule takes effect on the next requests without changing a greedy token."""

import pytest

pytest.importorskip("vllm")

import ray  # noqa: E402

from tests.rollout.test_server import _generate, _start_server, prompts, ray_cluster  # noqa: E402,F401

DEFAULT_K = 2
K_MAX = 4


@pytest.fixture(scope="module")
def server(ray_cluster, tiny_lab):  # noqa: F811
    handle = _start_server(
        tiny_lab.actor_dir,
        {"drafter_path": tiny_lab.drafter_dir, "num_speculative_tokens": DEFAULT_K, "tuner.mode": "adaptive",
         "tuner.k_max": K_MAX, "tuner.explore": 0.0},
    )
    yield handle
    ray.kill(handle)


def _drafts_per_verify_step(outputs) -> set[float]:
    return {o.extra_fields["respec"]["num_draft_tokens"] / o.extra_fields["respec"]["num_verify_steps"]
            for o in outputs if o.extra_fields["respec"]["num_verify_steps"]}


def test_tuner_serves_updates_and_restores(server, prompts):  # noqa: F811
    first = _generate(server, prompts)
    assert _drafts_per_verify_step(first) == {DEFAULT_K}

    metrics = ray.get(server.tuner_update.remote())
    assert metrics["respec/tuner/k_mean"] == pytest.approx(DEFAULT_K)
    assert metrics["respec/tuner/explore_frac"] == 0.0
    assert metrics["respec/tuner/k_by_bucket/1-1"] == DEFAULT_K  # one k seen: not calibrated, the default stays

    state = ray.get(server.tuner_state.remote())
    for k in (K_MAX, 0):
        ray.get(server.load_tuner_state.remote({**state, "choice": [k] * len(state["choice"])}))
        outputs = _generate(server, prompts)
        assert [o.token_ids for o in outputs] == [o.token_ids for o in first]
        if k:
            assert _drafts_per_verify_step(outputs) == {k}
        else:
            assert all(o.extra_fields["respec"]["num_draft_tokens"] == 0 for o in outputs)

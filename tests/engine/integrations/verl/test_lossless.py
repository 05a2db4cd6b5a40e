"""Speculative sampling through respec is lossless: whole short sequences sampled by vLLM CPU with every drafter
method and a few k, at temperature 0.6 / 1.0 and top_p 1.0 / 0.9, follow the actor's exact sequence distribution.

How: after fixed contexts, each engine draws ``NUM_SAMPLES`` continuations of ``SEQUENCE_LENGTH`` tokens per setting
(one request with ``n=NUM_SAMPLES``); HF transformers computes the actor's exact probability (float32, vLLM's
temperature and top-p rule) of every sequence likely enough to expect ``MIN_EXPECTED_COUNT`` samples; a G-test over
those sequences plus one pooled bin for all others gives a p-value per (engine, setting), rejected below ``ALPHA``
(family-wise 0.01 over all tests, Bonferroni). Power: with 2 x 1500 samples and 10-60 degrees of freedom, a
deviation of chi-square divergence >= 0.03 from the actor (e.g. 6% of the mass moved between sequences of
probability 0.1 and 0.3: 0.048) is rejected with probability >= 0.99 (noncentral chi-square, computed offline);
samples drawn from the reference itself gave uniform p-values. A drafted token is accepted with probability
sum_x min(p(x), q(x)): p(d) for a greedy draft d (q one-hot, vLLM's default), and 1 - TV(p, q) for a draft sampled
from the drafter's distribution q (respec's ``draft_sampling=probabilistic``); the first verify step's measured
acceptance must match the sum of these over the samples (z-test; an exact count where top-p leaves every draft
certain to be accepted or rejected). Plain vLLM goes through the same test (a control for the reference), greedy
outputs of every drafter equal plain vLLM's, and a deliberately broken rejection sampler (accept every draft) is
rejected. Engines run one at a time in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0),
the n-gram one in a spawned process (see ngram_first_draft).
"""

from __future__ import annotations

import gc
import math
from collections import Counter
from dataclasses import dataclass

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from respec_plugin.core.config import ReSpecConfig  # noqa: E402
from respec_plugin.core.drafter.io import load_drafter  # noqa: E402
from respec_lab.data import read_problems  # noqa: E402
from respec_lab.models import chat_prompt_ids  # noqa: E402
from respec_plugin.integrations.verl.server import WORKER_EXTENSION_CLS  # noqa: E402

SEQUENCE_LENGTH = 3
NUM_SAMPLES = 1500  # per context and setting
NUM_CONTEXTS = 2
SETTINGS = ((0.6, 1.0), (1.0, 1.0), (0.6, 0.9), (1.0, 0.9))  # (temperature, top_p)
# Speculative setups under test, (method, k[, draft_sampling]) or None for plain vLLM, and the settings each is
# sampled at: the main setup at all four, the others at two that together cover each temperature and top_p (bounds
# the runtime).
SPECULATION = {
    None: ((1.0, 1.0), (0.6, 0.9)),
    ("eagle3", 3): SETTINGS,
    ("eagle3", 3, "probabilistic"): ((1.0, 1.0), (0.6, 0.9)),
    ("eagle3", 1): ((1.0, 1.0), (0.6, 0.9)),
    ("draft_model", 2): ((0.6, 1.0), (1.0, 0.9)),
    ("ngram", 3): ((1.0, 1.0), (0.6, 0.9)),
}
CASES = [(speculation, setting) for speculation, settings in SPECULATION.items() for setting in settings]
SPECULATIVE_CASES = [case for case in CASES if case[0] is not None]
MIN_EXPECTED_COUNT = 5.0
# Family-wise error 0.01 over the G-tests and acceptance z-tests (Bonferroni).
ALPHA = 0.01 / (len(CASES) + len(SPECULATIVE_CASES))
GREEDY_TOKENS = 24
MAX_MODEL_LEN = 512
ENGINE_KWARGS = dict(dtype="float32", enforce_eager=True, max_model_len=MAX_MODEL_LEN, gpu_memory_utilization=0.3,
                     kv_cache_memory_bytes=256 << 20, max_num_seqs=512, seed=0)


# ----- the actor's exact distribution -------------------------------------------------------------------------


def processed_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The distribution vLLM samples from: logits / T, then its top-p rule (``apply_top_k_top_p_pytorch``: drop the
    ascending-sorted tokens whose cumulative probability stays <= 1 - top_p, always keep the top one)."""
    logits = logits.float() / temperature
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= 1 - top_p
        drop[..., -1] = False
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, -math.inf))
    return logits.softmax(dim=-1)


@torch.no_grad()
def next_token_probs(actor, contexts: list[list[int]], temperature: float, top_p: float) -> torch.Tensor:
    """Processed next-token distributions after equal-length ``contexts`` (one batched forward)."""
    return processed_probs(actor(torch.tensor(contexts)).logits[:, -1], temperature, top_p)


def likely_sequences(actor, context: list[int], temperature: float, top_p: float, min_prob: float
                     ) -> dict[tuple[int, ...], float]:
    """Every continuation of SEQUENCE_LENGTH tokens with probability >= ``min_prob``, with that probability
    (a prefix is at least as likely as its continuations, so expanding likely prefixes finds them all)."""
    frontier: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(SEQUENCE_LENGTH):
        prefixes = list(frontier)
        probs = next_token_probs(actor, [context + list(p) for p in prefixes], temperature, top_p)
        probs = probs * torch.tensor([frontier[p] for p in prefixes], dtype=torch.float64)[:, None]
        frontier = {}
        for row, token in (probs >= min_prob).nonzero().tolist():
            frontier[prefixes[row] + (token,)] = float(probs[row, token])
    return frontier


# ----- statistics -------------------------------------------------------------------------------------------


def g_statistic(samples: list[tuple[int, ...]], reference: dict[tuple[int, ...], float]) -> tuple[float, int]:
    """G = 2 sum O ln(O/E) over the sequences expected MIN_EXPECTED_COUNT times and one bin pooling the rest
    (merged into the least likely bin when it is itself expected less often); returns (G, degrees of freedom)."""
    n = len(samples)
    counts = Counter(samples)
    bins = sorted((p, s) for s, p in reference.items() if n * p >= MIN_EXPECTED_COUNT)
    expected = [n * p for p, _ in bins]
    observed = [counts[s] for _, s in bins]
    expected_rest, observed_rest = n - sum(expected), n - sum(observed)
    if expected_rest >= MIN_EXPECTED_COUNT:
        expected.append(expected_rest)
        observed.append(observed_rest)
    else:
        expected[0] += expected_rest
        observed[0] += observed_rest
    g = 2 * sum(o * math.log(o / e) for o, e in zip(observed, expected) if o > 0)
    return g, len(expected) - 1


def chi2_sf(statistic: float, df: int) -> float:
    """P(chi2_df >= statistic): the regularized upper incomplete gamma Q(df/2, statistic/2)."""
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(statistic / 2, dtype=torch.float64)))


def two_sided_normal_p(z: float) -> float:
    return math.erfc(abs(z) / math.sqrt(2))


# ----- sampling through vLLM ----------------------------------------------------------------------------------


@dataclass
class Sampled:
    """One engine's draws: per setting and context, the sampled sequences and, per sample, the first verify step's
    (drafted, accepted) counts (None for plain vLLM or a sample without a drafted step)."""

    sequences: dict[tuple[float, float], list[list[tuple[int, ...]]]]
    first_step: dict[tuple[float, float], list[list[tuple[int, int] | None]]]
    greedy: list[list[int]]


def _engine(actor_dir: str, speculation: ReSpecConfig | None):
    from vllm import LLM

    kwargs = dict(ENGINE_KWARGS)
    if speculation is not None:
        kwargs.update(speculative_config=speculation.speculative_config(), per_request_spec_decode_metrics="detailed",
                      worker_extension_cls=WORKER_EXTENSION_CLS)
    if speculation is None or speculation.method != "ngram":
        return LLM(model=actor_dir, **kwargs)
    # vLLM's n-gram proposer is numba-compiled; numba loaded in this process would break every later vLLM CPU
    # engine start here (see ngram_first_draft), so this engine gets a freshly spawned engine-core process.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
        patch.setenv("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        return LLM(model=actor_dir, **kwargs)


def _sample(llm, contexts: list[list[int]], settings, greedy: bool = True) -> Sampled:
    from vllm import SamplingParams

    requests = [(setting, c) for setting in settings for c in contexts]
    params = [SamplingParams(n=NUM_SAMPLES, temperature=t, top_p=p, max_tokens=SEQUENCE_LENGTH, ignore_eos=True)
              for (t, p), _ in requests]
    outputs = llm.generate([{"prompt_token_ids": c} for _, c in requests], params, use_tqdm=False)
    sampled = Sampled({s: [] for s in settings}, {s: [] for s in settings}, [])
    for (setting, _), output in zip(requests, outputs):
        sampled.sequences[setting].append([tuple(o.token_ids) for o in output.outputs])
        sampled.first_step[setting].append([_first_step(o.spec_decode_metrics) for o in output.outputs])
    if not greedy:
        return sampled
    greedy = llm.generate([{"prompt_token_ids": c} for c in contexts],
                          SamplingParams(temperature=0.0, max_tokens=GREEDY_TOKENS, ignore_eos=True), use_tqdm=False)
    sampled.greedy = [list(o.outputs[0].token_ids) for o in greedy]
    return sampled


def _first_step(metrics) -> tuple[int, int] | None:
    if metrics is None or not metrics.per_step_drafted:
        return None
    return metrics.per_step_drafted[0], metrics.per_step_accepted[0]


def _shutdown(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


# ----- fixtures -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def in_process_engines():
    """vLLM's engine core in this process: no engine subprocess to start, and a patched sampler reaches it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        yield


@pytest.fixture(scope="module")
def actor(tiny_lab):
    torch.set_num_threads(1)
    return AutoModelForCausalLM.from_pretrained(tiny_lab.actor_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def contexts(tiny_lab, actor) -> list[list[int]]:
    """Chat prompts plus the actor's greedy answer up to its most uncertain SEQUENCE_LENGTH tokens (the numbers of
    the arithmetic), so the sampled sequences spread over many outcomes instead of one."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_lab.actor_dir)
    chosen = []
    for problem in read_problems(tiny_lab.val_parquet)[:NUM_CONTEXTS]:
        prompt = chat_prompt_ids(tokenizer, problem.question)
        with torch.no_grad():
            answer = actor.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False)[0].tolist()
            log_probs = actor(torch.tensor([answer])).logits[0, len(prompt) - 1 : -1].log_softmax(-1)
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        window = entropy.unfold(0, SEQUENCE_LENGTH, 1).sum(-1)
        chosen.append(answer[: len(prompt) + int(window.argmax())])
    return chosen


@pytest.fixture(scope="module")
def draft_model_dir(tiny_lab, tmp_path_factory) -> str:
    """A draft model with the actor's vocabulary: the actor cut to its first decoder layer."""
    model = AutoModelForCausalLM.from_pretrained(tiny_lab.actor_dir, dtype=torch.float32)
    model.model.layers = model.model.layers[:1]
    model.config.num_hidden_layers = 1
    model.config.layer_types = model.config.layer_types[:1]
    model.config.max_window_layers = 1
    path = tmp_path_factory.mktemp("draft_model")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_lab.actor_dir).save_pretrained(path)
    return str(path)


def _respec_config(speculation: tuple, tiny_lab, draft_model_dir: str) -> ReSpecConfig:
    method, k, *draft_sampling = speculation
    drafter_path = {"eagle3": tiny_lab.drafter_dir, "draft_model": draft_model_dir, "ngram": None}[method]
    return ReSpecConfig(method=method, drafter_path=drafter_path, num_speculative_tokens=k,
                        draft_sampling=draft_sampling[0] if draft_sampling else "greedy")


@pytest.fixture(scope="module")
def sampled(in_process_engines, tiny_lab, contexts, draft_model_dir):
    """``sampled(speculation)``: that engine's draws, sampled on first use (one engine alive at a time)."""
    cache: dict[str, Sampled] = {}

    def get(speculation) -> Sampled:
        if _name(speculation) not in cache:
            config = None if speculation is None else _respec_config(speculation, tiny_lab, draft_model_dir)
            llm = _engine(tiny_lab.actor_dir, config)
            try:
                cache[_name(speculation)] = _sample(llm, contexts, SPECULATION[speculation])
            finally:
                _shutdown(llm)
        return cache[_name(speculation)]

    return get


def _name(speculation) -> str:
    return "plain" if speculation is None else "_".join([speculation[0], f"k{speculation[1]}", *speculation[2:]])


@pytest.fixture(scope="module")
def references(actor, contexts) -> dict[tuple[float, float], list[dict[tuple[int, ...], float]]]:
    min_prob = MIN_EXPECTED_COUNT / NUM_SAMPLES
    return {(t, p): [likely_sequences(actor, c, t, p, min_prob) for c in contexts] for t, p in SETTINGS}


def lossless_p_value(sequences: list[list[tuple[int, ...]]], references: list[dict]) -> tuple[float, float, int]:
    """G-test over all contexts of one setting: (p-value, G, degrees of freedom)."""
    g, df = map(sum, zip(*(g_statistic(s, r) for s, r in zip(sequences, references))))
    return chi2_sf(g, df), g, df


# ----- drafts and their acceptance ----------------------------------------------------------------------------


def ngram_first_draft(tokens: list[int], min_n: int, max_n: int) -> int | None:
    """vLLM's n-gram proposal (``ngram_proposer._find_longest_matched_ngram_and_propose_tokens``), first token: the
    token after the earliest earlier occurrence of the longest suffix of length in [min_n, max_n]. Plain Python:
    vLLM's version is numba, and numba in this process breaks later vLLM CPU engine starts (vllm/triton_utils/
    dispatcher.py scans every module and trips over llvmlite's ``ffi.lib``)."""
    total = len(tokens)
    for n in range(min(max_n, total - 1), min_n - 1, -1):
        suffix = tokens[total - n :]
        for start in range(total - n):
            if tokens[start : start + n] == suffix:
                return tokens[start + n]
    return None


class FirstDraft:
    """The first token each drafter proposes after ``context + [x1]`` (x1: the token the target sampled at prefill),
    computed outside vLLM: the torch EAGLE-3 head on HF actor features, the draft model's argmax, vLLM's n-gram
    lookup; and the EAGLE-3 head's distribution a probabilistic draft is sampled from."""

    def __init__(self, actor, tiny_lab, draft_model_dir: str):
        self.actor = actor
        self.eagle3, _ = load_drafter(tiny_lab.drafter_dir)
        self.draft_model = AutoModelForCausalLM.from_pretrained(draft_model_dir, dtype=torch.float32).eval()
        self._aux_hidden_states: dict[tuple[int, ...], torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, config: ReSpecConfig, context: list[int], x1: int) -> int | None:
        if config.method == "eagle3":
            draft = self.eagle3.propose(torch.tensor(context + [x1]), self._aux(context), config.num_speculative_tokens,
                                        self.actor.get_input_embeddings().weight)
            return draft[0]
        if config.method == "draft_model":
            return int(self.draft_model(torch.tensor([context + [x1]])).logits[0, -1].argmax())
        return ngram_first_draft(context + [x1], config.prompt_lookup_min, config.prompt_lookup_max)

    @torch.no_grad()
    def eagle3_distribution(self, context: list[int], x1: int, temperature: float) -> torch.Tensor:
        """q over the actor's vocabulary: the head's first-step logits / T, softmax over its draft vocabulary (vLLM
        applies only the temperature to draft logits)."""
        embed_tokens = self.actor.get_input_embeddings().weight
        input_ids = torch.tensor(context + [x1])
        steps = self.eagle3.unroll(torch.nn.functional.embedding(input_ids, embed_tokens)[None],
                                   torch.nn.functional.pad(self._aux(context), (0, 0, 0, 1))[None], 1,
                                   first_anchor=input_ids.shape[0] - 2)
        q = torch.zeros(embed_tokens.shape[0])
        q[self.eagle3.draft_token_ids] = (steps.logits[0][0, 0].float() / temperature).softmax(-1)
        return q

    def _aux(self, context: list[int]) -> torch.Tensor:
        """The actor's EAGLE-3 input features over ``context`` (the target's hidden states at the aux layers)."""
        key = tuple(context)
        if key not in self._aux_hidden_states:
            hidden_states = self.actor(torch.tensor([context]), output_hidden_states=True).hidden_states
            layer_ids = self.eagle3.config.eagle_aux_hidden_state_layer_ids
            self._aux_hidden_states[key] = torch.cat([hidden_states[i][0] for i in layer_ids], dim=-1)
        return self._aux_hidden_states[key]


@dataclass(frozen=True)
class FirstDraftAcceptance:
    """Over the samples whose drafter proposed a first token at the first verify step: how many were accepted
    (``measured``), the sum over them of sum_x min(p(x), q(x)) after (context, x1) (``expected``), its variance, and
    how many there were (``drafted``). Sums over contexts add up."""

    measured: float = 0.0
    expected: float = 0.0
    variance: float = 0.0
    drafted: int = 0

    def __add__(self, other: FirstDraftAcceptance) -> FirstDraftAcceptance:
        return FirstDraftAcceptance(self.measured + other.measured, self.expected + other.expected,
                                    self.variance + other.variance, self.drafted + other.drafted)


def first_draft_acceptance(first_draft: FirstDraft, actor, config: ReSpecConfig, context: list[int],
                           sequences: list[tuple[int, ...]], first_steps: list, temperature: float, top_p: float
                           ) -> FirstDraftAcceptance:
    """The first drafted token's acceptance after ``context``, measured by vLLM and expected from the actor."""
    distinct_x1 = sorted({s[0] for s in sequences})
    probs = next_token_probs(actor, [context + [x1] for x1 in distinct_x1], temperature, top_p)
    accept_prob = {}
    for x1, row in zip(distinct_x1, probs):
        if config.draft_sampling == "probabilistic":
            accept_prob[x1] = float(torch.minimum(row, first_draft.eagle3_distribution(context, x1, temperature)).sum())
            continue
        draft = first_draft(config, context, x1)
        accept_prob[x1] = None if draft is None else float(row[draft])
    measured = expected = variance = 0.0
    drafted = 0
    for sequence, step in zip(sequences, first_steps):
        p = accept_prob[sequence[0]]
        if p is None:
            continue
        assert step is not None and step[0] > 0, "vLLM drafted nothing where the drafter proposes a token"
        measured += step[1] > 0
        expected += p
        variance += p * (1 - p)
        drafted += 1
    return FirstDraftAcceptance(measured, expected, variance, drafted)


@pytest.fixture(scope="module")
def first_draft(actor, tiny_lab, draft_model_dir) -> FirstDraft:
    return FirstDraft(actor, tiny_lab, draft_model_dir)


# ----- tests ------------------------------------------------------------------------------------------------


def _case_id(case) -> str:
    speculation, (temperature, top_p) = case
    return f"{_name(speculation)}-T{temperature}-top_p{top_p}"


@pytest.mark.parametrize(("speculation", "setting"), CASES, ids=map(_case_id, CASES))
def test_sequences_follow_the_actor_distribution(sampled, references, speculation, setting) -> None:
    p_value, g, df = lossless_p_value(sampled(speculation).sequences[setting], references[setting])
    assert p_value >= ALPHA, f"{_name(speculation)} at {setting}: G={g:.1f}, df={df}, p={p_value:.2e} < {ALPHA:.1e}"


@pytest.mark.parametrize(("speculation", "setting"), SPECULATIVE_CASES, ids=map(_case_id, SPECULATIVE_CASES))
def test_acceptance_matches_sum_of_min_p_q(sampled, actor, contexts, first_draft, tiny_lab, draft_model_dir,
                                           speculation, setting) -> None:
    config = _respec_config(speculation, tiny_lab, draft_model_dir)
    run = sampled(speculation)
    total = FirstDraftAcceptance()
    for context, sequences, steps in zip(contexts, run.sequences[setting], run.first_step[setting]):
        total += first_draft_acceptance(first_draft, actor, config, context, sequences, steps, *setting)
    assert total.drafted > 0, "no drafted token to check"
    if total.variance == 0:  # every draft certain to be accepted (p = 1) or rejected (p = 0): an exact count
        assert total.measured == total.expected, (
            f"{_name(speculation)} at {setting}: {total.measured:.0f} of {total.drafted} certain first drafts "
            f"accepted, expected {total.expected:.0f}")
        return
    z = (total.measured - total.expected) / math.sqrt(total.variance)
    assert two_sided_normal_p(z) >= ALPHA, (
        f"{_name(speculation)} at {setting}: {total.measured:.0f} first drafts accepted, expected "
        f"{total.expected:.1f} (z={z:.1f})")


@pytest.mark.parametrize("speculation", [s for s in SPECULATION if s is not None], ids=_name)
def test_greedy_outputs_equal_plain_vllm(sampled, speculation) -> None:
    assert sampled(speculation).greedy == sampled(None).greedy


def accept_every_draft(draft_token_ids, num_draft_tokens, max_spec_len, cu_num_draft_tokens, draft_probs,
                       target_logits, bonus_token_ids, sampling_metadata, **_):
    """A lossy rejection sampler: every drafted token is accepted, then the bonus token."""
    from vllm.v1.sample.rejection_sampler import PLACEHOLDER_TOKEN_ID

    output = torch.full((len(num_draft_tokens), max_spec_len + 1), PLACEHOLDER_TOKEN_ID, dtype=torch.int32)
    start = 0
    for row, count in enumerate(num_draft_tokens):
        output[row, :count] = draft_token_ids[start : start + count]
        output[row, count] = bonus_token_ids[row, 0]
        start += count
    return output


def test_a_lossy_rejection_sampler_is_caught(in_process_engines, tiny_lab, contexts, references, first_draft,
                                             actor, draft_model_dir, monkeypatch) -> None:
    """The same checks on an engine whose rejection sampler accepts every draft must fail."""
    import vllm.v1.sample.rejection_sampler as rejection_sampler

    monkeypatch.setattr(rejection_sampler, "rejection_sample", accept_every_draft)
    config = _respec_config(("eagle3", 3), tiny_lab, draft_model_dir)
    setting = (1.0, 1.0)
    llm = _engine(tiny_lab.actor_dir, config)
    try:
        broken = _sample(llm, contexts, [setting], greedy=False)
    finally:
        _shutdown(llm)
    p_value, g, df = lossless_p_value(broken.sequences[setting], references[setting])
    assert p_value < ALPHA, f"G={g:.1f}, df={df}, p={p_value:.2e}: the broken sampler went unnoticed"
    acceptance = first_draft_acceptance(first_draft, actor, config, contexts[0], broken.sequences[setting][0],
                                        broken.first_step[setting][0], *setting)
    assert acceptance.measured > acceptance.expected + 0.1 * NUM_SAMPLES

"""respec's EAGLE-3 head against the ``speculators`` library's (``Eagle3DraftModel``, speculators 0.9.0), to decide
whether respec builds on speculators (issue 21; the decision is in benchmarks/README.md):

- layout: a speculators-saved checkpoint loads into respec's head, and the head saves it back in a form
  ``Eagle3DraftModel.from_pretrained`` loads, with the same weights;
- forward equivalence on the same weights: both heads' logits at every draft step (teacher forcing) on the tiny
  lab actor's features, with ``norm_before_residual`` off and on, for each attention backend speculators offers here;
- one KD training step (3 draft steps, forward + backward + AdamW) of each, on the tiny lab's head shape and on a
  Qwen2.5-0.5B-shaped head: its time and memory, each in a fresh process (speculators with its draft LM head frozen,
  as it trains, and trained, as respec's learner does);
- the install cost: speculators' requirements against this CPU venv, the import time, and (with the options below)
  what pip would change and whether vLLM still imports beside the torchvision / torchaudio pip would add.

speculators is not a dependency of respec: run this where it is importable, without installing it into the project's
venv (pip would downgrade datasets and add torchvision / torchaudio builds that break vLLM beside torch+cpu):

    pip install --target /tmp/speculators --no-deps speculators==0.9.0 hs-connectors==0.9.0
    pip install --target /tmp/speculators-extra --no-deps torchvision==0.28.0 torchaudio==2.11.1   # optional
    PYTHONPATH=/tmp/speculators .venv/bin/python benchmarks/speculators_comparison.py \
        --pip-dry-run --extra-deps /tmp/speculators-extra

Writes benchmarks/results/speculators_comparison.json.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.metadata
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import common

NAME = "speculators_comparison"
NUM_DRAFT_STEPS = 3
# speculators' attention backend in the KD-step timing: the fastest one that runs on CPU (flex attention needs
# lengths in multiples of its 128-token blocks, see the forward equivalence).
KD_ATTENTION = "sdpa"
KD_IMPLEMENTATIONS = ("respec", "speculators", "speculators_lm_head_trained")
SPECULATORS_VERSION = "0.9.0"
# Head shapes of the KD-step timing: the tiny lab's, and a head for Qwen2.5-0.5B-Instruct (its decoder layer shape,
# vocabulary and EAGLE-3's 32k draft vocabulary).
SHAPES = {
    "tiny_lab": dict(hidden_size=128, intermediate_size=384, num_attention_heads=2, num_key_value_heads=1,
                     head_dim=64, vocab_size=512, draft_vocab_size=256, sequences=8, length=128),
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2,
                         head_dim=64, vocab_size=151936, draft_vocab_size=32000, sequences=4, length=256),
}


# ----- the same head in both libraries ------------------------------------------------------------------------------

def speculators_head(drafter, embedding: torch.Tensor, verifier_lm_head: torch.Tensor,
                     verifier_norm: torch.Tensor, attn_implementation: str, verifier_path: str | None = None):
    """speculators' ``Eagle3DraftModel`` with ``drafter``'s weights, the target's embedding and (for its loss) the
    target's final norm and LM-head rows of the draft vocabulary."""
    from transformers import LlamaConfig

    from speculators import SpeculatorsConfig, VerifierConfig
    from speculators.models.eagle3 import Eagle3DraftModel, Eagle3SpeculatorConfig
    from speculators.proposals.greedy import GreedyTokenProposalConfig

    c = drafter.config
    layer = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                        num_hidden_layers=1, num_attention_heads=c.num_attention_heads,
                        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps,
                        max_position_embeddings=c.max_position_embeddings,
                        rope_parameters={"rope_theta": c.rope_theta, "rope_type": "default"})
    layer._attn_implementation = attn_implementation
    config = Eagle3SpeculatorConfig(
        transformer_layer_config=layer, draft_vocab_size=c.draft_vocab_size,
        norm_before_residual=c.norm_before_residual, eagle_aux_hidden_state_layer_ids=list(
            c.eagle_aux_hidden_state_layer_ids),
        speculators_config=SpeculatorsConfig(
            algorithm="eagle3", proposal_methods=[GreedyTokenProposalConfig(speculative_tokens=NUM_DRAFT_STEPS)],
            default_proposal_method="greedy",
            verifier=VerifierConfig(name_or_path=verifier_path, architectures=["Qwen2ForCausalLM"])))
    model = Eagle3DraftModel(config)
    state = {name.replace("midlayer.", "layers.0.", 1): tensor for name, tensor in drafter.state_dict().items()
             if name != "draft_token_ids"}
    state |= {"d2t": drafter.d2t, "t2d": drafter.t2d, "embed_tokens.weight": embedding,
              "verifier_lm_head.weight": verifier_lm_head, "verifier_norm.weight": verifier_norm}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and not [m for m in missing if "rotary" not in m], (missing, unexpected)
    return model


def speculators_logits(model, aux_hidden_states: torch.Tensor, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """speculators' draft logits per step for one sequence [T] (its inputs: the token after each position, teacher
    forced at later steps), read off its LM head."""
    logits: list[torch.Tensor] = []
    hook = model.lm_head.register_forward_hook(lambda module, args, output: logits.append(output.detach()[0]))
    try:
        with torch.no_grad():
            model(hidden_states=aux_hidden_states[None], input_ids=F.pad(input_ids[1:], (0, 1))[None],
                  document_ids=torch.zeros(1, input_ids.numel(), dtype=torch.long), ttt_steps=NUM_DRAFT_STEPS)
    finally:
        hook.remove()
    return logits


def respec_logits(drafter, input_embeds: torch.Tensor, aux_hidden_states: torch.Tensor) -> list[torch.Tensor]:
    """respec's draft logits per step for one sequence, teacher forced as speculators trains."""
    shifted = [F.pad(input_embeds[j + 1:], (0, 0, 0, j + 1))[None] for j in range(1, NUM_DRAFT_STEPS)]
    with torch.no_grad():
        steps = drafter.unroll(input_embeds[None], aux_hidden_states[None], NUM_DRAFT_STEPS,
                               step_input_embeds=shifted)
    return [logits[0] for logits in steps.logits]


# ----- measurements -------------------------------------------------------------------------------------------------

def lab_inputs(lab, num_sequences: int = 8):
    """The tiny lab's actor and warmed-up drafter, and the actor's features of prompts + reference solutions."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from respec_lab.data import read_problems
    from respec_lab.models import chat_prompt_ids
    from respec_plugin.core.drafter.io import load_drafter
    from respec_plugin.core.drafter.warmup import actor_features

    tokenizer = AutoTokenizer.from_pretrained(lab.actor_dir)
    actor = AutoModelForCausalLM.from_pretrained(lab.actor_dir, dtype=torch.float32).eval()
    drafter, _ = load_drafter(lab.drafter_dir)
    sequences = [torch.tensor(chat_prompt_ids(tokenizer, p.question) + tokenizer(p.solution).input_ids)
                 for p in read_problems(lab.val_parquet)[:num_sequences]]
    features = [actor_features(actor, s[None], torch.ones_like(s)[None], drafter) for s in sequences]
    return actor, drafter, sequences, features


def layout_check(lab, actor, drafter, workdir: Path) -> dict:
    """speculators-saved -> respec load -> respec save -> speculators load, weights compared at each end."""
    from speculators.models.eagle3 import Eagle3DraftModel

    from respec_plugin.core.drafter.io import load_drafter, save_drafter

    head = speculators_head(drafter, actor.get_input_embeddings().weight.detach(),
                            actor.get_output_embeddings().weight.detach()[drafter.draft_token_ids],
                            actor.model.norm.weight.detach(), "eager", lab.actor_dir)
    head.save_pretrained(workdir / "saved_by_speculators")
    loaded, _ = load_drafter(workdir / "saved_by_speculators")
    save_drafter(loaded, workdir / "saved_by_respec", drafter_version=1)
    reread = Eagle3DraftModel.from_pretrained(workdir / "saved_by_respec")
    theirs, ours = reread.state_dict(), head.state_dict()
    shared = [name for name in ours if not name.startswith(("verifier_", "embed_tokens", "rotary_emb"))]
    return {
        "respec_reads_speculators_checkpoint_as": loaded.format.name,
        "respec_weights_equal_speculators_saved": all(
            torch.equal(t, drafter.state_dict()[name]) for name, t in loaded.state_dict().items()),
        "speculators_reads_respec_saved_checkpoint": all(torch.equal(theirs[n], ours[n]) for n in shared),
        "tensors_compared": len(shared),
        "files_saved_by_speculators": sorted(p.name for p in (workdir / "saved_by_speculators").iterdir()),
        "files_saved_by_respec": sorted(p.name for p in (workdir / "saved_by_respec").iterdir()),
    }


def forward_equivalence(lab, actor, drafter, sequences, features) -> dict:
    """Max |logit difference| between the heads per draft step over every anchor that has a teacher-forced input,
    and how often their greedy drafts agree, per attention backend and ``norm_before_residual`` value."""
    report = {}
    for norm_before_residual in (False, True):
        head = copy.deepcopy(drafter)
        head.config = dataclasses.replace(drafter.config, norm_before_residual=norm_before_residual)
        for attn in ("eager", "sdpa", "simple_flex_attention"):
            key = f"norm_before_residual={norm_before_residual}/{attn}"
            try:
                theirs_model = speculators_head(head, actor.get_input_embeddings().weight.detach(),
                                                actor.get_output_embeddings().weight.detach()[head.draft_token_ids],
                                                actor.model.norm.weight.detach(), attn).eval()
                diffs, agree, total, scale = [0.0] * NUM_DRAFT_STEPS, 0, 0, 0.0
                for ids, f in zip(sequences, features):
                    ours = respec_logits(head, f.input_embeds[0], f.aux_hidden_states[0])
                    theirs = speculators_logits(theirs_model, f.aux_hidden_states[0], ids)
                    for step, (a, b) in enumerate(zip(ours, theirs)):
                        a, b = a[: ids.numel() - 1 - step], b[: ids.numel() - 1 - step]
                        diffs[step] = max(diffs[step], float((a - b).abs().max()))
                        scale = max(scale, float(a.abs().max()))
                        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
                        total += a.shape[0]
                report[key] = {"max_abs_logit_diff_per_step": diffs, "max_abs_logit": scale,
                               "greedy_draft_agreement": agree / total, "anchors_compared": total}
            except Exception as e:  # noqa: BLE001 -- a backend speculators cannot run here is a finding
                report[key] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    return report


def kd_step_worker(impl: str, shape_name: str, steps: int) -> dict:
    """Time and memory of ``steps`` KD training steps (after one warm-up step) of one library's head, in this
    process (the caller runs each in a fresh one)."""
    from respec_plugin.core.drafter.eagle3 import Eagle3Config, init_from_actor
    from respec_plugin.core.learner.buffer import Minibatch
    from respec_plugin.core.learner.losses import TopKTarget
    from respec_plugin.core.learner.objective import kd_loss_by_step

    shape = dict(SHAPES[shape_name])
    sequences, length = shape.pop("sequences"), shape.pop("length")
    generator = torch.Generator().manual_seed(0)
    config = Eagle3Config(**shape, eagle_aux_hidden_state_layer_ids=(1, 2, 3))
    h, vocab, draft_vocab = config.hidden_size, config.vocab_size, config.draft_vocab_size
    embedding = torch.randn(vocab, h, generator=generator) * 0.02
    actor_lm_head = torch.randn(vocab, h, generator=generator) * 0.02
    drafter = init_from_actor(config, actor_lm_head, torch.arange(draft_vocab), seed=0)
    input_ids = torch.randint(vocab, (sequences, length), generator=generator)
    aux = torch.randn(sequences, length, 3 * h, generator=generator)
    mask = torch.ones(sequences, length)
    if impl == "respec":
        model = drafter
        # The online learner's batch: the actor's embedding outputs and its top-32 targets, captured in its forward.
        top_ids = torch.randint(draft_vocab, (sequences, length, 32), generator=generator)
        batch = Minibatch(input_ids=input_ids, input_embeds=F.embedding(input_ids, embedding), aux_hidden_states=aux,
                          target=TopKTarget(torch.rand(sequences, length, 32, generator=generator).softmax(-1),
                                            top_ids), loss_mask=mask, token_weights=mask)

        def loss_fn():
            loss, _ = kd_loss_by_step(drafter, batch, divergence="forward_kl", negative_feedback_coef=0.0,
                                      num_draft_steps=NUM_DRAFT_STEPS)
            return loss
    else:
        model = speculators_head(drafter, embedding, actor_lm_head[:draft_vocab], torch.ones(h), KD_ATTENTION)
        model.train()
        # speculators keeps the draft LM head (the verifier's rows) frozen; respec's learner trains it.
        model.lm_head.weight.requires_grad_(impl == "speculators_lm_head_trained")
        # speculators' batch: sequences packed into one row, its targets from the verifier's last hidden states.
        packed_ids = input_ids.reshape(1, -1)
        documents = torch.arange(sequences).repeat_interleave(length)[None]
        positions = torch.arange(length).repeat(sequences)[None] + 1
        last_hidden = torch.randn(1, sequences * length, h, generator=generator)
        from speculators.losses import resolve_loss_config

        # Its default KL is a fused Triton kernel (GPU only); the eager one on CPU.
        loss_config = resolve_loss_config("kl_div", "eager")

        def loss_fn():
            _, loss, _ = model(hidden_states=aux.reshape(1, -1, 3 * h), input_ids=packed_ids, document_ids=documents,
                               loss_mask=mask.reshape(1, -1).bool(), position_ids=positions,
                               verifier_last_hidden_states=last_hidden, ttt_steps=NUM_DRAFT_STEPS,
                               loss_config=loss_config)
            return loss
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    rss_setup = _rss_mb()
    times = []
    for step in range(steps + 1):
        start = time.perf_counter()
        loss = loss_fn()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step:  # the first step allocates the optimizer state and warms the kernels up
            times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "tokens_per_step": sequences * length,
        "step_seconds_median": statistics.median(times), "step_seconds": times,
        "trainable_parameters": sum(p.numel() for p in trainable),
        "module_tensor_mb": sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) / 2**20,
        "rss_after_setup_mb": rss_setup, "peak_rss_mb": peak,
    }


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def kd_steps(steps: int, repeats: int) -> dict:
    """Each head's KD steps in ``repeats`` fresh processes, the heads taking turns (in a rotating order), so a change
    in the machine's speed (other jobs share its 2 cores) falls on all of them; the median over every timed step of
    every repeat, and the largest peak memory."""
    runs: dict[str, list[dict]] = {}
    for repeat in range(repeats):
        for shape in SHAPES:
            order = KD_IMPLEMENTATIONS[repeat % 3:] + KD_IMPLEMENTATIONS[:repeat % 3]
            for impl in order:
                out = subprocess.run([sys.executable, __file__, "--kd-worker", impl, "--shape", shape, "--steps",
                                      str(steps)], capture_output=True, text=True, check=False)
                runs.setdefault(f"{shape}/{impl}", []).append(
                    json.loads(out.stdout.splitlines()[-1]) if out.returncode == 0 else {"error": out.stderr[-1500:]})
    report = {}
    for key, results in runs.items():
        ok = [r for r in results if "error" not in r]
        report[key] = {"errors": [r["error"] for r in results if "error" in r]} if not ok else {
            "step_seconds_median": statistics.median(t for r in ok for t in r["step_seconds"]),
            "repeat_medians": [r["step_seconds_median"] for r in ok],
            **{name: ok[0][name] for name in ("tokens_per_step", "trainable_parameters", "module_tensor_mb")},
            "rss_after_setup_mb": statistics.median(r["rss_after_setup_mb"] for r in ok),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in ok),
        }
    return report


def _import_seconds(module: str, env: dict | None = None, repeats: int = 3) -> float | str:
    """Median wall time of a fresh interpreter importing ``module``, or the error."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, env=env)
        if out.returncode:
            return out.stderr.strip().splitlines()[-1]
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def install_cost(pip_dry_run: bool, extra_deps: str | None) -> dict:
    """speculators' requirements checked against this venv, import times, and optionally pip's plan for the venv and
    whether vLLM still imports beside the torchvision / torchaudio pip would add."""
    from packaging.requirements import Requirement

    requirements = [Requirement(r) for r in importlib.metadata.requires("speculators") or []]
    unmet = {}
    for requirement in requirements:
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        try:
            installed = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            unmet[requirement.name] = {"requires": str(requirement.specifier) or "any", "installed": None}
            continue
        if not requirement.specifier.contains(installed.split("+")[0], prereleases=True):
            unmet[requirement.name] = {"requires": str(requirement.specifier), "installed": installed}
    report = {
        "speculators_requires": [str(r) for r in requirements if r.marker is None],
        "unmet_in_this_venv": unmet,
        "import_seconds": {"respec_plugin.core.drafter.eagle3": _import_seconds("respec_plugin.core.drafter.eagle3"),
                           "speculators.models.eagle3": _import_seconds("speculators.models.eagle3")},
    }
    if pip_dry_run:  # on the venv alone: without the PYTHONPATH that holds speculators here
        venv_env = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
        with tempfile.TemporaryDirectory() as tmp:
            out = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report",
                                  f"{tmp}/report.json", "-c", str(common.REPO / "scripts" / "constraints-cpu.txt"),
                                  f"speculators=={SPECULATORS_VERSION}"], capture_output=True, text=True,
                                 env=venv_env)
            plan = json.loads(Path(f"{tmp}/report.json").read_text()) if out.returncode == 0 else None
        report["pip_dry_run_with_project_constraints"] = (
            {i["metadata"]["name"]: i["metadata"]["version"] for i in plan["install"]} if plan
            else {"error": out.stderr[-1500:]})
    if extra_deps:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [extra_deps, os.environ.get("PYTHONPATH")])))
        report["with_speculators_torchvision_torchaudio"] = {
            module: _import_seconds(module, env, repeats=1)
            for module in ("vllm.model_executor.models.registry", "torchvision", "torchaudio")}
    return report


def main() -> None:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--steps", type=int, default=3, help="timed KD steps per head (after one warm-up step)")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per head and shape, taking turns")
    parser.add_argument("--pip-dry-run", action="store_true", help="record what pip would change to add speculators")
    parser.add_argument("--extra-deps", help="a --target dir with torchvision/torchaudio as pip would add them")
    parser.add_argument("--kd-worker", choices=KD_IMPLEMENTATIONS, help=argparse.SUPPRESS)
    parser.add_argument("--shape", choices=sorted(SHAPES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.kd_worker:
        print(json.dumps(kd_step_worker(args.kd_worker, args.shape, args.steps)))
        return
    common.setup_logging()
    try:
        version = importlib.metadata.version("speculators")
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit("speculators is not importable: see this script's docstring (--help) for how to run it")
    from respec_lab.build import build_lab

    lab = build_lab("tiny")
    report = {"speculators_version": version, "torch": torch.__version__,
              "transformers": importlib.metadata.version("transformers"), "cpu_count": os.cpu_count(),
              "machine": platform.machine()}
    actor, drafter, sequences, features = lab_inputs(lab)
    with tempfile.TemporaryDirectory() as tmp:
        report["layout"] = layout_check(lab, actor, drafter, Path(tmp))
    common.write_results(NAME, report)
    report["forward_equivalence"] = forward_equivalence(lab, actor, drafter, sequences, features)
    common.write_results(NAME, report)
    report["kd_step"] = {"speculators_attention": KD_ATTENTION, "repeats": args.repeats,
                         **kd_steps(args.steps, args.repeats)}
    common.write_results(NAME, report)
    report["install"] = install_cost(args.pip_dry_run, args.extra_deps)
    print(common.write_results(NAME, report))


if __name__ == "__main__":
    main()

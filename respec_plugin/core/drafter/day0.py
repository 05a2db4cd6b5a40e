"""Day-0 EAGLE-3 drafter for a Hugging Face actor directory: untrained, saved in the layout vLLM's ``eagle3``
loads, so a run can speculate (and the online learner adapt the drafter from live rollouts) without a drafter
trained beforehand. Reads only config.json and the embedding / LM-head tensors: the rest of the actor stays on disk.

    python -m respec_plugin.core.drafter.day0 --actor /models/Qwen2.5-7B-Instruct --out /ckpt/drafter_day0
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from respec_plugin.core.config import ReSpecConfigError
from respec_plugin.core.drafter.eagle3 import Eagle3Config, init_from_actor
from respec_plugin.core.drafter.io import CONFIG_FILE, save_drafter

logger = logging.getLogger(__name__)

# EAGLE-3's draft vocabulary for Llama-3 (32k of 128k tokens): the drafter's LM head stays a fraction of the
# actor's (Qwen2.5: 32000 of 151936 rows), so drafting stays cheap.
DEFAULT_DRAFT_VOCAB_SIZE = 32000
SINGLE_FILE = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"
LM_HEAD = "lm_head.weight"
EMBEDDING_SUFFIX = "embed_tokens.weight"
REQUIRED_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


def default_aux_layer_ids(num_hidden_layers: int) -> tuple[int, ...]:
    """vLLM's default (2, N // 2, N - 3) where it gives distinct ids (N >= 7); for shallower actors the first,
    middle and last layer inputs (1, N // 2, N - 1), duplicates dropped."""
    n = num_hidden_layers
    ids = (2, n // 2, n - 3) if n >= 7 else (1, n // 2, n - 1)
    return tuple(sorted(set(ids)))


def config_for_actor(
    actor_config: Mapping[str, Any], draft_vocab_size: int,
    eagle_aux_hidden_state_layer_ids: Sequence[int] | None = None,
) -> Eagle3Config:
    """The EAGLE-3 head shaped like one decoder layer of the actor (``actor_config`` as in its config.json)."""
    rope_theta = (actor_config.get("rope_parameters") or {}).get("rope_theta", actor_config.get("rope_theta", 10000.0))
    heads = actor_config["num_attention_heads"]
    return Eagle3Config(
        hidden_size=actor_config["hidden_size"],
        intermediate_size=actor_config["intermediate_size"],
        num_attention_heads=heads,
        num_key_value_heads=actor_config.get("num_key_value_heads") or heads,
        head_dim=actor_config.get("head_dim") or actor_config["hidden_size"] // heads,
        vocab_size=actor_config["vocab_size"],
        draft_vocab_size=draft_vocab_size,
        eagle_aux_hidden_state_layer_ids=tuple(eagle_aux_hidden_state_layer_ids
                                               or default_aux_layer_ids(actor_config["num_hidden_layers"])),
        rms_norm_eps=actor_config.get("rms_norm_eps", 1e-6),
        rope_theta=rope_theta,
        max_position_embeddings=actor_config.get("max_position_embeddings", 2048),
    )


def read_actor_config(actor_dir: Path) -> dict[str, Any]:
    """The actor's config.json, checked to describe a decoder-only causal LM with the fields the head copies."""
    if not actor_dir.is_dir():
        raise ReSpecConfigError(f"actor directory {str(actor_dir)!r} does not exist: pass the local directory of the "
                                "Hugging Face actor (config.json + *.safetensors), e.g. from `huggingface-cli download`.")
    path = actor_dir / "config.json"
    if not path.is_file():
        raise ReSpecConfigError(f"actor directory {str(actor_dir)!r} has no config.json: pass a Hugging Face model "
                                "directory as saved by save_pretrained.")
    config = json.loads(path.read_text())
    architectures = config.get("architectures") or []
    if config.get("is_encoder_decoder") or not any(a.endswith("ForCausalLM") for a in architectures):
        raise ReSpecConfigError(f"actor {str(actor_dir)!r} has architectures={architectures!r}: EAGLE-3 drafts for a "
                                "decoder-only causal LM (architectures ending in 'ForCausalLM', e.g. Qwen2ForCausalLM).")
    missing = [key for key in REQUIRED_KEYS if key not in config]
    if missing:
        raise ReSpecConfigError(f"actor config {str(path)!r} lacks {', '.join(missing)}: the drafter copies these "
                                "shapes; pass a decoder-only causal LM's config.json.")
    return config


def _weight_files(actor_dir: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, from the shard index when sharded, else from the single file's header."""
    if (actor_dir / SHARD_INDEX).is_file():
        weight_map = json.loads((actor_dir / SHARD_INDEX).read_text())["weight_map"]
        return {name: actor_dir / file for name, file in weight_map.items()}
    if (actor_dir / SINGLE_FILE).is_file():
        with safe_open(actor_dir / SINGLE_FILE, framework="pt") as f:
            return {name: actor_dir / SINGLE_FILE for name in f.keys()}
    raise ReSpecConfigError(f"actor directory {str(actor_dir)!r} has neither {SINGLE_FILE} nor {SHARD_INDEX}: day-0 "
                            "init reads safetensors only; re-save the actor with save_pretrained(safe_serialization=True).")


def _read_tensor(files: Mapping[str, Path], name: str) -> torch.Tensor:
    with safe_open(files[name], framework="pt") as f:
        return f.get_tensor(name)


def read_embeddings(actor_dir: Path, actor_config: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input embedding, LM head) of the actor, read tensor by tensor and checked against config.json's
    vocab_size x hidden_size; tied embeddings give the LM head = the embedding (also when config.json says nothing
    and the checkpoint has no LM head, transformers' default)."""
    files = _weight_files(actor_dir)
    embedding_names = [name for name in files if name.endswith(EMBEDDING_SUFFIX)]
    if len(embedding_names) != 1:
        raise ReSpecConfigError(f"actor {str(actor_dir)!r} has tensors {embedding_names!r} ending in "
                                f"{EMBEDDING_SUFFIX!r}: expected exactly one input embedding (a Llama/Qwen-style decoder).")
    embedding = _read_tensor(files, embedding_names[0])
    if actor_config.get("tie_word_embeddings", LM_HEAD not in files):
        lm_head = embedding
    elif LM_HEAD not in files:
        raise ReSpecConfigError(f"actor {str(actor_dir)!r} has tie_word_embeddings=false but no {LM_HEAD!r} tensor: "
                                "re-save the actor with save_pretrained, or set tie_word_embeddings=true if it is tied.")
    else:
        lm_head = _read_tensor(files, LM_HEAD)
    expected = (actor_config["vocab_size"], actor_config["hidden_size"])
    for name, tensor in ((embedding_names[0], embedding), (LM_HEAD, lm_head)):
        if tuple(tensor.shape) != expected:
            raise ReSpecConfigError(f"actor {str(actor_dir)!r} has {name} of shape {tuple(tensor.shape)}, which does "
                                    f"not fit its config.json (vocab_size, hidden_size) = {expected}: re-save the "
                                    "actor with save_pretrained so that config and weights agree.")
    return embedding, lm_head


def day0_draft_vocab(draft_vocab_size: int) -> torch.Tensor:
    """The ``draft_vocab_size`` lowest token ids, the draft vocabulary when no rollouts have been counted yet.

    Byte-level BPE numbers tokens in merge order and learns merges most-frequent-first, so low ids are the
    tokenizer corpus's most frequent tokens (Qwen2.5: English and code first, other scripts later, special tokens
    last). The vocabulary is fixed for the drafter's life (the learner trains weights, not the vocabulary); a
    user with rollouts picks it from their token counts instead (``draft_vocab_from_counts``, as the lab does).
    Not drafting special tokens such as EOS costs at most one rejected draft per response.
    """
    return torch.arange(draft_vocab_size)


def build_day0_drafter(
    actor_dir: str | Path, out: str | Path, draft_vocab_size: int | None = None, seed: int = 0,
) -> Eagle3Config:
    """Writes the untrained drafter (version 0) for ``actor_dir`` to ``out`` and returns its config;
    ``draft_vocab_size`` defaults to DEFAULT_DRAFT_VOCAB_SIZE, capped below the actor's vocabulary."""
    actor_dir, out = Path(actor_dir), Path(out)
    if (out / CONFIG_FILE).exists():
        raise ReSpecConfigError(f"--out {str(out)!r} already holds a drafter ({CONFIG_FILE}): remove it or choose "
                                "another directory (a day-0 build never overwrites a drafter).")
    actor_config = read_actor_config(actor_dir)
    if draft_vocab_size is None:
        draft_vocab_size = min(DEFAULT_DRAFT_VOCAB_SIZE, actor_config["vocab_size"] - 1)
    config = config_for_actor(actor_config, draft_vocab_size)
    _, lm_head = read_embeddings(actor_dir, actor_config)
    drafter = init_from_actor(config, lm_head, day0_draft_vocab(draft_vocab_size), seed)
    save_drafter(drafter, out, drafter_version=0)
    logger.info("day-0 drafter for %s written to %s: %s", actor_dir, out, config)
    return config


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m respec_plugin.core.drafter.day0", description=__doc__.split("\n\n")[0])
    parser.add_argument("--actor", required=True, help="local Hugging Face actor directory (config.json + safetensors)")
    parser.add_argument("--out", required=True, help="directory to write the drafter to (must not hold one)")
    parser.add_argument("--draft-vocab-size", type=int, default=None,
                        help=f"tokens the drafter can propose (default {DEFAULT_DRAFT_VOCAB_SIZE}, below the actor's vocab)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random init")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        config = build_day0_drafter(args.actor, args.out, args.draft_vocab_size, args.seed)
    except ReSpecConfigError as e:
        parser.exit(2, f"error: {e}\n")
    print(f"day-0 EAGLE-3 drafter written to {args.out} (draft_vocab_size={config.draft_vocab_size}, "
          f"aux layers {list(config.eagle_aux_hidden_state_layer_ids)})")


if __name__ == "__main__":
    main()

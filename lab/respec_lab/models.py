"""The lab's tokenizer and actor: a byte-level BPE tokenizer with a ChatML template and a small Qwen2 model,
supervised briefly on the synthetic math set so its next-token distributions are peaked (a random network's
are near uniform, and no drafter can predict it) while its answers stay wrong often enough for GRPO to learn.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from respec_plugin.core.drafter.warmup import train_offline
from respec_lab.data import MathProblem, prompt_messages, prompt_text

EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", EOS_TOKEN, PAD_TOKEN)
# ChatML, as Qwen2 uses: verl renders the prompt with it and the actor answers up to <|im_end|>.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class ActorSpec:
    """Shape of the Qwen2 actor; ``vocab_size`` of the model is the tokenizer's rounded up to a multiple of 64."""

    num_hidden_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int


@dataclass(frozen=True)
class SupervisionSpec:
    """Brief supervised fine-tuning of the actor on reference solutions (loss on the response only)."""

    steps: int
    batch_size: int
    learning_rate: float
    seed: int


def train_tokenizer(texts: Sequence[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on ``texts``; digits are split one per token (as Qwen2 does) so arithmetic is learnable."""
    tokenizer = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=["<|endoftext|>", "<|im_start|>"],
        padding_side="left",
    )
    hf_tokenizer.chat_template = CHAT_TEMPLATE
    return hf_tokenizer


def tokenizer_corpus(problems: Sequence[MathProblem]) -> list[str]:
    """The texts the tokenizer is trained on: chat roles, prompts and solutions."""
    return ["system user assistant"] + [f"{prompt_text(p.question)}\n{p.solution}" for p in problems]


def prompt_ids(tokenizer: PreTrainedTokenizerFast, messages: Sequence[dict[str, str]]) -> list[int]:
    """Token ids of a chat prompt exactly as verl builds them (chat template with the generation prompt)."""
    return list(tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True,
                                              return_dict=False))


def chat_prompt_ids(tokenizer: PreTrainedTokenizerFast, question: str) -> list[int]:
    """Token ids of a question's prompt without worked examples, as verl builds it."""
    return prompt_ids(tokenizer, prompt_messages(question))


def build_actor(spec: ActorSpec, tokenizer: PreTrainedTokenizerFast, seed: int) -> Qwen2ForCausalLM:
    """A freshly initialised Qwen2 actor (untied LM head, as EAGLE-3 copies LM-head rows from it)."""
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=64 * math.ceil(len(tokenizer) / 64),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return Qwen2ForCausalLM(config)


def supervised_examples(
    tokenizer: PreTrainedTokenizerFast, problems: Sequence[MathProblem]
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids) pairs; the response is the reference solution followed by EOS."""
    return [
        (chat_prompt_ids(tokenizer, p.question),
         tokenizer(p.solution, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
        for p in problems
    ]


class PaddedBatch(NamedTuple):
    """Right-padded prompt + response sequences."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor


def pad_batch(examples: Sequence[tuple[list[int], list[int]]], pad_token_id: int) -> PaddedBatch:
    """Right-pads (prompt, response) pairs into input_ids, attention_mask and a response mask."""
    length = max(len(p) + len(r) for p, r in examples)
    input_ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    response_mask = torch.zeros((len(examples), length), dtype=torch.bool)
    for row, (prompt, response) in enumerate(examples):
        ids = prompt + response
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        response_mask[row, len(prompt) : len(ids)] = True
    return PaddedBatch(input_ids, attention_mask, response_mask)


def supervise_actor(
    actor: Qwen2ForCausalLM, examples: Sequence[tuple[list[int], list[int]]], spec: SupervisionSpec, pad_token_id: int
) -> list[float]:
    """AdamW with warm-up and cosine decay on the response tokens; returns the loss of every step."""

    def batch_loss(generator: torch.Generator) -> torch.Tensor:
        rows = torch.randint(len(examples), (spec.batch_size,), generator=generator).tolist()
        input_ids, attention_mask, response_mask = pad_batch([examples[r] for r in rows], pad_token_id)
        labels = input_ids.masked_fill(~response_mask, -100)
        return actor(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss

    return train_offline(actor, batch_loss, steps=spec.steps, learning_rate=spec.learning_rate, weight_decay=0.01,
                         seed=spec.seed, name="actor")


@torch.no_grad()
def sample_responses(
    actor: Qwen2ForCausalLM,
    prompts: Sequence[list[int]],
    *,
    temperature: float,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    seed: int,
    batch_size: int = 64,
) -> list[list[int]]:
    """Response token ids (up to and including EOS) for each prompt; temperature 0 is greedy, otherwise plain
    sampling with no top-k/top-p, the distribution GRPO rollouts draw from."""
    torch.manual_seed(seed)
    responses: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        width = max(len(p) for p in chunk)
        input_ids = torch.tensor([[pad_token_id] * (width - len(p)) + p for p in chunk])
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 else {"do_sample": False}
        output = actor.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            **sampling,
        )
        for row in output[:, width:].tolist():
            responses.append(row[: row.index(eos_token_id) + 1] if eos_token_id in row else row)
    return responses


def expand_depth(actor: Qwen2ForCausalLM, factor: int) -> Qwen2ForCausalLM:
    """Block expansion (LLaMA Pro, Wu et al. 2024): after every layer insert ``factor - 1`` copies whose output
    projections (``o_proj``, ``down_proj``) are zero, so each copy adds nothing to the residual stream and the
    deeper actor computes exactly the same function. It gives the actor the depth, and so the per-token cost
    profile, of a ``factor`` times deeper model for the training cost of the shallow one; RL then trains all
    layers. Residual streams repeat across a block's copies, so EAGLE-3 aux layers are best taken from
    different blocks (layer ids that are not within the same run of copies)."""
    if factor < 1:
        raise ValueError(f"factor={factor} is invalid: use an integer >= 1 (1 keeps the actor as it is).")
    config = Qwen2Config.from_dict(actor.config.to_dict())
    config.num_hidden_layers = actor.config.num_hidden_layers * factor
    config.layer_types = [actor.config.layer_types[0]] * config.num_hidden_layers
    config.max_window_layers = config.num_hidden_layers
    expanded = Qwen2ForCausalLM(config)
    state = {}
    for name, tensor in actor.state_dict().items():
        if not name.startswith("model.layers."):
            state[name] = tensor
            continue
        index, rest = name[len("model.layers."):].split(".", 1)
        for copy in range(factor):
            zero = copy > 0 and rest in ("self_attn.o_proj.weight", "mlp.down_proj.weight")
            state[f"model.layers.{int(index) * factor + copy}.{rest}"] = torch.zeros_like(tensor) if zero else tensor
    expanded.load_state_dict(state, strict=True)
    expanded.eval()
    return expanded

"""The lab's tokenizer and actor: ChatML rendering round-trips through the saved tokenizer, the actor loads in
transformers and answers in the GSM8K format, and block expansion deepens it without changing its function."""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2ForCausalLM

from respec_lab.data import generate_problems, prompt_text, read_problems
from respec_lab.models import (
    ActorSpec,
    build_actor,
    chat_prompt_ids,
    expand_depth,
    sample_responses,
    tokenizer_corpus,
    train_tokenizer,
)


def test_chat_template_round_trip(tiny_lab):
    tokenizer = AutoTokenizer.from_pretrained(tiny_lab.actor_dir)
    question = read_problems(tiny_lab.val_parquet)[0].question
    messages = [{"role": "user", "content": prompt_text(question)}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == f"<|im_start|>user\n{prompt_text(question)}<|im_end|>\n<|im_start|>assistant\n"
    ids = chat_prompt_ids(tokenizer, question)
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|pad|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.tokenize(" 1234")[-4:] == ["1", "2", "3", "4"]  # one token per digit


def test_actor_loads_in_transformers_and_answers_in_gsm8k_format(tiny_lab):
    actor = AutoModelForCausalLM.from_pretrained(tiny_lab.actor_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_lab.actor_dir)
    assert isinstance(actor, Qwen2ForCausalLM) and not actor.config.tie_word_embeddings
    assert actor.config.eos_token_id == tokenizer.eos_token_id
    prompts = [chat_prompt_ids(tokenizer, p.question) for p in read_problems(tiny_lab.val_parquet)[:8]]
    responses = sample_responses(actor, prompts, temperature=0.0, max_new_tokens=96, seed=0,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    assert sum(r[-1] == tokenizer.eos_token_id and "\n#### " in t for r, t in zip(responses, texts)) >= 7


def test_block_expansion_preserves_the_actor_function():
    tokenizer = train_tokenizer(tokenizer_corpus(generate_problems(64, 20, seed=0)), 300)
    actor = build_actor(ActorSpec(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=2,
                                  num_key_value_heads=1), tokenizer, seed=0).eval()
    deeper = expand_depth(actor, 3)
    assert deeper.config.num_hidden_layers == 6
    ids = torch.tensor([chat_prompt_ids(tokenizer, "Tom has 3 apples. How many apples does Tom have?")])
    with torch.no_grad():
        assert torch.allclose(actor(ids).logits, deeper(ids).logits, atol=1e-5)

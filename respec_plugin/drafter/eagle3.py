"""An EAGLE-3 drafter head in torch that computes what vLLM's ``eagle3`` method computes, and saves in the layout
vLLM loads (vllm/model_executor/models/llama_eagle3.py), so it can be trained here and served there.

vLLM's first draft step feeds the head, at position t, the target's hidden states from three layers
(concatenated, projected by ``fc``) and the embedding of token t+1; the layer attends causally over positions
<= t; the head's logits predict token t+2. Later draft steps feed back the head's own pre-norm output instead of
``fc(...)``. The embedding is the actor's own (not saved: vLLM then shares the target's).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from respec_plugin.drafter.checkpoint import read_drafter_tensors

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True)
class Eagle3Config:
    """Shape of the head; ``aux_layer_ids`` index the residual stream entering a target layer (HF ``hidden_states[i]``)."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    aux_layer_ids: tuple[int, ...]
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048

    @classmethod
    def for_actor(cls, actor_config) -> "Eagle3Config":
        """Same width and attention shape as the actor; a low, a middle and a high layer as features."""
        layers = actor_config.num_hidden_layers
        heads = actor_config.num_attention_heads
        return cls(
            hidden_size=actor_config.hidden_size,
            intermediate_size=actor_config.intermediate_size,
            num_attention_heads=heads,
            num_key_value_heads=actor_config.num_key_value_heads,
            head_dim=getattr(actor_config, "head_dim", None) or actor_config.hidden_size // heads,
            vocab_size=actor_config.vocab_size,
            aux_layer_ids=(1, layers // 2, layers - 1),
            rms_norm_eps=actor_config.rms_norm_eps,
            rope_theta=getattr(actor_config, "rope_theta", None) or 10000.0,
            max_position_embeddings=actor_config.max_position_embeddings,
        )

    def to_vllm_config(self, drafter_version: int) -> dict:
        """config.json that vLLM's eagle3 loader reads (draft vocab = full vocab, so no d2t map is needed)."""
        return {
            "architectures": ["LlamaForCausalLMEagle3"],
            "model_type": "llama",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": 1,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "vocab_size": self.vocab_size,
            "draft_vocab_size": self.vocab_size,
            "target_hidden_size": self.hidden_size,
            "eagle_config": {"eagle_aux_hidden_state_layer_ids": list(self.aux_layer_ids)},
            "tie_word_embeddings": False,
            "torch_dtype": "float32",
            "respec": {"drafter_version": drafter_version, "eagle3_config": asdict(self)},
        }


class _RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(variance + self.eps)).to(x.dtype) * self.weight


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class _Attention(nn.Module):
    """Llama attention whose projections take 2 x hidden (embedding and hidden state side by side)."""

    def __init__(self, config: Eagle3Config):
        super().__init__()
        self.config = config
        h, d = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(2 * h, config.num_attention_heads * d, bias=False)
        self.k_proj = nn.Linear(2 * h, config.num_key_value_heads * d, bias=False)
        self.v_proj = nn.Linear(2 * h, config.num_key_value_heads * d, bias=False)
        self.o_proj = nn.Linear(config.num_attention_heads * d, h, bias=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        c = self.config
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, c.num_attention_heads, c.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.float32) / c.head_dim))
        angles = positions.float()[..., None] * inv_freq  # (batch, length, head_dim / 2)
        cos = torch.cat((angles, angles), dim=-1).cos()[:, None].to(x.dtype)
        sin = torch.cat((angles, angles), dim=-1).sin()[:, None].to(x.dtype)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        groups = c.num_attention_heads // c.num_key_value_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class _MLP(nn.Module):
    def __init__(self, config: Eagle3Config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _MidLayer(nn.Module):
    def __init__(self, config: Eagle3Config):
        super().__init__()
        self.input_layernorm = _RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hidden_norm = _RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = _Attention(config)
        self.post_attention_layernorm = _RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = _MLP(config)

    def forward(self, embeds: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        residual = hidden
        x = torch.cat([self.input_layernorm(embeds), self.hidden_norm(hidden)], dim=-1)
        residual = residual + self.self_attn(x, positions)
        return residual + self.mlp(self.post_attention_layernorm(residual))


class Eagle3Drafter(nn.Module):
    """The EAGLE-3 head: ``fc`` over three target layers, one decoder layer, a final norm and its own LM head."""

    def __init__(self, config: Eagle3Config):
        super().__init__()
        self.config = config
        self.fc = nn.Linear(len(config.aux_layer_ids) * config.hidden_size, config.hidden_size, bias=False)
        self.midlayer = _MidLayer(config)
        self.norm = _RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(
        self, next_token_embeds: torch.Tensor, aux_hidden_states: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits for the token after ``next_token`` at every position, and the pre-norm hidden state that vLLM
        feeds back on the next draft step. ``aux_hidden_states``: (batch, length, 3 x hidden)."""
        prenorm = self.midlayer(next_token_embeds, self.fc(aux_hidden_states), positions)
        return self.lm_head(self.norm(prenorm)), prenorm

    @classmethod
    def day0_from_actor(cls, actor) -> "Eagle3Drafter":
        """An untrained head that already drafts something sensible: ``fc`` passes the highest feature layer
        through, the decoder layer starts as the identity (zero output projections), and the final norm and LM
        head are the actor's — so day 0 drafts like the actor's "logit lens" on its last-but-one layer."""
        config = Eagle3Config.for_actor(actor.config)
        drafter = cls(config)
        h = config.hidden_size
        with torch.no_grad():
            drafter.fc.weight.zero_()
            drafter.fc.weight[:, -h:] = torch.eye(h)
            drafter.midlayer.self_attn.o_proj.weight.zero_()
            drafter.midlayer.mlp.down_proj.weight.zero_()
            drafter.norm.weight.copy_(actor.model.norm.weight)
            drafter.lm_head.weight.copy_(actor.lm_head.weight)
        return drafter

    def vllm_named_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """Weights under the checkpoint names vLLM's eagle3 ``load_weights`` expects (used to save and to push)."""
        return [(name, tensor.detach().contiguous()) for name, tensor in self.state_dict().items()]

    def save(self, path: str, drafter_version: int) -> None:
        os.makedirs(path, exist_ok=True)
        save_file(dict(self.vllm_named_tensors()), os.path.join(path, WEIGHTS_FILE))
        with open(os.path.join(path, CONFIG_FILE), "w") as f:
            json.dump(self.config.to_vllm_config(drafter_version), f, indent=2)

    @classmethod
    def load(cls, path: str) -> tuple["Eagle3Drafter", int]:
        """The head saved by :meth:`save` and its drafter version."""
        with open(os.path.join(path, CONFIG_FILE)) as f:
            meta = json.load(f)["respec"]
        config = meta["eagle3_config"]
        drafter = cls(Eagle3Config(**{**config, "aux_layer_ids": tuple(config["aux_layer_ids"])}))
        drafter.load_state_dict(dict(read_drafter_tensors(path)))
        return drafter, int(meta["drafter_version"])


def actor_features(actor, input_ids: torch.Tensor, attention_mask: torch.Tensor, aux_layer_ids) -> tuple:
    """What the head trains on, from one no-grad actor forward: the concatenated aux hidden states and the
    actor's next-token log-probabilities at every position."""
    with torch.no_grad():
        out = actor(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    aux = torch.cat([out.hidden_states[i] for i in aux_layer_ids], dim=-1)
    return aux, out.logits.float().log_softmax(-1)

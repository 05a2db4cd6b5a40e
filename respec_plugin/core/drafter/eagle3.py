"""EAGLE-3 drafter head in torch whose forward is what vLLM's ``eagle3`` method computes at inference
(``vllm/model_executor/models/llama_eagle3.py`` + ``vllm/v1/spec_decode/llm_base_proposer.py``), so a head
trained here drafts the same tokens once loaded into vLLM.

Inference in vLLM, for anchor position t (the last position the target verified):
  * the target's residual streams entering the aux layers at t are concatenated and projected: g_t = fc(...);
  * step 0 runs one decoder layer on [input_layernorm(embed(x_{t+1})), hidden_norm(g_t)] (2 x hidden wide)
    at position t, with attention over the drafter's KV cache of positions <= t (all built from target
    features), and drafts x_{t+2} from lm_head(norm(.)) over the draft vocabulary (mapped to target ids by d2t);
  * step j >= 1 feeds the drafted token and the layer's own pre-norm output of step j-1 back in at position
    t + j; its attention sees the cache of positions <= t and the step-1..j entries of this anchor.
``unroll`` computes all anchors of a sequence at once with exactly that attention pattern (the
"training-time test" of EAGLE-3), so the same code trains the head and predicts what vLLM drafts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from respec_plugin.core.config import ReSpecConfigError
from respec_plugin.core.drafter.formats import MIDLAYER_PREFIX, DrafterFormat


@dataclass(frozen=True)
class Eagle3Config:
    """Shape of an EAGLE-3 head and how it attaches to its target (the actor).

    ``eagle_aux_hidden_state_layer_ids`` are vLLM's indices: id i is the residual stream entering target layer
    i, which is HF's ``hidden_states[i]``; they must be ascending because vLLM concatenates them in layer order.
    ``vocab_size`` is the target's; the head scores only ``draft_vocab_size`` tokens (``draft_token_ids``).
    ``norm_before_residual`` is vLLM's flag of the same name: the layer's residual is the normed target feature
    (``hidden_norm(fc(...))``) rather than the raw one (as some ``speculators`` heads are trained).
    A bad shape raises :class:`ReSpecConfigError`: the values come from a checkpoint's config.json or a user's actor.
    """

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    draft_vocab_size: int
    eagle_aux_hidden_state_layer_ids: tuple[int, ...]
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    norm_before_residual: bool = False

    def __post_init__(self):
        ids = tuple(self.eagle_aux_hidden_state_layer_ids)
        if not ids or list(ids) != sorted(set(ids)) or ids[0] < 0:
            raise ReSpecConfigError(
                f"eagle_aux_hidden_state_layer_ids={ids!r} is invalid: use distinct ascending target layer "
                "indices >= 0 (index i = residual stream entering layer i), e.g. (2, N // 2, N - 3)."
            )
        if not 0 < self.draft_vocab_size < self.vocab_size:
            raise ReSpecConfigError(
                f"draft_vocab_size={self.draft_vocab_size} is invalid: use 0 < draft_vocab_size < vocab_size "
                f"({self.vocab_size}). With a full-size draft vocabulary vLLM shares the target's lm_head with the "
                "drafter whenever they are equal (as on day 0), and a drafter push would overwrite the target's."
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ReSpecConfigError(
                f"num_key_value_heads={self.num_key_value_heads} is invalid: it must divide "
                f"num_attention_heads={self.num_attention_heads}."
            )
        object.__setattr__(self, "eagle_aux_hidden_state_layer_ids", ids)

    @property
    def num_aux_hidden_states(self) -> int:
        return len(self.eagle_aux_hidden_state_layer_ids)


class RMSNorm(nn.Module):
    """vLLM's RMSNorm: normalise in float32, cast back, then scale."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return x32.to(x.dtype) * self.weight


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RotaryEmbedding(nn.Module):
    """Neox-style rotary embedding (vLLM's default for Llama), evaluated at arbitrary integer positions."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: [B, heads, T, head_dim]; positions: [B, T]."""
        freqs = positions[:, None, :, None].float() * self.inv_freq
        angles = torch.cat((freqs, freqs), dim=-1)
        return (x.float() * angles.cos() + _rotate_half(x.float()) * angles.sin()).to(x.dtype)


class Eagle3Attention(nn.Module):
    """Self-attention whose q/k/v take the 2 x hidden concatenation [embeds, hidden]."""

    def __init__(self, config: Eagle3Config):
        super().__init__()
        self.config = config
        heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.q_proj = nn.Linear(2 * config.hidden_size, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(2 * config.hidden_size, kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(2 * config.hidden_size, kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, config.hidden_size, bias=False)
        self.rotary = RotaryEmbedding(head_dim, config.rope_theta)

    def project(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotated q, k and v for x [B, T, 2H]: [B, heads, T, d] and [B, kv_heads, T, d] (kv repeated to heads)."""
        batch, length, _ = x.shape
        c = self.config
        q = self.q_proj(x).view(batch, length, c.num_attention_heads, c.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        repeat = c.num_attention_heads // c.num_key_value_heads
        k = self.rotary(k, positions).repeat_interleave(repeat, dim=1)
        v = v.repeat_interleave(repeat, dim=1)
        return self.rotary(q, positions), k, v

    def attend(
        self,
        q: torch.Tensor,
        context_k: torch.Tensor,
        context_v: torch.Tensor,
        own_k: list[torch.Tensor],
        own_v: list[torch.Tensor],
        first_anchor: int,
    ) -> torch.Tensor:
        """Query i (anchor t = first_anchor + i) attends causally to the context entries (step 0, positions
        <= t) and to the entries this anchor's own earlier steps wrote (``own_k``/``own_v``: [B, h, A, d] each)."""
        scale = self.config.head_dim ** -0.5
        num_anchors, length = q.shape[2], context_k.shape[2]
        context_scores = (q @ context_k.transpose(-1, -2)) * scale
        causal = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()[first_anchor:]
        context_scores = context_scores.masked_fill(~causal, float("-inf"))
        own_scores = [(q * k).sum(-1, keepdim=True) * scale for k in own_k]
        weights = torch.softmax(torch.cat([context_scores, *own_scores], dim=-1).float(), dim=-1).to(q.dtype)
        out = weights[..., :length] @ context_v
        for i, v in enumerate(own_v):
            out = out + weights[..., length + i : length + i + 1] * v
        return self.o_proj(out.transpose(1, 2).reshape(q.shape[0], num_anchors, -1))


class Eagle3MLP(nn.Module):
    def __init__(self, config: Eagle3Config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Eagle3Midlayer(nn.Module):
    """The single decoder layer (checkpoint prefix ``midlayer.``), vLLM's layer 0 with norm after residual."""

    def __init__(self, config: Eagle3Config):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hidden_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Eagle3Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = Eagle3MLP(config)


@dataclass
class DraftSteps:
    """Output of :meth:`Eagle3Drafter.unroll`: per step j, draft-vocab logits at every anchor t (predicting the
    token at t + j + 2) and the pre-norm hidden state fed back into step j + 1."""

    logits: list[torch.Tensor]
    hidden_states: list[torch.Tensor]


class Eagle3Drafter(nn.Module):
    """EAGLE-3 head: ``fc`` (aux target states -> hidden), ``midlayer``, ``norm``, ``lm_head`` over the draft
    vocabulary and the ``d2t`` / ``t2d`` vocabulary maps.

    The token embedding is the target's (vLLM shares it when the checkpoint has none), so the head holds none:
    :meth:`unroll` takes the target's embedding outputs, which the learner captures in the actor's own forward.
    ``format`` is the checkpoint format it was loaded from, which names its weights (:func:`vllm_weights`) and
    which it is saved in.
    """

    def __init__(self, config: Eagle3Config, draft_token_ids: torch.Tensor, format: DrafterFormat | None = None):
        super().__init__()
        self.config = config
        self.format = format or DrafterFormat()
        self.fc = nn.Linear(config.num_aux_hidden_states * config.hidden_size, config.hidden_size, bias=False)
        self.midlayer = Eagle3Midlayer(config)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.draft_vocab_size, bias=False)
        draft_token_ids = torch.as_tensor(draft_token_ids, dtype=torch.long)
        if draft_token_ids.shape != (config.draft_vocab_size,) or not bool((draft_token_ids.diff() > 0).all()):
            raise ValueError(
                f"draft_token_ids of shape {tuple(draft_token_ids.shape)} is invalid: expected "
                f"{config.draft_vocab_size} distinct target token ids in ascending order."
            )
        self.register_buffer("draft_token_ids", draft_token_ids)

    @property
    def d2t(self) -> torch.Tensor:
        """vLLM's draft-to-target offsets: target id = draft id + d2t[draft id]."""
        return self.draft_token_ids - torch.arange(self.config.draft_vocab_size, device=self.draft_token_ids.device)

    @property
    def t2d(self) -> torch.Tensor:
        """Which target ids the drafter can propose (boolean mask over the target vocabulary)."""
        mask = torch.zeros(self.config.vocab_size, dtype=torch.bool, device=self.draft_token_ids.device)
        mask[self.draft_token_ids] = True
        return mask

    def combine_hidden_states(self, aux_hidden_states: torch.Tensor) -> torch.Tensor:
        """vLLM's ``combine_hidden_states``: [.., num_aux * H] target features -> [.., H]."""
        return self.fc(aux_hidden_states)

    def unroll(
        self,
        input_embeds: torch.Tensor,
        aux_hidden_states: torch.Tensor,
        num_steps: int,
        *,
        step_input_embeds: list[torch.Tensor] | None = None,
        embed: Callable[[torch.Tensor], torch.Tensor] | None = None,
        first_anchor: int = 0,
    ) -> DraftSteps:
        """Runs ``num_steps`` draft steps at anchors ``first_anchor .. T - 1`` of right-padded sequences.

        input_embeds [B, T, H] are the target's embeddings of the tokens it saw; aux_hidden_states
        [B, T, num_aux * H] its aux streams. Step 0 at anchor t reads token x_{t+1} (position T - 1 reads a zero
        embedding: its logits are meaningless); its keys and values cover every position (the drafter's KV cache in
        vLLM), its queries only the anchors. Step j >= 1 reads ``step_input_embeds[j - 1]`` [B, T, H] at the anchors
        if given (teacher forcing: the embedding of x_{t+j+1} in training), else ``embed`` of the greedy draft of
        step j - 1 at the same anchor, exactly as vLLM feeds it back. Anchors before ``first_anchor`` (e.g. inside
        the prompt, never drafted from) are skipped to save compute.
        """
        if num_steps < 1:
            raise ValueError(f"num_steps={num_steps} is invalid: unroll at least 1 draft step.")
        if num_steps > 1 and step_input_embeds is None and embed is None:
            raise ValueError("unrolling past step 0 needs step_input_embeds (teacher forcing) or embed (greedy)")
        batch, length = input_embeds.shape[:2]
        dtype = self.fc.weight.dtype
        layer = self.midlayer
        positions = torch.arange(length, device=input_embeds.device).expand(batch, length)
        next_embeds = torch.cat([input_embeds[:, 1:], input_embeds.new_zeros(batch, 1, input_embeds.shape[-1])], dim=1)
        hidden = self.combine_hidden_states(aux_hidden_states.to(dtype))
        normed = layer.hidden_norm(hidden)
        x = torch.cat([layer.input_layernorm(next_embeds.to(dtype)), normed], -1)
        if self.config.norm_before_residual:
            hidden = normed
        q, context_k, context_v = layer.self_attn.project(x, positions)
        own_k: list[torch.Tensor] = []
        own_v: list[torch.Tensor] = []
        anchor_positions = positions[:, first_anchor:]
        hidden = hidden[:, first_anchor:]
        out = DraftSteps([], [])
        for step in range(num_steps):
            if step > 0:
                if step_input_embeds is not None:
                    embeds = step_input_embeds[step - 1][:, first_anchor:]
                else:
                    embeds = embed(self.draft_token_ids[out.logits[-1].argmax(-1)])
                embeds = layer.input_layernorm(embeds.to(dtype))
                normed = layer.hidden_norm(hidden)
                q, k, v = layer.self_attn.project(torch.cat([embeds, normed], -1), anchor_positions + step)
                if self.config.norm_before_residual:
                    hidden = normed
                own_k.append(k)
                own_v.append(v)
            else:
                q = q[:, :, first_anchor:]
            residual = layer.self_attn.attend(q, context_k, context_v, own_k, own_v, first_anchor) + hidden
            hidden = layer.mlp(layer.post_attention_layernorm(residual)) + residual
            out.logits.append(self.lm_head(self.norm(hidden)))
            out.hidden_states.append(hidden)
        return out

    @torch.no_grad()
    def propose(self, input_ids: torch.Tensor, aux_hidden_states: torch.Tensor, num_speculative_tokens: int,
                embed_tokens: torch.Tensor) -> list[int]:
        """The greedy draft vLLM proposes after a target step: ``input_ids`` [T] ends with the token the target
        just sampled (not yet run through it), ``aux_hidden_states`` [T - 1, num_aux * H] covers the rest, and
        ``embed_tokens`` is the target's embedding table, which vLLM shares with the drafter."""
        assert aux_hidden_states.shape[0] == input_ids.shape[0] - 1

        def embed(token_ids: torch.Tensor) -> torch.Tensor:
            return F.embedding(token_ids, embed_tokens)

        steps = self.unroll(embed(input_ids)[None], F.pad(aux_hidden_states, (0, 0, 0, 1))[None],
                            num_speculative_tokens, embed=embed, first_anchor=input_ids.shape[0] - 2)
        return [int(self.draft_token_ids[logits[0, 0].argmax()]) for logits in steps.logits]


def vllm_weights(drafter: Eagle3Drafter) -> list[tuple[str, torch.Tensor]]:
    """The drafter's weights named as its checkpoint format names them, which vLLM's
    ``Eagle3LlamaForCausalLM.load_weights`` maps (``midlayer.*``, or ``layers.0.*`` in the speculators format;
    ``fc.weight``, ``norm.weight``, ``lm_head.weight``, ``d2t``); no ``embed_tokens``, so vLLM keeps sharing the
    target's. Used both to save and to push into a live engine."""
    prefix = drafter.format.layer_prefix
    weights = [(prefix + name.removeprefix(MIDLAYER_PREFIX) if name.startswith(MIDLAYER_PREFIX) else name,
                tensor.detach()) for name, tensor in drafter.named_parameters()]
    weights.append(("d2t", drafter.d2t))
    return weights


def draft_vocab_from_counts(token_counts: torch.Tensor, draft_vocab_size: int) -> torch.Tensor:
    """The ``draft_vocab_size`` most frequent target tokens (ties: lower id first), ascending, as EAGLE-3 picks
    its draft vocabulary from token frequencies in the actor's outputs."""
    if not 0 < draft_vocab_size < token_counts.numel():
        raise ValueError(
            f"draft_vocab_size={draft_vocab_size} is invalid: expected 0 < draft_vocab_size < vocab_size "
            f"({token_counts.numel()})."
        )
    order = sorted(range(token_counts.numel()), key=lambda i: (-int(token_counts[i]), i))
    return torch.tensor(sorted(order[:draft_vocab_size]), dtype=torch.long)


def init_from_actor(
    config: Eagle3Config, actor_lm_head: torch.Tensor, draft_token_ids: torch.Tensor, seed: int,
) -> Eagle3Drafter:
    """Day-0 drafter: the actor's LM-head rows for the draft vocabulary, Llama's init (N(0, 0.02), unit norms)
    elsewhere. Serves from the first step; the offline warm-up and the online learner improve it."""
    generator = torch.Generator().manual_seed(seed)
    drafter = Eagle3Drafter(config, draft_token_ids)
    with torch.no_grad():
        for name, parameter in drafter.named_parameters():
            if name.endswith("norm.weight"):
                parameter.fill_(1.0)
            else:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
        drafter.lm_head.weight.copy_(actor_lm_head[drafter.draft_token_ids])
    return drafter

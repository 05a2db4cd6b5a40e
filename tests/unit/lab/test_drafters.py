"""The lab's drafter features: a window of each sequence (its response and a few prompt tokens before it) carries
the features of the actor's forward over the whole sequence, not of a forward over the window."""

import torch

from respec_plugin.core.drafter.io import load_drafter
from respec_lab.drafters import windowed_features
from respec_lab.models import pad_batch


def test_windows_keep_the_whole_sequences_features(tiny_lab):
    from transformers import AutoModelForCausalLM

    actor = AutoModelForCausalLM.from_pretrained(tiny_lab.actor_dir, dtype=torch.float32).eval()
    drafter, _ = load_drafter(tiny_lab.drafter_dir)
    generator = torch.Generator().manual_seed(0)
    pairs = [(torch.randint(3, 200, (p,), generator=generator).tolist(),
              torch.randint(3, 200, (r,), generator=generator).tolist()) for p, r in ((20, 5), (9, 11), (14, 2))]
    rollouts = pad_batch(pairs, pad_token_id=0)
    full_ids, full, full_mask = windowed_features(actor, drafter, rollouts, batch_size=2, context_tokens=None)
    ids, windowed, mask = windowed_features(actor, drafter, rollouts, batch_size=2, context_tokens=4)

    for row, (prompt, response) in enumerate(pairs):
        start, length = len(prompt) - 4, 4 + len(response)
        assert ids[row, :length].tolist() == (prompt + response)[start:]
        assert mask[row, :length].tolist() == [False] * 4 + [True] * len(response)
        assert not mask[row, length:].any()
        for name in ("input_embeds", "aux_hidden_states", "draft_logprobs"):
            torch.testing.assert_close(getattr(windowed, name)[row, :length],
                                       getattr(full, name)[row, start:start + length])
    assert ids.shape[1] == max(4 + len(r) for _, r in pairs) < full_ids.shape[1]

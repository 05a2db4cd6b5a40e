"""The step's trajectories read from a TensorDict laid out exactly as verl's agent loop and advantage step write it
into TransferQueue (jagged nested tensors), padding rows dropped; a recorded step (``learner.record_dir``) reads
back as written."""

import torch

from verl.utils.tensordict_utils import list_of_dict_to_tensordict
from verl.workers.utils.padding import response_to_nested

from respec_plugin.integrations.verl.learner_features import (
    TRAJECTORY_FIELDS,
    Trajectories,
    read_step,
    record_step,
    trajectories_from_fields,
)


def test_trajectories_from_verl_fields():
    rows = [
        {"prompts": torch.tensor([5, 6, 7]), "responses": torch.tensor([8, 9]), "response_mask": torch.tensor([1, 1]),
         "rm_scores": torch.tensor([0.0, 1.0])},
        {"prompts": torch.tensor([5, 6]), "responses": torch.tensor([10, 11, 2]),
         "response_mask": torch.tensor([1, 1, 0]), "rm_scores": torch.tensor([0.0, 0.0, 0.0])},
        {"prompts": torch.tensor([4]), "responses": torch.tensor([3]), "response_mask": torch.tensor([1]),
         "rm_scores": torch.tensor([0.0])},  # a padding row
    ]
    data = list_of_dict_to_tensordict(rows)
    padded_advantages = torch.tensor([[0.7, 0.7, 0.0], [-0.7, -0.7, -0.7], [0.0, 0.0, 0.0]])
    data["advantages"] = response_to_nested(padded_advantages, data["response_mask"])
    data = data.select(*TRAJECTORY_FIELDS)

    trajectories = trajectories_from_fields(data, keep=[True, True, False])
    assert [t.tolist() for t in trajectories.token_ids] == [[5, 6, 7, 8, 9], [5, 6, 10, 11, 2]]
    assert trajectories.prompt_lengths == [3, 2]
    assert [m.tolist() for m in trajectories.response_masks] == [[1.0, 1.0], [1.0, 1.0, 0.0]]
    assert trajectories.rewards.tolist() == [1.0, 0.0]
    assert trajectories.advantages.tolist() == [torch.tensor(0.7).item(), torch.tensor(-0.7).item()]


def test_recorded_step_reads_back(tmp_path):
    trajectories = Trajectories(token_ids=[torch.tensor([5, 6, 7, 8])], prompt_lengths=[2],
                                response_masks=[torch.tensor([1.0, 0.0])], rewards=torch.tensor([1.0]),
                                advantages=torch.tensor([0.5]))
    actor = {"model.embed_tokens.weight": torch.randn(4, 2)}
    path = record_step(tmp_path / "record", 7, actor, trajectories)
    assert path.name == "step_0007.pt"
    step, actor_back, back = read_step(path)
    assert step == 7 and torch.equal(actor_back["model.embed_tokens.weight"], actor["model.embed_tokens.weight"])
    assert [t.tolist() for t in back.token_ids] == [[5, 6, 7, 8]] and back.prompt_lengths == [2]
    assert torch.equal(back.response_masks[0], trajectories.response_masks[0])
    assert torch.equal(back.rewards, trajectories.rewards) and torch.equal(back.advantages, trajectories.advantages)

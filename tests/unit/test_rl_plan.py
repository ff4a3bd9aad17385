"""The RL plan on hand-made rollouts: best-of-n keeps each group's best sample."""
import torch

from posttrain.rl import plan


def test_best_of_groups_keeps_each_groups_top_reward():
    from types import SimpleNamespace
    records = [SimpleNamespace(group=g, i=i) for i, g in enumerate([0, 0, 0, 1, 1, 2])]
    reward = torch.tensor([0.1, 0.9, 0.5, -1.0, -0.5, 0.0])
    kept, r = plan.best_of_groups(records, reward)
    assert [x.i for x in kept] == [1, 4, 5]
    torch.testing.assert_close(r, torch.tensor([0.9, -0.5, 0.0]))

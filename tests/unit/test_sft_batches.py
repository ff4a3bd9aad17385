"""The SFT stage's micro-batch plan (sft.micro_batches)."""
from posttrain import sft
from posttrain.types import Example


def test_random_batching_covers_every_example_once_per_epoch(tiny_cfg):
    cfg = tiny_cfg("sft.batching=random", "sft.epochs=2")
    ex = [Example((1,) * n, (2,)) for n in range(1, 12)]
    plan = sft.micro_batches(ex, cfg)
    per_epoch = len(plan) // 2
    for epoch in (plan[:per_epoch], plan[per_epoch:]):
        assert sorted(i for b in epoch for i in b) == list(range(11))
    assert plan[:per_epoch] != plan[per_epoch:]

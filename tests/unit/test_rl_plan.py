"""The RL plan on hand-made rollouts: which samples each micro-batch and step hold."""

from posttrain.rl import plan


def test_a_steps_groups_go_into_micro_batches_by_prompt_length():
    """Each step trains on the same samples as in draw order (the plan of prompts all of one
    length), its prompt groups put into micro-batches shortest prompt first."""
    from types import SimpleNamespace
    from posttrain.config import load_config
    lengths = [30, 5, 17, 2, 40, 11, 8, 25]                  # one prompt per group
    records = [SimpleNamespace(group=g, prompt_ids=(1,) * lengths[g]) for g in range(8)
               for _ in range(2)]
    alike = [SimpleNamespace(group=r.group, prompt_ids=(1,)) for r in records]
    cfg = load_config("demo", ("rl.batch_size=4", "rl.grad_accum=2", "rl.epochs=2"))
    plain = plan.step_plan(alike, cfg)
    ordered = plan.step_plan(records, cfg)
    assert len(plain) == len(ordered) == 4
    for a, b in zip(plain, ordered):
        assert sorted(a.samples) == sorted(b.samples)
        groups = [g for mb in b.micro for g in mb.groups]
        assert [lengths[records[g[0]].group] for g in groups] == \
            sorted(lengths[records[g[0]].group] for g in groups)
    assert [s.samples for s in plain] != [s.samples for s in ordered]

"""posttrain.rl.train.loss on hand-computed micro-batches: each rl.advantage's objective."""
from types import SimpleNamespace

import pytest
import torch

from posttrain.rl.train import StepBatch, loss
from posttrain.types import LogProbs


def _cfg(advantage: str, stop_weight: float = 2.0, loss_agg: str = "token"):
    return SimpleNamespace(rl=SimpleNamespace(clip_eps=0.3, advantage=advantage,
                                              stop_weight=stop_weight, loss_agg=loss_agg))


def _group():
    """One prompt group of two samples: A (2 tokens, reward 1) and B (1 token, reward 0).
    Group advantages +0.5 / -0.5 on every token, per-token weights 1/3; the stop credit at
    A's first position and B's only position (A's second is masked: no clean stop there)."""
    lp = torch.log(torch.tensor([0.5, 0.4, 0.2])).requires_grad_()
    lp_stop = torch.log(torch.tensor([0.1, 0.3, 0.2])).requires_grad_()
    b = StepBatch(samples=[0, 1], lengths=torch.tensor([2, 1]), old=lp.detach().clone(),
                  adv=torch.tensor([0.5, 0.5, -0.5]), weight=torch.full((3,), 1 / 3),
                  old_stop=lp_stop.detach().clone(),
                  r_stop=torch.tensor([0.2, 0.6, 0.9]),      # had it stopped before each token
                  r_final=torch.tensor([1.0, 1.0, 0.0]),     # what each token's sample earned
                  may_stop=torch.tensor([True, False, True]), rows=[slice(0, 3)])
    return b, lp, lp_stop


def test_group_stop_on_a_hand_computed_group():
    b, lp, lp_stop = _group()
    total, stats = loss(b, slice(0, 3), LogProbs(lp, lp_stop), lp.detach(), _cfg("group_stop"),
                        beta=0.0, scale=1.0)
    assert stats["ratio"] == pytest.approx(3.0) and stats["clipped"] == 0
    assert stats["policy_loss"] == pytest.approx(-0.5)       # the surrogate: -sum(adv)
    # group term: (-0.5 - 0.5 + 0.5) / 3; credit: 2 * 0.5 * (-0.1 * (0.2 - 1) - 0.2 * (0.9 - 0))
    assert total.item() == pytest.approx(-1 / 6 + 2 * 0.5 * (0.08 - 0.18), abs=1e-6)
    total.backward()
    # d/dlog pi: -A * w for the group term; d/dlog p_stop: -p (r_stop - r_final) * w_s * 2
    torch.testing.assert_close(lp.grad, -b.adv / 3)
    torch.testing.assert_close(lp_stop.grad, torch.tensor([0.08, 0.0, -0.18]))


def test_stop_weight_zero_is_the_group_term_and_the_kl_adds_in_its_unit():
    b, lp, lp_stop = _group()
    alone, _ = loss(b, slice(0, 3), LogProbs(lp, lp_stop), lp.detach(),
                    _cfg("group_stop", stop_weight=0.0), beta=0.0, scale=1.0)
    group, _ = loss(b, slice(0, 3), LogProbs(lp, None), lp.detach(), _cfg("group"),
                    beta=0.0, scale=1.0)
    assert alone.item() == pytest.approx(group.item()) == pytest.approx(-1 / 6)
    ref = lp.detach() - 0.5                  # k3 per token: e^-0.5 - 1 + 0.5
    with_kl, stats = loss(b, slice(0, 3), LogProbs(lp, None), ref, _cfg("group"), beta=0.1,
                          scale=1.0)
    k3 = torch.expm1(torch.tensor(-0.5)).item() + 0.5
    assert stats["kl"] == pytest.approx(3 * k3)
    assert with_kl.item() == pytest.approx(-1 / 6 + 0.1 * k3, abs=1e-6)   # weights 1/3 each


@pytest.mark.parametrize("agg, per", [("token", 3), ("summary", 2)])
def test_stop_credit_alone_with_its_kl_per_token_or_per_summary(agg, per):
    """rl.advantage=stop: the objective is the stop credit (weights 1/S per position), the
    surrogate only measured; the KL weighs 1/N per token or 1/S (nats per summary)."""
    b, lp, lp_stop = _group()
    b = b._replace(weight=torch.full((3,), 0.5))
    ref = lp.detach() - 0.5
    total, stats = loss(b, slice(0, 3), LogProbs(lp, lp_stop), ref, _cfg("stop", loss_agg=agg),
                        beta=0.1, scale=1.0)
    credit = 0.5 * (0.08 - 0.18)
    k3 = torch.expm1(torch.tensor(-0.5)).item() + 0.5
    assert stats["policy_loss"] == pytest.approx(0.08 - 0.18, abs=1e-6)
    assert total.item() == pytest.approx(credit + 0.1 * 3 * k3 / per, abs=1e-6)

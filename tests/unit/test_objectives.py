import math

import pytest
import torch

from posttrain import objectives as O


def test_gather_logprobs_matches_log_softmax():
    torch.manual_seed(0)
    logits = torch.randn(5, 11)
    targets = torch.tensor([0, 3, 10, 2, 2])
    expected = torch.log_softmax(logits, -1)[torch.arange(5), targets]
    torch.testing.assert_close(O.gather_logprobs(logits, targets), expected)
    torch.testing.assert_close(
        O.gather_logprobs(logits.bfloat16(), targets),
        torch.log_softmax(logits.bfloat16().float(), -1)[torch.arange(5), targets],
    )


def test_ratio_one_gives_minus_mean_advantage():
    lp = torch.tensor([-1.0, -2.0, -0.5, -3.0])
    adv = torch.tensor([1.0, -2.0, 0.5, 3.0])
    loss, ratio, clipped = O.clipped_policy_loss(lp, lp, adv, eps=0.3)
    assert torch.equal(ratio, torch.ones(4))
    assert O.masked_mean(loss, torch.ones(4, dtype=torch.bool)).item() == pytest.approx(
        -adv.mean().item()
    )
    assert not clipped.any()


def test_clipping_starts_beyond_eps():
    eps = 0.3
    adv = torch.tensor([1.0])
    old = torch.tensor([0.0])

    def loss_at(ratio):
        loss, _, clipped = O.clipped_policy_loss(torch.log(torch.tensor([ratio])), old, adv, eps)
        return loss.item(), bool(clipped.item())

    assert loss_at(1.29) == (pytest.approx(-1.29), False)   # inside: follows the ratio
    assert loss_at(1.5) == (pytest.approx(-1.3), True)      # beyond 1 + eps: held at 1.3
    # a negative advantage is clipped below 1 - eps
    loss, _, clipped = O.clipped_policy_loss(torch.log(torch.tensor([0.5])), old,
                                             torch.tensor([-1.0]), eps)
    assert loss.item() == pytest.approx(0.7) and clipped.item()
    # gradient is zero once clipped
    lp = torch.log(torch.tensor([1.5])).requires_grad_()
    O.clipped_policy_loss(lp, old, adv, eps)[0].sum().backward()
    assert lp.grad.item() == 0.0


def test_padding_changes_nothing():
    lp_new = torch.tensor([-1.0, -2.0, -0.5, 9.0, 9.0])
    lp_old = torch.tensor([-1.1, -1.9, -0.7, -50.0, 3.0])
    adv = torch.tensor([0.5, -1.0, 2.0, 100.0, -100.0])
    mask = torch.tensor([1, 1, 1, 0, 0], dtype=torch.bool)
    loss, _, _ = O.clipped_policy_loss(lp_new, lp_old, adv, 0.3)
    kl = O.kl_k3(lp_new, lp_old)
    short_loss, _, _ = O.clipped_policy_loss(lp_new[:3], lp_old[:3], adv[:3], 0.3)
    assert O.masked_mean(loss, mask) == pytest.approx(short_loss.mean().item())
    assert O.masked_mean(kl, mask) == pytest.approx(O.kl_k3(lp_new[:3], lp_old[:3]).mean().item())


def test_k3_kl_is_zero_when_equal_and_never_negative():
    torch.manual_seed(0)
    a = torch.randn(1000) - 2
    assert torch.equal(O.kl_k3(a, a), torch.zeros(1000))
    b = a + torch.randn(1000) * 3
    assert (O.kl_k3(a, b) >= 0).all()
    # hand value: r = e^1 -> e - 1 - 1
    assert O.kl_k3(torch.tensor([0.0]), torch.tensor([1.0])).item() == pytest.approx(math.e - 2)
    assert O.kl_k1(torch.tensor([-1.0]), torch.tensor([-1.5])).item() == pytest.approx(0.5)


def test_whitening_gives_mean_zero_std_one_over_valid_tokens():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 1000.0])
    mask = torch.tensor([1, 1, 1, 1, 0], dtype=torch.bool)
    w = O.whiten(x, mask)
    assert w[4] == 0
    assert w[:4].mean().item() == pytest.approx(0.0, abs=1e-6)
    assert w[:4].std(unbiased=False).item() == pytest.approx(1.0, abs=1e-6)


def test_per_token_advantage_is_reward_over_tokens_whitened_and_clamped():
    rewards = torch.tensor([1.0, -1.0])
    token_seq = torch.tensor([0, 0, 1, 1, 1, 1])     # 2 tokens, then 4 tokens
    adv = O.per_token_advantages(rewards, token_seq)
    raw = torch.tensor([0.5, 0.5, -0.25, -0.25, -0.25, -0.25])
    expected = (raw - raw.mean()) / raw.std(unbiased=False)
    torch.testing.assert_close(adv, expected)
    # one outlier among many: clamped at 3
    rewards = torch.tensor([100.0] + [0.0] * 99)
    adv = O.per_token_advantages(rewards, torch.arange(100))
    assert adv.max().item() == 3.0


def test_group_advantages_on_hand_made_groups():
    rewards = torch.tensor([1.0, 3.0, 0.0, 0.0, 6.0])
    group = torch.tensor([0, 0, 1, 1, 1])
    torch.testing.assert_close(O.group_advantages(rewards, group),
                               torch.tensor([-1.0, 1.0, -2.0, -2.0, 4.0]))
    scaled = O.group_advantages(rewards, group, scale_by_std=True)
    # group 0: std 1; group 1: std sqrt(8)
    torch.testing.assert_close(
        scaled,
        torch.tensor([-1.0, 1.0, -2 / 8**0.5, -2 / 8**0.5, 4 / 8**0.5]),
        rtol=1e-4,
        atol=1e-4,
    )
    # a group whose rewards are all equal has zero advantage
    assert (
        O.group_advantages(torch.tensor([2.0, 2.0]), torch.tensor([0, 0]), True).abs().max() < 1e-6
    )


def test_best_of_n_target():
    assert O.best_of_n_kl(3) == pytest.approx(0.432, abs=1e-3)
    assert O.best_of_n_kl(1) == 0.0


def test_controller_raises_beta_above_target_and_lowers_it_below():
    assert O.adaptive_beta(0.1, kl=1.0, target=0.4, horizon=100) > 0.1
    assert O.adaptive_beta(0.1, kl=0.1, target=0.4, horizon=100) < 0.1
    assert O.adaptive_beta(0.1, kl=0.4, target=0.4, horizon=100) == pytest.approx(0.1)
    # the step is bounded by max_change / horizon
    assert O.adaptive_beta(0.1, kl=100.0, target=0.4, horizon=10) == pytest.approx(0.1 * 1.02)


def test_token_weights_per_token_per_sequence_and_per_summary():
    token_seq = torch.tensor([0, 0, 0, 1])          # a 3-token and a 1-token sequence
    torch.testing.assert_close(O.token_weights(token_seq, 2, "token"), torch.full((4,), 0.25))
    w = O.token_weights(token_seq, 2, "sequence")
    torch.testing.assert_close(w, torch.tensor([1 / 6, 1 / 6, 1 / 6, 0.5]))
    assert w.sum().item() == pytest.approx(1.0)
    # per summary: a sequence's tokens are summed, the sequences averaged
    kl = torch.tensor([0.1, 0.2, 0.3, 0.4])
    w = O.token_weights(token_seq, 2, "summary")
    assert (kl * w).sum().item() == pytest.approx(((0.1 + 0.2 + 0.3) + 0.4) / 2)


def test_stop_credit_pushes_stopping_where_it_would_have_paid():
    logp_stop = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.5])).requires_grad_()
    stop_reward = torch.tensor([0.0, 1.0, 0.5, 9.0])
    final = torch.tensor([0.5, 0.5, 0.5, 0.5])
    continued = torch.tensor([True, True, True, False])     # the last token was the stop
    loss = O.stop_credit_loss(logp_stop, stop_reward, final, continued)
    torch.testing.assert_close(loss, torch.tensor([0.05, -0.1, 0.0, 0.0]))
    loss.sum().backward()
    g = logp_stop.grad
    assert g[0] > 0 and g[1] < 0 and g[2] == 0 and g[3] == 0   # descend: less stop at 0, more at 1
    lp, ls = O.target_and_stop_logprobs(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([1]), 2)
    ref = torch.log_softmax(torch.tensor([1.0, 2.0, 3.0]), -1)
    assert lp.item() == pytest.approx(ref[1].item()) and ls.item() == pytest.approx(ref[2].item())


def test_clipped_stop_credit_equals_unclipped_at_ratio_one_and_stops_beyond_eps():
    old = torch.log(torch.tensor([0.1, 0.2]))
    args = (torch.tensor([1.0, 1.0]), torch.tensor([0.0, 0.0]), torch.tensor([True, True]))
    torch.testing.assert_close(O.stop_credit_loss(old, *args, logp_stop_old=old),
                               O.stop_credit_loss(old, *args))
    new = (old + torch.log(torch.tensor([1.1, 2.0]))).requires_grad_()
    loss = O.stop_credit_loss(new, *args, logp_stop_old=old, eps=0.3)
    loss.sum().backward()
    assert new.grad[0] < 0 and new.grad[1] == 0          # inside the region: push; beyond: none
    torch.testing.assert_close(loss.detach(), torch.tensor([-0.11, -0.26]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("stop", [None, 3])
def test_chunked_logprobs_equal_the_plain_ops(dtype, stop):
    """The fused log-probs (chunks of rows, a hand-written backward) give bit for bit what
    logits.float(), logsumexp and gather give through autograd, and their gradient up to
    the order its terms are summed in (one rounding step), over more rows than one chunk,
    with targets that are the stop token."""
    torch.manual_seed(0)
    n, v = 3 * O.ROWS + 5, 300
    x = (torch.randn(n, v) * 3).to(dtype).requires_grad_()
    t = torch.randint(0, v, (n,))
    t[::4] = 3                                     # the target is the stop token itself
    g = torch.randn(n)

    def plain():
        lf = x.float()
        norm = torch.logsumexp(lf, -1)
        picked = lf.gather(-1, t[:, None])[:, 0] - norm
        return (picked,) if stop is None else (picked, lf[:, stop] - norm)

    def fused():
        return (O.gather_logprobs(x, t),) if stop is None else \
            O.target_and_stop_logprobs(x, t, stop)

    got = {}
    for name, f in (("plain", plain), ("fused", fused)):
        x.grad = None
        out = f()
        sum(((o * g * (k + 1)).sum() for k, o in enumerate(out)), torch.zeros(())).backward()
        got[name] = [o.detach() for o in out], x.grad.clone()
    for a, b in zip(got["plain"][0], got["fused"][0]):
        assert a.dtype == torch.float32 and torch.equal(a, b)
    assert got["fused"][1].dtype == dtype
    ulp = 2 ** -7 if dtype == torch.bfloat16 else 2 ** -23
    torch.testing.assert_close(got["fused"][1], got["plain"][1], rtol=ulp, atol=1e-9)



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
    torch.testing.assert_close(O.gather_logprobs(logits.bfloat16(), targets),
                               torch.log_softmax(logits.bfloat16().float(), -1)[torch.arange(5), targets])


def test_ratio_one_gives_minus_mean_advantage():
    lp = torch.tensor([-1.0, -2.0, -0.5, -3.0])
    adv = torch.tensor([1.0, -2.0, 0.5, 3.0])
    loss, ratio, clipped = O.clipped_policy_loss(lp, lp, adv, eps=0.3)
    assert torch.equal(ratio, torch.ones(4))
    assert O.masked_mean(loss, torch.ones(4, dtype=torch.bool)).item() == pytest.approx(-adv.mean().item())
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
    torch.testing.assert_close(scaled, torch.tensor([-1.0, 1.0, -2 / 8 ** .5, -2 / 8 ** .5, 4 / 8 ** .5]),
                               rtol=1e-4, atol=1e-4)
    # a group whose rewards are all equal has zero advantage
    assert O.group_advantages(torch.tensor([2.0, 2.0]), torch.tensor([0, 0]), True).abs().max() < 1e-6


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


def test_empirical_cdf_by_hand():
    ref = torch.tensor([0.0, 1.0, 1.0, 2.0])          # M = 4
    x = torch.tensor([-5.0, 0.0, 1.0, 1.5, 9.0])
    # (#below + #equal / 2 + 1/2) / 5
    expected = torch.tensor([0.5, 1.0, 2.5, 3.5, 4.5]) / 5
    torch.testing.assert_close(O.empirical_cdf(x, ref), expected)


def test_bond_reward_by_hand_and_its_optimum_is_best_of_n():
    ref = torch.tensor([0.0, 1.0, 2.0])
    r = torch.tensor([0.0, 2.0, 5.0])
    # (#below + #equal / 2 + 1/2) / (M + 1): below 0, 2, 3; equal 1, 1, 0
    f = torch.tensor([1.0, 3.0, 3.5]) / 4
    torch.testing.assert_close(O.bond_reward(r, ref, 4), 3 * torch.log(f))
    assert torch.all(O.bond_reward(r, ref, 1) == 0)      # best-of-1 is the reference itself
    # pi_ref * exp(R) with R = (n-1) log F puts mass F^(n-1) on each draw; on a continuous
    # reward that is the density of the best of n draws: n F^(n-1) f.
    torch.manual_seed(0)
    draws = torch.randn(4000)
    n = 5
    w = torch.exp(O.bond_reward(draws, draws, n))
    tilted_mean = (w * draws).sum() / w.sum()
    best_mean = torch.randn(20000, n).max(-1).values.mean()
    assert tilted_mean.item() == pytest.approx(best_mean.item(), abs=0.05)


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


def test_group_stop_loss_on_a_hand_computed_group():
    """One prompt group of two samples: A (2 tokens, reward 1) and B (1 token, reward 0).
    Group advantages +0.5 / -0.5 on every token, per-token weights 1/3; the stop credit at
    A's first position and B's only position (A's second is masked: no clean stop there)."""
    lp = torch.log(torch.tensor([0.5, 0.4, 0.2])).requires_grad_()
    adv = torch.tensor([0.5, 0.5, -0.5])
    weight = torch.full((3,), 1 / 3)
    lp_stop = torch.log(torch.tensor([0.1, 0.3, 0.2])).requires_grad_()
    stop_reward = torch.tensor([0.2, 0.6, 0.9])     # had it stopped before each token
    final = torch.tensor([1.0, 1.0, 0.0])           # what each token's sample earned
    may_stop = torch.tensor([True, False, True])
    seq_w = torch.full((3,), 0.5)                   # 1 / S
    loss, pg, ratio, clipped = O.group_stop_loss(lp, lp.detach(), adv, weight, lp_stop,
                                                 lp_stop.detach(), stop_reward, final,
                                                 may_stop, seq_w, stop_weight=2.0, eps=0.3)
    torch.testing.assert_close(pg, -adv)
    assert torch.equal(ratio.detach(), torch.ones(3)) and not clipped.any()
    # group term: (-0.5 - 0.5 + 0.5) / 3; credit: 2 * 0.5 * (-0.1 * (0.2 - 1) - 0.2 * (0.9 - 0))
    expected = -1 / 6 + 2 * 0.5 * (0.08 - 0.18)
    assert loss.sum().item() == pytest.approx(expected, abs=1e-6)
    loss.sum().backward()
    # d/dlog pi: -A * w for the group term; d/dlog p_stop: -p (r_stop - r_final) * w_s * 2
    torch.testing.assert_close(lp.grad, -adv / 3)
    torch.testing.assert_close(lp_stop.grad, torch.tensor([0.08, 0.0, -0.18]))
    # weight 0 is the group term alone
    alone, *_ = O.group_stop_loss(lp, lp.detach(), adv, weight, lp_stop, lp_stop.detach(),
                                  stop_reward, final, may_stop, seq_w, stop_weight=0.0, eps=0.3)
    torch.testing.assert_close(alone, -adv * weight)


def test_decision_weights_keep_the_total_on_the_decision_tokens():
    w = torch.tensor([0.1, 0.2, 0.3, 0.4])
    d = torch.tensor([False, True, False, True])
    out = O.decision_weights(w, d)
    torch.testing.assert_close(out, torch.tensor([0.0, 1 / 3, 0.0, 2 / 3]))
    assert out.sum().item() == pytest.approx(w.sum().item())
    torch.testing.assert_close(O.decision_weights(w, torch.ones(4, dtype=torch.bool)), w)


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


def test_group_best_of_n_weights_by_rank_within_each_group():
    reward = torch.tensor([0.5, 0.9, 0.1, 0.7, 3.0, 1.0, 1.0])
    group = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    w = O.group_best_of_n_weights(reward, group, 2)
    # group 0 (4 samples) ranks 0.1 < 0.5 < 0.7 < 0.9: C(i, 1) / C(4, 2) = 0, 1, 2, 3 / 6
    torch.testing.assert_close(w[:4], torch.tensor([1 / 6, 3 / 6, 0.0, 2 / 6]))
    # group 1 (3 samples): the tie 1.0 = 1.0 goes to the earlier sample: ranks 2, 1, 0
    torch.testing.assert_close(w[4:], torch.tensor([2 / 3, 1 / 3, 0.0]))
    # n larger than a group: its best alone
    torch.testing.assert_close(O.group_best_of_n_weights(reward, group, 9)[4:],
                               torch.tensor([1.0, 0.0, 0.0]))


def test_stop_decision_loss_trains_only_the_stop_probability():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.5]], requires_grad=True)  # stop = 2
    logp = torch.log_softmax(logits, -1)
    stopped = torch.tensor([False, True])
    loss = O.stop_decision_loss(logp[:, 2], stopped)
    p = logp[:, 2].exp().detach()
    torch.testing.assert_close(loss.detach(), torch.stack([-torch.log(1 - p[0]), -torch.log(p[1])]))
    loss.sum().backward()
    # going on: the gradient lowers the stop logit and keeps the other tokens' odds
    g = logits.grad[0]
    assert g[2] > 0 and g[0] == pytest.approx(g[1] * math.exp(2.0), rel=1e-5)


def test_best_of_n_hazard_by_hand():
    # the reference: lengths 10, 20, 30 with rewards 0, 1, 0 (the middle length is best)
    ref_r, ref_l = torch.tensor([0.0, 1.0, 0.0]), torch.tensor([10.0, 20.0, 30.0])
    # F of the reference rewards (ties half): 0 -> (0 + 1 + .5) / 4, 1 -> (2 + .5 + .5) / 4
    f_lo, f_hi = 1.5 / 4, 3.0 / 4
    n = 3
    stop_r = torch.tensor([0.0, 1.0, 0.0, 0.0])
    prefix = torch.tensor([5.0, 20.0, 25.0, 40.0])
    shift = O.best_of_n_hazard(stop_r, prefix, ref_r, ref_l, n)
    go = torch.tensor([(f_lo ** 2 + f_hi ** 2 + f_lo ** 2) / 3,    # longer than 5: all three
                       f_lo ** 2,                                 # longer than 20: only 30
                       f_lo ** 2,
                       f_lo ** 2])                                # past them all: the worst
    stop = torch.tensor([f_lo, f_hi, f_lo, f_lo]) ** 2
    torch.testing.assert_close(shift, torch.log(stop / go))
    assert shift[0] < 0 < shift[1]       # too short: go on; at the best length: stop
    # best-of-1 is the reference: no shift
    assert torch.all(O.best_of_n_hazard(stop_r, prefix, ref_r, ref_l, 1).abs() < 1e-6)


def test_reward_hazard_by_hand():
    # the same reference as above; the tilt w = exp(r / beta)
    ref_r, ref_l = torch.tensor([0.0, 1.0, 0.0]), torch.tensor([10.0, 20.0, 30.0])
    beta = 0.5
    stop_r = torch.tensor([0.0, 1.0, -1.0])
    prefix = torch.tensor([5.0, 20.0, 40.0])
    shift = O.reward_hazard(stop_r, prefix, ref_r, ref_l, beta)
    e = math.exp(1 / beta)
    go = torch.tensor([(1 + e + 1) / 3,     # longer than 5: all three
                       1.0,                 # longer than 20: only 30 (reward 0)
                       1.0])                # past them all: the worst reference weight
    stop = torch.tensor([1.0, e, math.exp(-1 / beta)])
    torch.testing.assert_close(shift, torch.log(stop / go))
    # a flat tilt (huge beta) is the reference: no shift
    assert torch.all(O.reward_hazard(stop_r, prefix, ref_r, ref_l, 1e9).abs() < 1e-6)


def test_hazard_loss_targets_the_shifted_stop_probability():
    ref = torch.log(torch.tensor([0.2, 0.5]))
    shift = torch.tensor([math.log(3.0), 0.0])
    # target odds: 0.25 * 3 = 0.75 -> q = 3/7; and 0.5
    q = torch.tensor([3 / 7, 0.5])
    logp = torch.log(q).requires_grad_()
    O.hazard_loss(logp, ref, shift).sum().backward()
    torch.testing.assert_close(logp.grad, torch.zeros(2), atol=1e-6, rtol=0)   # p = q: minimal
    low = torch.log(torch.tensor([0.1, 0.1])).requires_grad_()
    O.hazard_loss(low, ref, shift).sum().backward()
    assert torch.all(low.grad < 0)       # below the target: descent raises p(stop)


def test_teacher_logprobs_shift_only_the_stop_odds():
    # reference over 3 tokens (stop = 2): probs 0.5, 0.3, 0.2; stop odds 0.25 -> x3 = 0.75
    ref_logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]])) + 7.0   # any offset
    teacher = O.teacher_logprobs(ref_logits, 2, torch.tensor([math.log(3.0)])).exp()[0]
    # p(stop) = 0.75 / 1.75 = 3/7; the others keep 5:3 in the remaining 4/7
    torch.testing.assert_close(teacher, torch.tensor([4 / 7 * 5 / 8, 4 / 7 * 3 / 8, 3 / 7]))
    assert ref_logits[0, 2] == pytest.approx(math.log(0.2) + 7.0)   # the input is untouched


def test_reverse_kl_by_hand_and_its_minimum():
    p, q = torch.tensor([0.5, 0.25, 0.25]), torch.tensor([0.25, 0.25, 0.5])
    by_hand = 0.5 * math.log(2) + 0.25 * math.log(0.5)
    got = O.reverse_kl(torch.log(p)[None], torch.log(q)[None])
    assert got.item() == pytest.approx(by_hand, abs=1e-6)
    logits = torch.log(q)[None].clone().requires_grad_()     # policy = teacher: KL 0, flat
    kl = O.reverse_kl(logits, torch.log(q)[None])
    kl.sum().backward()
    assert kl.item() == pytest.approx(0.0, abs=1e-7)
    torch.testing.assert_close(logits.grad, torch.zeros(1, 3), atol=1e-6, rtol=0)

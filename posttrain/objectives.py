"""The RL objective as pure tensor functions: no config, no model.

Shapes: N = completion tokens in a batch (flattened), S = sequences (samples).
Every reduction takes `mask` so padded positions change nothing.
"""
from __future__ import annotations

import math

import torch


ROWS = 16  # rows of logits reduced at a time: one chunk stays in cache across its passes


class _PickedLogProbs(torch.autograd.Function):
    """log softmax(logits)[:, cols] for K columns per row (the target, and the stop token),
    in chunks of ROWS rows: each chunk is upcast, reduced and, in backward, turned into its
    gradient while it is in cache, instead of whole-tensor passes over (N, V) fp32 copies.
    The log-probs are the plain ops' (logits.float(), logsumexp, gather) bit for bit: per
    row the same reductions; the gradient is autograd's up to the order its terms are
    summed in (one rounding step), in the logits' dtype."""

    @staticmethod
    def forward(ctx, logits, cols):                 # (N, V) any float, (N, K) long
        lse = logits.new_empty(logits.shape[0], dtype=torch.float32)
        for s in range(0, logits.shape[0], ROWS):
            lse[s:s + ROWS] = torch.logsumexp(logits[s:s + ROWS].float(), -1)
        ctx.save_for_backward(logits, cols, lse)
        return logits.gather(-1, cols).float() - lse[:, None]         # (N, K) fp32

    @staticmethod
    def backward(ctx, grad):                        # (N, K)
        logits, cols, lse = ctx.saved_tensors
        out = torch.empty_like(logits)
        for s in range(0, logits.shape[0], ROWS):
            g = grad[s:s + ROWS]
            part = torch.exp(logits[s:s + ROWS].float() - lse[s:s + ROWS, None])
            part = part * -g.sum(-1, keepdim=True)
            part.scatter_add_(-1, cols[s:s + ROWS], g)
            out[s:s + ROWS] = part
        return out, None


def gather_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] without materialising the full log-softmax: in
    cache-sized chunks of rows, never an (N, V) fp32 copy (the tests hold it to the plain
    log-softmax and gather).

    logits: (N, V) any float dtype; targets: (N,) long -> (N,) float32
    """
    return _PickedLogProbs.apply(logits, targets.unsqueeze(-1))[:, 0]


def target_and_stop_logprobs(logits: torch.Tensor, targets: torch.Tensor,
                             stop_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(target) and log pi(stop token) at every position, one logsumexp for both.
    logits: (N, V); targets: (N,) -> ((N,), (N,)) float32"""
    cols = torch.stack([targets, torch.full_like(targets, stop_id)], -1)          # (N, 2)
    both = _PickedLogProbs.apply(logits, cols)
    return both[:, 0], both[:, 1]


def stop_credit_loss(logp_stop: torch.Tensor, stop_reward: torch.Tensor,
                     final_reward: torch.Tensor, continued: torch.Tensor,
                     logp_stop_old: torch.Tensor | None = None, eps: float = 0.3) -> torch.Tensor:
    """Counterfactual credit for the decision to stop, per position.

    At a position the sample continued past, stopping would have earned `stop_reward` (the
    reward of the prefix's length: known without sampling), and continuing earned
    `final_reward` (what the sample ended with: a one-sample estimate of the value of going
    on). The expected reward's gradient with respect to p_stop there is their difference, so
    the loss is -p_stop * (stop_reward - final_reward). Using p (not log p) puts the push
    where stopping already has mass: at the model's own sentence ends.

    With `logp_stop_old` (the sampling policy's), p_stop = p_old * rho is PPO-clipped: the
    loss is -p_old * min(rho * d, clip(rho, 1-eps, 1+eps) * d), so one pass over a fixed set
    cannot move a stop probability far from where the samples were drawn.

    logp_stop, stop_reward, final_reward, logp_stop_old: (N,); continued: (N,) bool -> (N,)
    """
    diff = (stop_reward - final_reward).detach()
    if logp_stop_old is None:
        loss = -logp_stop.exp() * diff
    else:
        rho = torch.exp(logp_stop - logp_stop_old)
        loss = -logp_stop_old.exp() * torch.minimum(rho * diff, rho.clamp(1 - eps, 1 + eps) * diff)
    return torch.where(continued, loss, torch.zeros_like(logp_stop))


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over positions where mask is true. x, mask: same shape -> scalar."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / (std + eps) over the valid positions; invalid positions become 0.

    x, mask: (N,) or any matching shape. std is the population std of the valid values.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return torch.where(mask.bool(), (x - mean) / (var.sqrt() + eps), torch.zeros_like(x))


def per_token_advantages(rewards: torch.Tensor, token_seq: torch.Tensor, clamp: float = 3.0,
                         mask: torch.Tensor | None = None) -> torch.Tensor:
    """The reference recipe's advantage: each token of sequence s gets reward_s / tokens_s, then the
    batch's tokens are whitened together and clamped to [-clamp, clamp].

    rewards: (S,) float; token_seq: (N,) long, the sequence each token belongs to -> (N,)
    """
    counts = torch.bincount(token_seq, minlength=rewards.shape[0]).clamp(min=1)   # (S,)
    per_token = (rewards / counts)[token_seq]                                       # (N,)
    mask = torch.ones_like(per_token, dtype=torch.bool) if mask is None else mask
    return whiten(per_token, mask).clamp(-clamp, clamp)


def group_advantages(rewards: torch.Tensor, group: torch.Tensor, scale_by_std: bool = False,
                     eps: float = 1e-6) -> torch.Tensor:
    """Group-relative advantage: reward minus the mean of its prompt's group, optionally
    divided by the group's std. rewards: (S,); group: (S,) long group ids -> (S,)"""
    n = int(group.max()) + 1
    counts = torch.bincount(group, minlength=n).to(rewards.dtype).clamp(min=1)     # (G,)
    mean = torch.zeros(n, dtype=rewards.dtype).index_add(0, group, rewards) / counts
    centred = rewards - mean[group]                                                 # (S,)
    if not scale_by_std:
        return centred
    var = torch.zeros(n, dtype=rewards.dtype).index_add(0, group, centred ** 2) / counts
    return centred / (var.sqrt()[group] + eps)


def token_weights(token_seq: torch.Tensor, num_seqs: int, agg: str = "token") -> torch.Tensor:
    """Weights that turn a sum over tokens into the loss.

    `token` (the reference recipe): every token weighs 1/N, so a long sample moves the loss
    by more tokens than a short one (its advantage pushes on more tokens: a length bias).
    `sequence`: each sequence's tokens are averaged first, then the sequences (each weighs
    1/S whatever its length; Dr. GRPO and DAPO discuss the bias each choice carries).
    `summary`: summed over each sequence's tokens, averaged over sequences (every token
    weighs 1/S): a sequence's log-probability and its KL in nats per summary, the units in
    which the KL-regularised optimum pi_ref * exp(R / beta) and the best-of-N KL
    log N - (N-1)/N are stated.
    token_seq: (N,) sequence id of each token -> (N,)
    """
    if agg == "token":
        return torch.full(token_seq.shape, 1.0 / token_seq.numel())
    if agg == "summary":
        return torch.full(token_seq.shape, 1.0 / num_seqs)
    counts = torch.bincount(token_seq, minlength=num_seqs).clamp(min=1).float()
    return (1.0 / (counts * num_seqs))[token_seq]


def kl_k3(logp_new: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """Per-token KL(new || ref) estimate k3 = r - 1 - log r with r = p_ref / p_new.
    Never negative; 0 where the two agree. (N,), (N,) -> (N,)"""
    log_r = logp_ref - logp_new
    return torch.expm1(log_r) - log_r


def kl_k1(logp_new: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """Per-token KL estimate k1 = log p_new - log p_ref (unbiased, can be negative)."""
    return logp_new - logp_ref


def clipped_policy_loss(logp_new: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor,
                        eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate per token: -min(ratio * A, clip(ratio, 1-eps, 1+eps) * A).

    logp_new, logp_old, adv: (N,) -> (loss (N,), ratio (N,), clipped (N,) bool)
    """
    ratio = torch.exp(logp_new - logp_old)                                          # (N,)
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - eps, 1 + eps) * adv
    return -torch.minimum(unclipped, clipped), ratio, clipped < unclipped


def best_of_n_weights(k: int, n: int) -> torch.Tensor:
    """(k,) float64: the probability that the sample ranked i-th lowest of k (by reward) is
    the best of a uniformly drawn n-subset, C(i, n-1) / C(k, n); sums to 1. Weighting k
    samples of a policy by it is best-of-n sampling of that policy, in expectation."""
    if not 1 <= n <= k:
        raise ValueError(f"best-of-{n} needs 1 <= n <= {k} samples")
    return torch.tensor([math.comb(i, n - 1) for i in range(k)],
                        dtype=torch.float64) / math.comb(k, n)


def best_of_n_kl(n: int) -> float:
    """The KL of best-of-n sampling from a policy: log n - (n - 1) / n (0.432 for n = 3)."""
    if n < 1:
        raise ValueError(f"best-of-n needs n >= 1, got {n}")
    return math.log(n) - (n - 1) / n


def adaptive_beta(beta: float, kl: float, target: float, horizon: float, n_steps: int = 1,
                  max_change: float = 0.2) -> float:
    """Ziegler et al. (2019) proportional controller: raise beta when the measured KL is
    above target, lower it below. error = clip(kl / target - 1, -max_change, max_change);
    beta *= 1 + error * n_steps / horizon."""
    error = max(-max_change, min(max_change, kl / target - 1.0))
    return beta * (1.0 + error * n_steps / horizon)

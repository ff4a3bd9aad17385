"""What the offline and online RL loops share: the policy (base + frozen SFT adapter + a
fresh RL adapter, B = 0 so it starts equal to SFT) in the shared training loop, the
held-out length checks, beta and its controller, and the finished adapter."""
from __future__ import annotations

import time

from posttrain import objectives as O
from posttrain.config import Config
from posttrain.model.adapters import RL, load_policy
from posttrain.model.choices import DeviceChoices
from posttrain.rl.held_out import HeldOut
from posttrain.rl.step import StepContext, step_passes, step_tokens
from posttrain.train.loop import TrainLoop


class Trainer:
    """One RL run: `step_on` trains one planned step; `finish` writes the adapter."""

    def __init__(self, cfg: Config, total_steps: int, tokenizer, acc, dtype):
        self.cfg, self.tokenizer, self.acc, self.dtype = cfg, tokenizer, acc, dtype
        DeviceChoices(cfg, acc.device).check()
        model = load_policy(cfg, acc.device, cfg.run_dir / "sft" / "adapter", rl="new")
        self.loop = TrainLoop(cfg, "rl", cfg.rl, model, total_steps, acc, adapter=RL,
                              extra={"beta": cfg.rl.beta})
        self.held_out = HeldOut(cfg, tokenizer)
        # the KL of best-of-N sampling, in nats per summary: the budget the KL is judged by
        self.kl_budget = O.best_of_n_kl(cfg.rl.best_of_n)
        if "eval_before" not in self.extra:
            self.extra["eval_before"] = self.held_out.lengths(self.model, acc.device, dtype)
            self.loop.metrics.log(0, **self.extra["eval_before"])
        self.loop.start()

    @property
    def model(self):
        return self.loop.model

    @property
    def extra(self) -> dict:
        return self.loop.extra

    @property
    def step(self) -> int:
        return self.loop.step

    def step_on(self, rollouts, step, reward, credit, ref_cache=None, **logged) -> None:
        """Train one step, steer beta, log, and run the held-out check when due."""
        cfg, t0 = self.cfg, time.perf_counter()
        ctx = StepContext(self.model, self.acc, cfg, self.tokenizer.pad_token_id,
                          self.tokenizer.eos_token_id, self.extra["beta"], ref_cache)
        row, grad_norm, lr = self.loop.run_step(
            lambda: step_passes(ctx, rollouts, step, reward, credit))
        row.update(lr=lr, grad_norm=float(grad_norm), tokens_per_s=step_tokens(
            rollouts, step, ctx.share_prompt) / (time.perf_counter() - t0))
        # 6. beta: fixed, or steered toward the best-of-N budget (the reference recipe holds
        # the per-token KL against it; adaptive_summary the KL per summary, its own unit)
        if cfg.rl.kl_control != "fixed":
            kl = row["kl"] if cfg.rl.kl_control == "adaptive_token" else row["kl_summary"]
            self.extra["beta"] = O.adaptive_beta(self.extra["beta"], kl, self.kl_budget,
                                                 cfg.rl.kl_horizon)
        # 7. log, evaluate, checkpoint
        row.update(kl_budget=self.kl_budget, **logged)
        every = cfg.rl.eval_every
        if every and self.step % every == 0 and self.step < self.loop.total:
            row.update(self.held_out.lengths(self.model, self.acc.device, self.dtype))
        self.loop.log(row, kl=f"{row['kl_summary']:.2f}/summary", ratio=f"{row['ratio_mean']:.3f}",
                      beta=f"{row['beta']:.3g}")

    def checkpoint_due(self) -> bool:
        return self.loop.checkpoint_due(self.step, self.cfg.rl.checkpoint_every)

    def save_checkpoint(self) -> None:
        self.loop.save_checkpoint()

    def finish(self, **summary) -> dict:
        """The held-out check after training, the adapter and rl/summary.json."""
        self.loop.close_bar()
        before = self.extra["eval_before"]
        after = self.held_out.lengths(self.model, self.acc.device, self.dtype)
        summary = {"steps": self.step, "beta_final": self.extra["beta"],
                   "kl_budget": self.kl_budget, "eval_before": before, "eval_after": after,
                   **summary}
        self.loop.finish(self.tokenizer, summary, after)
        print(f"rl: held-out length {before['eval_len_mean']:.1f} ± {before['eval_len_std']:.1f}"
              f" -> {after['eval_len_mean']:.1f} ± {after['eval_len_std']:.1f} chars; adapter in "
              f"{self.loop.out / 'adapter'}")
        return summary

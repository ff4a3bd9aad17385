"""The plot stage: PNG figures of the length distributions and the training curves.

Reads `<out_dir>/eval/samples.jsonl` and `<out_dir>/metrics.jsonl`; writes `<out_dir>/plots/`:
  lengths.png          each model's length histogram side by side (same bins), mean and
                       variance written on each
  lengths_overlay.png  the same histograms overlaid
  sft_training.png     SFT loss per step and held-out loss
  length_control.png   requested vs achieved length (length-conditioned runs only)
  frontier.png         variance ratio against KL per summary: the SFT model's best-of-N
                       curve, the RL point with its intervals, and the RL policy's own
                       best-of-N (from eval/report.json)
  rl_training.png      RL loss, KL per summary (with the best-of-N budget) and per token,
                       beta, reward, and the length mean and std of the held-out checks (and
                       of each online round)
A figure whose inputs are missing is skipped with a message.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from posttrain.config import Config
from posttrain.io import InputFileError, atomic_write_bytes, read_json, read_jsonl
from posttrain.metrics import read_metrics

COLORS = {"base": "#7f7f7f", "sft": "#1f77b4", "rl": "#d62728"}
LABELS = {"base": "base", "sft": "SFT", "rl": "RL"}


def _pyplot():
    import matplotlib  # heavy: loaded by the plot stage only
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def _lengths(samples: list[dict]) -> dict:
    out = {}
    for s in samples:
        out.setdefault(s["model"], []).append(s["length_chars"])
    return {m: np.asarray(v, dtype=float) for m, v in out.items()}


def length_figures(samples: list[dict], out: Path) -> list[Path]:
    """Histograms of completion length (chars) per model: side by side and overlaid."""
    plt = _pyplot()
    lengths = _lengths(samples)
    top = max(v.max() for v in lengths.values())
    bins = np.linspace(0, top + 1, 31)
    fig, axes = plt.subplots(1, len(lengths), figsize=(4.2 * len(lengths), 3.4), sharey=True,
                             squeeze=False)
    for ax, (m, v) in zip(axes[0], lengths.items()):
        ax.hist(v, bins=bins, color=COLORS.get(m), alpha=0.85)
        ax.set_title(f"{LABELS.get(m, m)}: mean {v.mean():.1f}, variance {v.var():.0f}")
        ax.set_xlabel("summary length (characters)")
    axes[0][0].set_ylabel("samples")
    paths = [_save(fig, out / "lengths.png")]
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for m, v in lengths.items():
        ax.hist(v, bins=bins, color=COLORS.get(m), alpha=0.45,
                label=f"{LABELS.get(m, m)} (mean {v.mean():.1f}, var {v.var():.0f})")
    ax.set_xlabel("summary length (characters)")
    ax.set_ylabel("samples")
    ax.legend()
    paths.append(_save(fig, out / "lengths_overlay.png"))
    return paths


def control_figure(samples: list[dict], out: Path) -> Path:
    """Requested vs achieved length (mean and std per model) for length-conditioned runs."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 4.4))
    per: dict = {}
    for s in samples:
        per.setdefault(s["model"], {}).setdefault(s["target"], []).append(s["length_chars"])
    top = 0.0
    for k, (m, by_t) in enumerate(per.items()):
        ts = sorted(by_t)
        means = [np.mean(by_t[t]) for t in ts]
        stds = [np.std(by_t[t]) for t in ts]
        shift = (k - (len(per) - 1) / 2) * 2.5
        ax.errorbar([t + shift for t in ts], means, yerr=stds, fmt="o-", capsize=4,
                    color=COLORS.get(m), label=f"{LABELS.get(m, m)} (mean ± std)")
        top = max(top, max(ts), max(a + b for a, b in zip(means, stds)))
    ax.plot([0, top * 1.05], [0, top * 1.05], "k--", lw=0.8, label="achieved = requested")
    ax.set_xlabel("requested length (characters)")
    ax.set_ylabel("achieved length (characters)")
    ax.legend(fontsize=8)
    return _save(fig, out / "length_control.png")


def _series(rows: list[dict], key: str) -> tuple[list, list]:
    """(steps, values) of one metric, by step; a step logged twice keeps its last value."""
    by_step = {r["step"]: r[key] for r in rows if r.get(key) is not None}
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def _panel(ax, rows, keys: list[str], title: str, hline: float | None = None) -> None:
    for k in keys:
        x, y = _series(rows, k)
        if x:
            ax.plot(x, y, marker="." if len(x) < 30 else None, label=k)
    if hline is not None:
        ax.axhline(hline, color="k", ls="--", lw=0.8, label="best-of-N budget")
    ax.set_title(title)
    ax.set_xlabel("step")
    if len(ax.get_legend_handles_labels()[0]) > 1:
        ax.legend(fontsize=7)


def training_figures(run_dir: Path, out: Path) -> list[Path]:
    """Training curves from metrics.jsonl, one figure per stage that logged."""
    plt = _pyplot()
    paths = []
    sft = read_metrics(run_dir, "sft")
    if sft:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
        _panel(axes[0], sft, ["loss"], "SFT training loss")
        _panel(axes[1], sft, ["eval_loss"], "SFT held-out loss")
        paths.append(_save(fig, out / "sft_training.png"))
    rl = read_metrics(run_dir, "rl")
    if rl:
        budget = next((r["kl_budget"] for r in rl if r.get("kl_budget") is not None), None)
        fig, axes = plt.subplots(2, 5, figsize=(21, 6.4))
        _panel(axes[0][0], rl, ["loss", "policy_loss"], "RL loss")
        _panel(axes[0][1], rl, ["kl_summary"], "KL to SFT per summary (nats)", budget)
        _panel(axes[0][2], rl, ["kl", "kl_k1"], "KL to SFT per token")
        _panel(axes[0][3], rl, ["beta"], "KL coefficient beta")
        _panel(axes[0][4], rl, ["reward_mean"], "mean reward")
        # held-out checks, and in online mode the spread of each round's own samples
        _panel(axes[1][0], rl, ["eval_len_mean", "round_len_mean"], "length mean (chars)")
        _panel(axes[1][1], rl, ["eval_len_std", "round_len_std"], "length std (chars)")
        # the ending rule: the share of samples it penalised (per step; per round online)
        _panel(axes[1][2], rl, ["penalised", "round_abrupt"], "abrupt endings (share)")
        _panel(axes[1][3], rl, ["clip_frac"], "PPO clip fraction")
        axes[1][4].axis("off")
        fig.tight_layout()
        paths.append(_save(fig, out / "rl_training.png"))
    return paths


def frontier_figure(report: dict, out: Path) -> Path:
    """Variance ratio (SFT's variance over the policy's) against KL per summary, both on log
    axes: the SFT's best-of-N at its KL bound, RL with its 95% intervals, and RL's own
    best-of-N placed at RL's KL plus the bound (KL adds up only approximately)."""
    plt = _pyplot()
    f = report["frontier"]
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    sft = [r for r in f["tables"].get("sft", []) if r["n"] > 1]
    if sft:
        ax.plot([r["kl_bound"] for r in sft], [r["ratio"] for r in sft], "o-",
                color=COLORS["sft"], label="SFT best-of-N (KL bound)")
        for r in sft:
            ax.annotate(f"N={r['n']}", (r["kl_bound"], r["ratio"]), fontsize=7,
                        textcoords="offset points", xytext=(4, -10))
    rl = f.get("rl")
    if rl is not None:
        m = report["models"]["rl"]
        (klo, khi), (rlo, rhi) = m["kl_k3_summary_ci95"], report["variance_ratio_ci95"]
        x, y = rl["kl_per_summary"], rl["ratio"]
        ax.errorbar([x], [y], xerr=[[x - klo], [khi - x]], yerr=[[y - rlo], [rhi - y]],
                    fmt="s", color=COLORS["rl"], capsize=4, label="RL (95% intervals)")
        own = [r for r in f["tables"].get("rl", []) if r["n"] > 1]
        if own:
            ax.plot([x + r["kl_bound"] for r in own], [r["ratio"] for r in own], "s--",
                    color=COLORS["rl"], alpha=0.5, label="RL best-of-N (RL's KL + bound)")
    budget = f["budget"]
    ax.axvline(budget["kl_per_summary"], color="k", ls=":", lw=0.8,
               label=f"best-of-{budget['n']} budget")
    ax.set_xscale("log")
    ax.set_yscale("log")
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter
    for axis in (ax.xaxis, ax.yaxis):     # plain numbers at 1, 2, 5 x 10^k on log axes
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axis.set_major_formatter(ScalarFormatter())
        axis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("KL to SFT per summary (nats)")
    ax.set_ylabel("length variance ratio SFT / policy")
    ax.legend(fontsize=7)
    return _save(fig, out / "frontier.png")


def run(cfg: Config) -> list[Path]:
    """Write every figure whose inputs exist; returns their paths."""
    out = cfg.run_dir / "plots"
    paths = []
    samples_file = cfg.run_dir / "eval" / "samples.jsonl"
    if samples_file.is_file():
        samples = read_jsonl(samples_file, {"model": str, "length_chars": (int, float)},
                             "run `posttrain eval` (again) first")
        paths += length_figures(samples, out)
        if samples and all(s.get("target") is not None for s in samples):
            paths.append(control_figure(samples, out))
        report_file = cfg.run_dir / "eval" / "report.json"
        report = read_json(report_file, "run `posttrain eval` (again) first") \
            if report_file.is_file() else {}
        if report.get("frontier"):
            paths.append(frontier_figure(report, out))
    else:
        print(f"plot: no {samples_file} (run `posttrain eval`); skipping the length figures")
    paths += training_figures(cfg.run_dir, out)
    if not paths:
        raise InputFileError(f"plot: nothing to plot in {cfg.run_dir}: it has neither "
                             "eval/samples.jsonl nor training metrics (metrics.jsonl); run "
                             "`posttrain eval` or a training stage first")
    for p in paths:
        print(f"plot: wrote {p}")
    return paths

"""RL recipes side by side: named variants x seeds, judged on prompts the report never uses.

    python bench/rl_recipes.py [--config demo] [--variants a,b] [--seeds 42,1,2]
                               [--out runs/recipes] [--eval-prompts 48 --eval-samples 8]
                               [key=value ...]

Every variant starts from the SFT adapter of its seed (`<out>/sft-s<seed>`, trained once
and shared by every RL variant; a variant that changes `sft.*` trains its own,
`<out>/sft-s<seed>-<variant>`, and reports its held-out loss and wall time). Each RL variant
gets the same sampling budget as the config (rounds x prompts x samples online, the same
number of samples offline) and the sampled tokens are printed beside it. Every policy is
judged by the same evaluator (`posttrain eval`, the same prompts and seeds for all) on
`--eval-prompts` x `--eval-samples` samples of prompts from `eval.prompts_split=train`
(for the demo: its training posts; pass `eval.prompts=FILE` for real data, rows that
neither SFT nor RL read) - never the held-out prompts the demo's report uses. The SFT
policy is sampled once per seed. Each (variant, seed) result is saved as it finishes
(`<out>/results/<variant>-s<seed>.json`); a re-run skips finished ones. Prints per variant
the SFT/RL variance ratio (mean and min-max over seeds), RL mean vs SFT, abrupt-ending
rates, ROUGE-L, the KL per token and per summary, the SFT best-of-N whose variance ratio
the RL policy matches (from the SFT's own samples: the yardstick, with its KL bound), and
wall time, and writes `<out>/table.md` with the SFT's best-of-N frontier beneath.
Overrides given on the command line win over a variant's own keys.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Variant:
    about: str
    overrides: tuple          # key=value over the config; sft.* keys give it its own SFT
    offline: bool = False     # runs `posttrain generate` first (rl.mode=offline)


# Every variant spells out the keys it depends on, so it means the same whatever the base
# config's RL section holds (a later key=value wins over an earlier one).
_OFFLINE = ("rl.mode=offline", "rl.advantage=per_token", "reward.ending=null",
            "rl.max_lr=3e-4", "rl.min_lr=3e-5", "rl.epochs=1", "rl.kl_control=adaptive_token",
            "rl.beta=0.01")
_ONLINE = ("rl.mode=online", "rl.max_lr=1e-3", "rl.min_lr=1e-4", "rl.ppo_epochs=2",
           "reward.ending=-1", "rl.kl_control=adaptive_token", "rl.beta=0.01", "rl.baseline=group",
           "rl.group_std=false", "rl.loss_agg=token")
VARIANTS = {
    "seed-offline": Variant(
        "the reference recipe's objective: offline set of 512 SFT samples, reward/tokens whitened, "
        "lr 3e-4, 1 epoch", _OFFLINE, offline=True),
    "demo-stop": Variant(
        "main's demo: online, stop credit alone, no ending rule, lr 3e-4, 1 PPO epoch",
        ("rl.mode=online", "rl.advantage=stop", "reward.ending=null", "rl.max_lr=3e-4",
         "rl.min_lr=3e-5", "rl.ppo_epochs=1", "rl.kl_control=adaptive_token", "rl.beta=0.01")),
    "group-end": Variant(
        "online, group advantages on every token, -1 for an abrupt ending, lr 1e-3, "
        "2 PPO epochs", _ONLINE + ("rl.advantage=group",)),
    "group-stop-end": Variant(
        "group-end plus the stop credit (weight 1) at clean sentence ends",
        _ONLINE + ("rl.advantage=group_stop", "rl.stop_weight=1.0")),
    "step-end": Variant(
        "group-end with one baseline per step (all prompts) instead of per prompt",
        _ONLINE + ("rl.advantage=group", "rl.baseline=step")),
    "step-stop-end": Variant(
        "group-stop-end with one baseline per step (all prompts) instead of per prompt",
        _ONLINE + ("rl.advantage=group_stop", "rl.stop_weight=1.0", "rl.baseline=step")),
    "step-stop-end-flat": Variant(
        "step-stop-end with the learning rate held at 1e-3 after warmup (no cosine decay: "
        "the last rounds still learn)",
        _ONLINE + ("rl.advantage=group_stop", "rl.stop_weight=1.0", "rl.baseline=step",
                   "rl.min_lr=1e-3")),
    "step-stop-end-b0.1": Variant(
        "step-stop-end with a 10x stronger KL term: beta fixed at 0.1",
        _ONLINE + ("rl.advantage=group_stop", "rl.stop_weight=1.0", "rl.baseline=step",
                   "rl.kl_control=fixed", "rl.beta=0.1")),
    "group-stop-end-w4": Variant(
        "group-stop-end with the stop credit at weight 4",
        _ONLINE + ("rl.advantage=group_stop", "rl.stop_weight=4.0")),
    "group-end-g16": Variant(
        "group-end with 16 samples per prompt, 4 prompts per round (same samples, half "
        "the prompt passes, a better group baseline)",
        _ONLINE + ("rl.advantage=group", "generate.samples_per_prompt=16",
                   "rl.prompts_per_iteration=4", "generate.batch_size=4")),
    "group-end-lr2e-3": Variant(
        "group-end at lr 2e-3",
        _ONLINE + ("rl.advantage=group", "rl.max_lr=2e-3", "rl.min_lr=2e-4")),
    "sft2-group-end": Variant(
        "group-end from an SFT of 2 epochs", _ONLINE + ("rl.advantage=group", "sft.epochs=2")),
    # Toward the best-of-N frontier: the KL summed per summary (the budget's unit). The
    # objectives whose optimum is best-of-N sampling (BOND, RAFT, best-of-N stop and hazard
    # distillation, on-policy distillation of a stop teacher) lost and were removed after
    # 24b5816; their rows are in docs/results.md ("Best-of-N: the yardstick").
    "demo-summary-kl": Variant(
        "the demo's recipe (step-stop-end-b0.1) with both terms summed per summary and "
        "beta 1 on the KL per summary",
        _ONLINE + ("rl.advantage=group_stop", "rl.stop_weight=1.0", "rl.baseline=step",
                   "rl.loss_agg=summary", "rl.kl_control=fixed", "rl.beta=1.0")),
    "demo-summary-kl-b0.1": Variant(
        "demo-summary-kl with beta 0.1 on the KL per summary",
        _ONLINE + ("rl.advantage=group_stop", "rl.stop_weight=1.0", "rl.baseline=step",
                   "rl.loss_agg=summary", "rl.kl_control=fixed", "rl.beta=0.1")),

}


def posttrain(stage: str, config: str, out_dir: Path, overrides, log: Path) -> float:
    """Run one stage in its own process (its memory is its own); returns its wall time."""
    cmd = [sys.executable, "-m", "posttrain", stage, "--config", config,
           f"out_dir={out_dir}", *overrides]
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                              env={**os.environ, "TQDM_MININTERVAL": "30"})
    if done.returncode != 0:
        raise SystemExit(f"{stage} failed in {out_dir} (exit {done.returncode}); see {log}")
    return time.perf_counter() - t0


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


def _samples(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "eval" / "samples.jsonl").read_text().splitlines() if x]


def sft_run(args, out: Path, name: str, variant: Variant, seed: int) -> tuple[Path, dict]:
    """The seed's SFT (its own for a variant with sft.* keys), evaluated once; its figures."""
    own = [o for o in variant.overrides if o.startswith("sft.")]
    run = out / (f"sft-s{seed}" + (f"-{name}" if own else ""))
    run.mkdir(parents=True, exist_ok=True)
    common = [f"seed={seed}", *own, *args.overrides]
    took = {}
    if not (run / "sft" / "summary.json").is_file():
        took["sft_seconds"] = posttrain("sft", args.config, run, common, run / "log.txt")
    if not (run / "eval" / "report.json").is_file():
        posttrain("eval", args.config, run, common + ["eval.models=[sft]", *args.judge],
                  run / "log.txt")
    info = run / "sft_info.json"
    if not info.is_file():
        s = _read(run / "sft" / "summary.json")
        info.write_text(json.dumps({"eval_loss": s["eval_loss_after"],
                                    "sft_seconds": took.get("sft_seconds",
                                                            s.get("train_seconds"))}))
    return run, _read(info)


def rl_run(args, out: Path, name: str, variant: Variant, seed: int, sft: Path) -> dict:
    """Train the variant's RL on the seed's SFT adapter, judge it, compare it with SFT."""
    from posttrain.evaluate.stats import bootstrap_ratio
    from posttrain.evaluate.frontier import best_of_n_table, frontier_match

    run = out / f"{name}-s{seed}"
    run.mkdir(parents=True, exist_ok=True)
    if not (run / "sft").exists():
        (run / "sft").symlink_to((sft / "sft").resolve(), target_is_directory=True)
    common = [f"seed={seed}", *variant.overrides, *args.overrides]  # yours win
    log = run / "log.txt"
    seconds = 0.0
    if variant.offline:
        seconds += posttrain("generate", args.config, run, common, log)
    seconds += posttrain("rl", args.config, run, common, log)
    posttrain("eval", args.config, run, common + ["eval.models=[rl]", *args.judge], log)
    s_rep, r_rep = _read(sft / "eval" / "report.json"), _read(run / "eval" / "report.json")
    s, r = s_rep["models"]["sft"], r_rep["models"]["rl"]
    a = [x["length_chars"] for x in _samples(sft)]
    b = [x["length_chars"] for x in _samples(run)]
    frontier = best_of_n_table(_samples(sft), s["length_chars"]["var"])
    ratio = s["length_chars"]["var"] / max(r["length_chars"]["var"], 1e-9)
    match = frontier_match(frontier, ratio)
    summary = _read(run / "rl" / "summary.json")
    tokens = summary.get("sampled_tokens")
    if variant.offline:
        st = _read(run / "generate" / "stats.json")
        tokens = round(st["count"] * st["length_tokens"]["mean"])
    return {"variant": name, "seed": seed, "n": [s["n"], r["n"]],
            "sft_mean": s["length_chars"]["mean"], "sft_var": s["length_chars"]["var"],
            "rl_mean": r["length_chars"]["mean"], "rl_var": r["length_chars"]["var"],
            "variance_ratio": ratio,
            "variance_ratio_ci95": list(bootstrap_ratio(a, b, 2000, seed)),
            "mean_change": r["length_chars"]["mean"] / s["length_chars"]["mean"] - 1,
            "sft_abrupt": s["abrupt_rate"], "rl_abrupt": r["abrupt_rate"],
            "sft_rougeL": s["rougeL"], "rl_rougeL": r["rougeL"], "kl": r.get("kl_k3"),
            "kl_summary": r.get("kl_k3_summary"), "kl_summary_ci95": r.get("kl_k3_summary_ci95"),
            "frontier_n": match["n"], "frontier_kl": match["kl"],
            "beyond_frontier": match["beyond"],
            "sft_frontier": [[x["n"], x["kl_bound"], x["ratio"]] for x in frontier],
            "rl_seconds": seconds, "sampled_tokens": tokens}


def table(results: list[dict], sft_info: dict) -> str:
    """One row per variant: figures over its seeds (mean, and min-max for the ratio), with
    the KL per summary and the SFT best-of-N the ratio matches (its KL bound)."""
    head = ("| variant | seeds | SFT/RL variance ratio: mean (min-max) | RL mean vs SFT | "
            "abrupt SFT -> RL | ROUGE-L SFT -> RL | KL / summary | matches SFT best-of-N "
            "(KL bound) | RL wall (s) | sampled tokens | SFT loss |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    by: dict = {}
    for r in results:
        by.setdefault(r["variant"], []).append(r)
    f = statistics.fmean
    for name, rows in by.items():
        ratios = [r["variance_ratio"] for r in rows]
        loss = [sft_info[(name, r["seed"])]["eval_loss"] for r in rows]
        lines.append(
            f"| {name} | {','.join(str(r['seed']) for r in rows)} | {f(ratios):.2f} "
            f"({min(ratios):.2f}-{max(ratios):.2f}) "
            f"| {100 * f(r['mean_change'] for r in rows):+.1f}% "
            f"| {f(r['sft_abrupt'] for r in rows):.2f} -> {f(r['rl_abrupt'] for r in rows):.2f} "
            f"| {f(r['sft_rougeL'] for r in rows):.1f} -> {f(r['rl_rougeL'] for r in rows):.1f} "
            f"| {f(r.get('kl_summary') or 0.0 for r in rows):.2f} "
            f"| {f(r.get('frontier_n', 1.0) for r in rows):.1f} "
            f"({f(r.get('frontier_kl', 0.0) for r in rows):.2f}) "
            f"| {f(r['rl_seconds'] for r in rows):.0f} "
            f"| {f(r['sampled_tokens'] or 0 for r in rows):.0f} | {f(loss):.3f} |"
        )
    lines += ["", "| variant | seed | SFT mean / var | RL mean / var | ratio (95% CI) | "
              "abrupt SFT -> RL | ROUGE-L SFT -> RL | KL / token | KL / summary (95% CI) | "
              "matches SFT best-of-N (KL bound) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lo, hi = r["variance_ratio_ci95"]
        klo, khi = r.get("kl_summary_ci95") or (0.0, 0.0)
        beyond = " or beyond" if r.get("beyond_frontier") else ""
        lines.append(f"| {r['variant']} | {r['seed']} | {r['sft_mean']:.1f} / {r['sft_var']:.0f} "
                     f"| {r['rl_mean']:.1f} / {r['rl_var']:.0f} | {r['variance_ratio']:.2f} "
                     f"({lo:.2f}-{hi:.2f}) | {r['sft_abrupt']:.2f} -> {r['rl_abrupt']:.2f} | "
                     f"{r['sft_rougeL']:.1f} -> {r['rl_rougeL']:.1f} | {r['kl'] or 0.0:.3f} | "
                     f"{r.get('kl_summary') or 0.0:.2f} ({klo:.2f}-{khi:.2f}) | "
                     f"{r.get('frontier_n', 1.0):.1f}{beyond} ({r.get('frontier_kl', 0.0):.2f}) |")
    frontiers = {r["seed"]: r["sft_frontier"] for r in results if r.get("sft_frontier")}
    if frontiers:
        lines += ["", "The SFT's best-of-N on the bench's prompts (variance ratio; KL bound per "
                  "summary in brackets):", "", "| seed | " + " | ".join(
                      f"N={n}" for n, _, _ in next(iter(frontiers.values()))) + " |",
                  "|---|" + "---|" * len(next(iter(frontiers.values())))]
        for seed, rows in frontiers.items():
            lines.append(f"| {seed} | " + " | ".join(f"{q:.2f} ({kl:.2f})" for _, kl, q in rows)
                         + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="demo")
    ap.add_argument("--variants", default="demo-stop,group-end,group-stop-end",
                    help=f"comma-separated, of: {', '.join(VARIANTS)}")
    ap.add_argument("--seeds", default="42,1,2")
    ap.add_argument("--out", default="runs/recipes")
    ap.add_argument("--eval-prompts", type=int, default=48)
    ap.add_argument("--eval-samples", type=int, default=8,
                    help="samples per prompt: the SFT's best-of-N frontier reaches N = this")
    ap.add_argument("--report", action="store_true",
                    help="only tabulate the finished results of these variants and seeds")
    ap.add_argument("overrides", nargs="*", help="key=value for every run (e.g. data paths); "
                    "they win over a variant's own")
    args = ap.parse_args()
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    args.judge = ["eval.prompts_split=train", f"eval.num_prompts={args.eval_prompts}",
                  f"eval.samples_per_prompt={args.eval_samples}"]
    out = Path(args.out)
    (out / "results").mkdir(parents=True, exist_ok=True)
    results, sft_info = [], {}
    for seed in seeds:               # seed-major: every variant has a result early
        for name in names:
            variant = VARIANTS[name]
            done = out / "results" / f"{name}-s{seed}.json"
            if args.report and not done.is_file():
                continue
            sft, info = sft_run(args, out, name, variant, seed)
            sft_info[(name, seed)] = info
            if done.is_file():
                print(f"{name} seed {seed}: done earlier ({done})")
            else:
                print(f"{name} seed {seed}: {variant.about}", flush=True)
                r = rl_run(args, out, name, variant, seed, sft)
                tmp = done.with_suffix(".tmp")
                tmp.write_text(json.dumps(r, indent=1))
                tmp.replace(done)
            r = _read(done)
            results.append(r)
            print(f"  ratio {r['variance_ratio']:.2f}, mean {100 * r['mean_change']:+.1f}%, "
                  f"abrupt {r['sft_abrupt']:.2f} -> {r['rl_abrupt']:.2f}, "
                  f"KL {r['kl'] or 0:.3f}", flush=True)
    results.sort(key=lambda r: (names.index(r["variant"]), seeds.index(r["seed"])))
    text = table(results, sft_info)
    (out / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

"""The same online RL work done by posttrain and by TRL's GRPOTrainer, timed side by side and
judged by one shared evaluator.

    python bench/peers.py [--config demo] [--seeds 1,2,3] [--rounds N] [--only posttrain,trl]
                          [--trl-bf16 on|off|sweep] [--sweep-rounds 1] [--out FILE]
                          [key=value ...]

Needs TRL, the optional `bench` extra: `pip install --no-deps "trl==1.16.*"` (trl alone;
torch and transformers stay as installed, see pyproject.toml). Starts from the
SFT adapter of the config's run directory (`<out_dir>/sft/adapter`: run `posttrain sft`
first); key=value overrides apply to both (e.g. out_dir=..., model.name=...).

Per seed, each in its own process (so its peak memory, ru_maxrss, is its own), under
`<out_dir>/bench/peers/seed<S>/`:
  posttrain   `posttrain rl` as the config runs it (rl.mode=online), seed=S, through the rl
              stage's own entry point; its per-round sampling time and tokens come from
              its metrics.jsonl
  trl         GRPOTrainer on the same starting policy (base + SFT adapter merged, a fresh
              LoRA of the same shape), the same rounds' prompts in the same order, the same
              reward (posttrain's, with its ending rule), samples per prompt, rounds, optimizer
              steps per round, lr schedule, new tokens and temperature (bench/peers_trl.py
              says how each is matched and what is not)
  eval        one evaluator for SFT and both RL policies: posttrain's evaluation sampler on
              the config's held-out prompts (eval.num_prompts x eval.samples_per_prompt), the
              same seeds for every policy; per policy the mean length, variance, the SFT /
              policy variance ratio with its bootstrap interval, abrupt-ending rate, ROUGE-L
              and the KL to SFT on its own samples; beside the variance ratio, the same
              ratio of var / mean^2 (the relative ratio: the spread cut with the change of
              mean taken out; added to an evaluation stored without it, from its
              samples.jsonl)

One round is one generation plus its optimizer steps, timed from the start of its sampling to
the end of its last step. Sampling new tokens/s: the round's sampled completion tokens (EOS
included when sampled) over its sampling seconds; training tokens/s: prompt + completion
tokens of every sample, counted per sample, times the passes over the round (rl.ppo_epochs),
over the round's other seconds (scoring, reference and old-policy forwards, the optimizer
steps). The median round is over every round, none skipped (the first included).

`--trl-bf16 sweep` (the default) first runs TRL for `--sweep-rounds` rounds with bf16 on and
off (first seed) and uses the faster for the real runs. Every TRL setting that differs from
its defaults is printed at the start and stored in the JSON. Each finished part (a folder with
its result.json) is kept and reused when the script runs again (`--only posttrain` still
evaluates against the TRL runs already finished); move a folder away to measure it again. An
unfinished run's folder is moved aside (`<name>.unfinished-<n>`, never deleted) and run
afresh, so every round is timed. Writes everything to --out (default:
<out_dir>/bench/peers.json).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:   # this checkout's posttrain, wherever it is installed from
    sys.path.insert(1, str(ROOT))

from common import machine  # noqa: E402  (bench/, first on sys.path when run as a script)
from peers_trl import (PIP, child, config_text, fingerprint, load_cfg,  # noqa: E402
                       non_default, relative_ratios, step_shape, trl_settings)

KINDS = ("posttrain", "trl")
FIGURES = ("median_round_s", "sampling_new_tokens_per_s", "training_tokens_per_s", "peak_mib")


def require_trl() -> str:
    try:
        import trl
    except ImportError:
        raise SystemExit(f"bench/peers.py needs TRL (the optional `bench` extra): {PIP}\n"
                         "(installs trl alone; torch and transformers stay as installed)"
                         ) from None
    if not trl.__version__.startswith("1.16."):
        print(f"peers: warning: trl {trl.__version__} installed; this bench reads trl 1.16 "
              f"({PIP})", flush=True)
    return trl.__version__


# ---------------------------------------------------------------- the parent

def _diff(stored: str, expected: str, bare: str) -> list[str]:
    """The keys whose values differ between a stored part's config and the expected one,
    seed aside. A key the stored config lacks (an option added since it ran) differs only
    if the expected value is not the option's default (`bare`: the schema's defaults), on
    the rule every new option here follows: its default is what the code did before it (a
    new fast path that is on by default would have to be compared by hand)."""
    from omegaconf import OmegaConf

    def flat(node, prefix=""):
        if isinstance(node, dict):
            return {k2: v2 for k, v in node.items() for k2, v2 in flat(v, f"{prefix}{k}.").items()}
        return {prefix[:-1]: node}
    x, y, z = (flat(OmegaConf.to_container(OmegaConf.create(t))) for t in (stored, expected, bare))
    return [k for k in sorted(set(x) | set(y)) if k != "seed" and x.get(k) != y.get(k)
            and not (k not in x and y.get(k) == z.get(k))]


class Runner:
    """Runs the parts in their folders, each in its own process, reusing finished ones."""

    def __init__(self, args, cfg):
        self.args, self.cfg = args, cfg
        self.sft = (cfg.run_dir / "sft").resolve()
        self.bench = cfg.run_dir / "bench" / "peers"

    def part(self, kind: str, folder: Path, seed: int, extra=(), overrides=()) -> dict:
        done = folder / "result.json"
        if done.is_file():
            result = json.loads(done.read_text())
            changed = _diff(result["config"], self.expected(seed, overrides),
                            config_text(load_cfg("defaults", ())))
            if changed:
                raise SystemExit(f"{done} was made with a different config ({', '.join(changed)})"
                                 f"; use another out_dir, or move {folder} away")
            print(f"  {kind}: done earlier ({done})", flush=True)
            return result
        self.set_aside(folder)
        (folder / "sft").parent.mkdir(parents=True, exist_ok=True)
        (folder / "sft").symlink_to(self.sft, target_is_directory=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--seed",
               str(seed), "--dir", str(folder), "--config", self.args.config, *extra,
               *self.args.overrides, *overrides]
        log = folder / "log.txt"
        print(f"  {kind}: running in {folder} (log: {log})", flush=True)
        t0 = time.perf_counter()
        with open(log, "a") as f:
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            env = {**os.environ, "TQDM_MININTERVAL": "30", "TOKENIZERS_PARALLELISM": "false"}
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
        if rc != 0 or not done.is_file():
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
            raise SystemExit(f"peers: {kind} seed {seed} failed (exit {rc}); see {log}:\n{tail}")
        print(f"  {kind}: finished in {time.perf_counter() - t0:.0f} s", flush=True)
        return json.loads(done.read_text())

    def expected(self, seed: int, overrides=()) -> str:
        return config_text(load_cfg(self.args.config, tuple(self.args.overrides)
                                    + tuple(overrides) + (f"seed={seed}",)))

    @staticmethod
    def set_aside(folder: Path, why: str = "unfinished") -> None:
        """A folder moved aside, never deleted: an unfinished run's (a resumed run would time
        only the rounds after its checkpoint), or a stale evaluation."""
        if not folder.exists() and not folder.is_symlink():
            return
        k = 1
        while folder.with_name(f"{folder.name}.{why}-{k}").exists():
            k += 1
        folder.rename(folder.with_name(f"{folder.name}.{why}-{k}"))
        print(f"  moved the {why} {folder} aside (.{why}-{k})", flush=True)


def speed(result: dict) -> dict:
    """A run's figures: median round, sampling and training tokens/s, peak memory."""
    rows = result["rounds"]
    return {"median_round_s": statistics.median(r["seconds"] for r in rows),
            "sampling_new_tokens_per_s": sum(r["new_tokens"] for r in rows)
            / max(sum(r["sample_seconds"] for r in rows), 1e-9),
            "training_tokens_per_s": sum(r["train_tokens"] for r in rows)
            / max(sum(r["train_seconds"] for r in rows), 1e-9),
            "peak_mib": result["peak_mib"], "rounds": len(rows),
            "round_seconds": [r["seconds"] for r in rows]}


def sweep(runner: Runner, seed: int) -> tuple[bool, dict]:
    """TRL for --sweep-rounds rounds with bf16 on and off; the faster, and both figures."""
    times = {}
    for flag in ("on", "off"):
        print(f"sweep: TRL bf16 {flag}, {runner.args.sweep_rounds} round(s), seed {seed}",
              flush=True)
        r = runner.part("trl", runner.bench / "sweep" / f"trl-bf16-{flag}", seed,
                        ("--bf16", flag), (f"rl.iterations={runner.args.sweep_rounds}",))
        times[flag] = speed(r)["median_round_s"]
        print(f"sweep: bf16 {flag}: median round {times[flag]:.2f} s", flush=True)
    return times["on"] <= times["off"], times


def run_seed(runner: Runner, seed: int, only: list, bf16: bool | None) -> dict:
    """posttrain, TRL and the shared evaluation of one seed."""
    base, out, policies = runner.bench / f"seed{seed}", {}, {}
    print(f"seed {seed}:", flush=True)
    folders = {"posttrain": base / "posttrain"}
    if bf16 is not None:
        folders["trl"] = base / f"trl-bf16-{'on' if bf16 else 'off'}"
    for kind, folder in folders.items():
        extra = ("--bf16", "on" if bf16 else "off") if kind == "trl" else ()
        if kind in only or (folder / "result.json").is_file():
            out[kind] = runner.part(kind, folder, seed, extra)
            policies[kind] = out[kind]["adapter"]
    if policies:
        folder = base / f"eval-{'+'.join(policies)}"
        done = folder / "result.json"
        if done.is_file() and json.loads(done.read_text()).get("adapters") != \
                {n: fingerprint(p) for n, p in policies.items()}:
            print("  eval: an adapter has changed since it ran: evaluating again", flush=True)
            runner.set_aside(folder, "stale")
        out["eval"] = runner.part("eval", folder, seed, [a for n, p in policies.items()
                                                         for a in ("--policy", f"{n}={p}")])
        with_relative(out["eval"], folder, runner.cfg.eval.bootstrap)
    return out


def with_relative(result: dict, folder: Path, n_boot: int) -> None:
    """An evaluation stored before the relative ratio existed gets it from its samples."""
    from posttrain import seeds
    names = [n for n in result["policies"] if n != "sft"]
    if all("relative_ratio" in result["policies"][n] for n in names):
        return
    rows = [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()
            if line.strip()]
    for name, figs in relative_ratios(rows, names, n_boot,
                                      seeds.bootstrap(result["seed"])).items():
        result["policies"][name].update(figs)


# ---------------------------------------------------------------- tables and the summary

def _row(label: str, values: list, fmt: str) -> str:
    cells = [("-" if v is None else format(v, fmt)) for v in values]
    return f"{label:28}" + "".join(f"{c:>22}" for c in cells)


def _ratio(p: dict, key: str = "variance_ratio"):
    """A ratio, with its 95% bootstrap interval when there is one."""
    if p.get(key) is None:
        return None
    ci = p.get(f"{key}_ci95")
    return f"{p[key]:.2f}" + (f" ({ci[0]:.3g}-{ci[1]:.3g})" if ci else "")


def print_table(title: str, figs: dict, evals: dict | None) -> None:
    """One table: the runs' speed figures, and the evaluation's figures per policy."""
    kinds = [k for k in KINDS if k in figs]
    print(f"\n{title}\n" + _row("", kinds, "s"))
    labels = ("round wall, median (s)", "sampling new tokens/s", "training tokens/s",
              "peak memory (MiB)")
    for key, label, fmt in zip(FIGURES, labels, (".2f", ".1f", ".1f", ".0f")):
        print(_row(label, [figs[k][key] for k in kinds], fmt))
    if "speedup" in figs:
        print(_row("speed-up (TRL / posttrain)", [figs["speedup"]], ".2f") + "  (median round)")
    if not evals:
        return
    names = [n for n in ("sft", *KINDS) if n in evals]
    print(_row("shared evaluation", names, "s"))
    for key, label, fmt in (("n", "samples", ".0f"), ("mean", "mean length (chars)", ".1f"),
                            ("var", "variance (chars^2)", ".0f"),
                            ("abrupt_rate", "abrupt-ending rate", ".3f"),
                            ("rougeL", "ROUGE-L", ".2f"), ("kl_k3", "KL k3 to SFT", ".4f")):
        print(_row(label, [evals[n].get(key) for n in names], fmt))
    print(_row("variance ratio SFT/policy", [_ratio(evals[n]) for n in names], "s"))
    print(_row("  of var/mean^2 (relative)", [_ratio(evals[n], "relative_ratio")
                                             for n in names], "s"))


def _mean(values: list):
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def summarize(per_seed: dict) -> dict:
    """The mean over seeds of every figure; the speed-up is TRL's median round over
    posttrain's, per seed and its mean."""
    runs = list(per_seed.values())
    figs = {k: {f: _mean([r["speed"][k][f] for r in runs if k in r["speed"]]) for f in FIGURES}
            for k in KINDS if any(k in r["speed"] for r in runs)}
    ups = [r["speed"]["speedup"] for r in runs if "speedup" in r["speed"]]
    if ups:
        figs["speedup"] = statistics.fmean(ups)
    evals = {}
    for r in runs:
        for name, p in (r.get("eval") or {}).items():
            evals.setdefault(name, []).append(p)
    evals = {n: {k: _mean([p.get(k) for p in ps]) for k in ps[0] if not k.endswith("_ci95")}
             for n, ps in evals.items()}
    both = all("speedup" in r["speed"] and {"posttrain", "trl"} <= set(r.get("eval") or {})
               for r in runs)
    return {"speed": figs, "eval": evals, "seeds": len(runs), "every_seed_has_both": both}


def goals(summary: dict) -> dict:
    """The issue's conditions, on the means over seeds (when every seed has both)."""
    ev, s = summary["eval"], summary["speed"]
    if not summary["every_seed_has_both"]:
        return {}
    p, t = ev["posttrain"], ev["trl"]
    return {"round >= 8x faster": s["speedup"] >= 8,
            "variance ratio >= TRL's": p["variance_ratio"] >= t["variance_ratio"],
            "abrupt <= TRL's + 0.05": p["abrupt_rate"] <= t["abrupt_rate"] + 0.05,
            "ROUGE-L >= TRL's - 1": p["rougeL"] >= t["rougeL"] - 1}


# ---------------------------------------------------------------- main

def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="demo", help="bundled name, YAML file, or `defaults`")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--rounds", type=int, help="rl.iterations for both (default: the config's)")
    ap.add_argument("--only", default="posttrain,trl", help="which to train: posttrain,trl")
    ap.add_argument("--trl-bf16", choices=("on", "off", "sweep"), default="sweep")
    ap.add_argument("--sweep-rounds", type=int, default=1)
    ap.add_argument("--out", help="the JSON (default: <out_dir>/bench/peers.json)")
    for flag in ("--child", "--seed", "--dir", "--bf16"):   # a child process's own
        ap.add_argument(flag, help=argparse.SUPPRESS)
    ap.add_argument("--policy", action="append", default=[], help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", metavar="key=value",
                    help="posttrain config overrides for every part (e.g. out_dir=...)")
    return ap.parse_intermixed_args(argv)


def load(args):
    """The resolved config, checked for what this bench compares."""
    from posttrain.config import ConfigError
    try:
        cfg = load_cfg(args.config, tuple(args.overrides))
    except ConfigError as e:
        raise SystemExit(f"peers: {e}") from None
    if cfg.rl.mode != "online":
        raise SystemExit(f"peers: rl.mode={cfg.rl.mode!r}; this bench compares online RL "
                         "(rl.mode=online)")
    if cfg.data.length_cue:
        raise SystemExit("peers: data.length_cue is set; this bench compares plain prompts")
    adapter = cfg.run_dir / "sft" / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        extra = " ".join(args.overrides)
        raise SystemExit(f"peers: no SFT adapter in {adapter}: run `posttrain sft --config "
                         f"{args.config}{' ' + extra if extra else ''}` first")
    step_shape(cfg)   # TRL can take posttrain's steps
    return cfg


def settings_for(cfg, bf16) -> dict:
    from posttrain.model.load import resolve_device
    return non_default(trl_settings(cfg, bf16, resolve_device(cfg.model).type == "cpu"))


def seed_record(out: dict) -> dict:
    rec = {"speed": {k: speed(out[k]) for k in KINDS if k in out},
           "runs": {k: out[k] for k in KINDS if k in out}}
    if "posttrain" in out and "trl" in out:
        sp = rec["speed"]
        sp["speedup"] = sp["trl"]["median_round_s"] / sp["posttrain"]["median_round_s"]
        rec["prompts_match"] = [r["prompts_hash"] for r in out["posttrain"]["rounds"]] == \
            [r["prompts_hash"] for r in out["trl"]["rounds"]]
    if "eval" in out:
        rec["eval"] = out["eval"]["policies"]
        rec["eval_prompts"] = [out["eval"]["prompts"], out["eval"]["samples_per_prompt"]]
    return rec


def trl_bf16(runner: Runner, only: list, seed: int, report: dict) -> bool | None:
    """TRL's bf16 setting: given, or swept (the sweep's results when TRL is not trained
    now); None when TRL is not trained and no sweep has finished."""
    args, cfg = runner.args, runner.cfg
    bf16 = {"on": True, "off": False}.get(args.trl_bf16)
    if "trl" not in only:
        swept = [runner.bench / "sweep" / f"trl-bf16-{f}" / "result.json" for f in ("on", "off")]
        if bf16 is not None or not all(f.is_file() for f in swept):
            return bf16
    else:
        shown = settings_for(cfg, "sweep" if bf16 is None else bf16)
        print("peers: TRL settings that differ from its defaults (and seed=S per run):\n"
              + "".join(f"  {k}={v!r}\n" for k, v in shown.items()), end="", flush=True)
    if bf16 is None:
        bf16, report["trl_bf16_sweep"] = sweep(runner, seed)
        print(f"peers: TRL runs with bf16={bf16}", flush=True)
    if "trl" in only:
        report["trl_settings"] = settings_for(cfg, bf16)
    return bf16


def main(argv=None) -> None:
    args = parse(argv)
    if args.child:
        return child(args)
    only = [k for k in args.only.split(",") if k]
    if set(only) - set(KINDS) or not only:
        raise SystemExit(f"peers: --only {args.only!r}: name posttrain, trl or both")
    if "trl" in only:
        require_trl()
    if args.rounds:
        args.overrides.append(f"rl.iterations={args.rounds}")
    cfg = load(args)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    report = {"config": args.config, "overrides": args.overrides, "seeds": seeds,
              "rounds": cfg.rl.iterations, "machine": machine("trl"), "per_seed": {}}
    m = report["machine"]
    print(f"peers: {m['cpu']} (amx_bf16: {m['amx_bf16']}), {m['cores']} cores; "
          + ", ".join(f"{k} {v}" for k, v in m["versions"].items()), flush=True)
    runner = Runner(args, cfg)
    bf16 = trl_bf16(runner, only, seeds[0], report)
    out = Path(args.out) if args.out else cfg.run_dir / "bench" / "peers.json"
    from posttrain.io import atomic_write_json
    for seed in seeds:
        rec = seed_record(run_seed(runner, seed, only, bf16))
        report["per_seed"][str(seed)] = rec
        print_table(f"seed {seed}: {cfg.rl.iterations} round(s) x {cfg.rl.prompts_per_iteration}"
                    f" prompts x {cfg.generate.samples_per_prompt} samples, up to "
                    f"{cfg.generate.max_new_tokens} new tokens; prompts the same in every "
                    f"round: {rec.get('prompts_match', '-')}", rec["speed"], rec.get("eval"))
        atomic_write_json(out, report)
    report["summary"] = summarize(report["per_seed"])
    report["goals"] = goals(report["summary"])
    print_table(f"mean over seeds {','.join(map(str, seeds))}", report["summary"]["speed"],
                report["summary"]["eval"])
    for goal, met in report["goals"].items():
        print(f"  {goal}: {'met' if met else 'NOT met'}")
    atomic_write_json(out, report)
    print(f"wrote {out}", flush=True)


if __name__ == "__main__":
    main()

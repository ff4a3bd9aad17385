"""Where one RL or SFT optimizer step spends its time: phases (forward, backward, optimizer)
and operator kinds (matmuls, attention, casts, elementwise, ...), from torch.profiler.

    python bench/profile_step.py [--config demo] [--stage rl|sft] [--steps 2] [--warmup 1]
                                 [--case rl/ours] [--top 15] [key=value ...]

The step is bench/throughput.py's (the same records, adapter and settings; `--case` takes
its case names, e.g. rl/bf16-weights). Times are summed over the profiled steps and
divided by their number. A phase is the wall time inside it; an operator kind is the self
time of its operators (time inside an operator, not in the operators it calls), so the
kinds add up to about the step's time. Writes the table as JSON to
<out_dir>/bench/profile-<stage>.json.
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile, record_function

import throughput as T  # bench/throughput.py, beside this file
from common import machine

KINDS = (  # (kind, substrings of aten operator names), first match wins
    ("matmul", ("mm", "addmm", "bmm", "matmul", "linear", "mkldnn")),
    ("attention", ("scaled_dot_product", "_flash_attention", "softmax")),
    ("casts and copies", ("copy_", "_to_copy", "clone", "contiguous", "cat", "index",
                          "repeat", "fill_", "zero_", "empty", "stack", "scatter")),
    ("optimizer", ("_foreach", "adam", "lerp", "addcdiv", "addcmul", "sqrt", "norm")),
    ("elementwise", ("add", "mul", "sub", "div", "silu", "neg", "exp", "log", "pow",
                     "rsqrt", "mean", "sum", "where", "clamp", "bernoulli", "dropout",
                     "threshold", "sigmoid", "gather", "max", "min", "abs", "masked")),
)


def kind_of(name: str) -> str:
    op = name.split("::")[-1].lower()
    for kind, keys in KINDS:
        if any(k in op for k in keys):
            return kind
    return "other"


def instrument() -> None:
    """Mark the phases: autograd's backward and the optimizer step (wrapped before the step
    is built, so that it calls the wrapped ones)."""
    import posttrain.train.loop as loop
    original_backward = torch.autograd.backward

    def backward(*a, **k):
        with record_function("phase: backward"):
            return original_backward(*a, **k)

    torch.autograd.backward = backward
    for mod in (loop, T):
        if hasattr(mod, "optimizer_step"):
            inner = mod.optimizer_step

            def opt(*a, _inner=inner, **k):
                with record_function("phase: optimizer"):
                    return _inner(*a, **k)
            mod.optimizer_step = opt


def build(args, cfg, work):
    if args.stage == "sft":
        return T.sft_step(cfg, args.warmup + args.steps)
    if not (work / "records.json").is_file():
        T.prepare(cfg, work, (args.warmup + args.steps) * cfg.rl.batch_size * cfg.rl.grad_accum)
    return T.rl_step(cfg, work, args.case, args.warmup + args.steps)


def summarize(prof, wall: float, n: int, top: int) -> dict:
    phases, kinds, ops = defaultdict(float), defaultdict(float), defaultdict(float)
    for e in prof.key_averages():
        if e.key.startswith("phase: "):
            phases[e.key[7:]] += e.cpu_time_total / 1e6 / n
        elif not e.key.startswith("ProfilerStep"):
            kinds[kind_of(e.key)] += e.self_cpu_time_total / 1e6 / n
            ops[e.key] += e.self_cpu_time_total / 1e6 / n
    phases["forward and the rest"] = wall - sum(phases.values())
    return {"step_seconds": wall, "phases": dict(phases),
            "kinds": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
            "top_ops": dict(sorted(ops.items(), key=lambda kv: -kv[1])[:top])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="demo")
    ap.add_argument("--stage", choices=("rl", "sft"), default="rl")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--case", default=None, help="a bench/throughput.py case (default: ours)")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    args.case = args.case or f"{args.stage}/ours"
    if args.case not in T.CASES or not args.case.startswith(args.stage + "/"):
        raise SystemExit(f"--case {args.case}: choose a {args.stage}/* case of {list(T.CASES)}")
    from posttrain.config import load_config
    from posttrain.io import atomic_write_json
    cfg = load_config(args.config, tuple(args.overrides) + T.CASES[args.case])
    work = cfg.run_dir / "bench"
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    instrument()
    step, device, dtype = build(args, cfg, work)
    for k in range(args.warmup):
        step(k)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        for k in range(args.warmup, args.warmup + args.steps):
            step(k)
        wall = (time.perf_counter() - t) / args.steps
    out = summarize(prof, wall, args.steps, args.top)
    out.update(case=args.case, dtype=str(dtype), machine=machine(), overrides=args.overrides)
    print(f"{args.case} on {out['cpu']}, {dtype}: {wall:.2f} s per step (profiled)")
    for title in ("phases", "kinds", "top_ops"):
        print(f"\n{title}:")
        for k, v in out[title].items():
            print(f"  {k:44} {v:7.2f} s  {100 * v / wall:5.1f}%")
    atomic_write_json(work / f"profile-{args.stage}.json", out)


if __name__ == "__main__":
    main()

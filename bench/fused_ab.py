"""fast.fused_projections against peft's per-projection forward, interleaved in one process.

    python bench/fused_ab.py [--config demo] [--steps 8] [key=value ...]

Separate processes a few minutes apart (bench/throughput.py's cases) differ by more than
this switch can buy on a noisy 2-core machine, so this loads the RL policy once (fused) and
times every offline RL step twice, once each way (the modules' class switched between the
fused subclass and peft's Linear; the same weights, the same samples), alternating which
goes first. It prints each step's pair and the median of the step-by-step ratios. The
steps are bench/throughput.py's rl steps (run its `prepare`, e.g. any rl case, first for
the same out_dir: it draws the samples).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="demo")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    import throughput
    from peft.tuners.lora.layer import Linear

    from posttrain.config import load_config
    from posttrain.model.fused import _fused_class

    cfg = load_config(args.config, tuple(args.overrides) + ("fast.fused_projections=true",))
    work = cfg.run_dir / "bench"
    if not (work / "records.json").is_file():
        raise SystemExit(f"{work / 'records.json'}: no RL samples; run e.g. "
                         f"`python bench/throughput.py --cases rl/ours` with this out_dir")
    step, _, _ = throughput.rl_step(cfg, work, "rl/ours", args.steps + 1)
    modules = [m for m in step.model.modules() if hasattr(m, "_posttrain_group")]
    if not modules:
        raise SystemExit("no fused projections (rl.lora_dropout must be 0)")

    def use(fused: bool):
        for m in modules:
            m.__class__ = _fused_class(Linear) if fused else Linear

    print(f"{len(modules)} LoRA projections on {throughput.cpu_name()}; warm-up step",
          flush=True)
    step(0)
    times = {True: [], False: []}
    for k in range(1, args.steps + 1):
        for fused in ((True, False) if k % 2 else (False, True)):
            use(fused)
            t = time.perf_counter()
            step(k)
            times[fused].append(time.perf_counter() - t)
        print(f"step {k}: fused {times[True][-1]:.2f} s, per projection "
              f"{times[False][-1]:.2f} s", flush=True)
    ratio = statistics.median(b / a for a, b in zip(times[True], times[False]))
    print(f"median step: fused {statistics.median(times[True]):.2f} s, per projection "
          f"{statistics.median(times[False]):.2f} s; paired speed-up of fusing {ratio:.3f}x")


if __name__ == "__main__":
    main()

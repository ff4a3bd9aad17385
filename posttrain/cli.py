"""`posttrain <stage> [--config FILE.yaml] [key=value ...]`: load the config, run the stage."""
from __future__ import annotations

import argparse
import importlib
import sys

from posttrain.config import ConfigError, bundled_configs, describe, load_config

# stage -> (module, config sections it reads, one-line help)
STAGES = {
    "sft": ("posttrain.sft", ("model", "lora", "data", "sft"),
            "supervised fine-tuning of a LoRA adapter on prompt/completion rows"),
    "generate": ("posttrain.generate", ("model", "data", "generate"),
                 "sample completions from the SFT policy into a scored dataset for RL"),
    "rl": ("posttrain.rl", ("model", "lora", "data", "generate", "reward", "rl"),
           "PPO-style RL on the generated set against the frozen SFT policy"),
    "eval": ("posttrain.evaluate", ("model", "data", "generate", "reward", "eval"),
             "sample base/SFT/RL on held-out prompts; length spread, ROUGE, KL -> report"),
    "plot": ("posttrain.plot", (), "PNG figures: length distributions and training curves"),
    "view": ("posttrain.view", (), "one self-contained HTML page to read SFT/RL samples side by side"),
    "run": ("posttrain.pipeline", None,
            "the whole pipeline (sft, generate, rl, eval, plot, view) in one run directory, "
            "skipping finished stages; with no --config it runs the demo"),
}

EXAMPLES = """examples:
  posttrain run                                   # the demo, end to end (CPU, embedded model)
  posttrain run --config tldr-smollm2-cpu data.train=../shared/data/tifu/train.jsonl \\
      data.eval=../shared/data/tldr/dev.jsonl
  posttrain sft --config configs/demo.yaml
  posttrain sft --config configs/tldr-smollm2-cpu.yaml data.train=../shared/data/tifu/train.jsonl
  posttrain sft out_dir=runs/try lora.rank=8 sft.max_lr=1e-4
  posttrain generate --config configs/demo.yaml generate.num_samples=256
  posttrain rl --config configs/demo.yaml rl.kl_control=adaptive
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="posttrain", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Post-train a causal LM: SFT, then RL that shapes one property of the "
                    "output. Each stage reads and writes one run directory (out_dir).",
        epilog=EXAMPLES)
    sub = parser.add_subparsers(dest="stage", metavar="STAGE")
    for name, (_, sections, help_) in STAGES.items():
        p = sub.add_parser(
            name, help=help_, description=help_,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            epilog="options (set in the YAML file or as key=value; defaults shown):\n"
                   + describe(sections=sections))
        p.add_argument("--config", metavar="FILE.yaml",
                       help="YAML file whose values override the defaults, or the name of a "
                            "bundled config: " + ", ".join(bundled_configs()))
        p.add_argument("--force", action="store_true",
                       help="redo a stage made with a different config (with `run`: and the "
                            "stages after it) instead of stopping")
        p.add_argument("overrides", nargs="*", metavar="key=value",
                       help="overrides applied after the YAML file, dotted for nested fields "
                            "(e.g. lora.rank=8 sft.max_lr=1e-4)")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.stage is None:
        parser.print_help()
        return 2
    from posttrain.data import DataError
    from posttrain.modeling import ModelError
    from posttrain.sft import TrainingError

    try:
        config = args.config
        if args.stage == "run" and config is None:
            config = "demo"
        cfg = load_config(config, tuple(args.overrides))
        module = importlib.import_module(STAGES[args.stage][0])
        if args.stage == "run":
            module.run(cfg, force=args.force)
        else:
            from posttrain.pipeline import guard_stage
            guard_stage(cfg, args.stage, force=args.force)
            module.run(cfg)
    except (ConfigError, DataError, ModelError, TrainingError) as e:
        print(f"posttrain {args.stage}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"posttrain {args.stage}: interrupted; re-run the same command to resume",
              file=sys.stderr)
        return 130
    return 0

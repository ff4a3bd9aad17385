"""`posttrain <stage> [--config FILE.yaml] [key=value ...]`: load the config, run the stage."""
from __future__ import annotations

import argparse
import os
import sys

from posttrain import __version__
from posttrain.config import (BUNDLED, DEFAULTS, ConfigError, bundled_configs, describe,
                              load_config, to_yaml)

# stage -> (config sections its --help lists, one-line help); pipeline.STAGES runs them
STAGES = {
    "sft": (("model", "lora", "data", "sft"),
            "supervised fine-tuning of a LoRA adapter on prompt/completion rows"),
    "generate": (("model", "data", "generate"),
                 "sample completions from the SFT policy into a scored dataset for RL"),
    "rl": (("model", "lora", "data", "generate", "reward", "rl"),
           "PPO-style RL (offline on the generated set, or online rounds) against the frozen "
           "SFT policy"),
    "eval": (("model", "data", "generate", "reward", "eval"),
             "sample base/SFT/RL on held-out prompts; length spread, ROUGE, KL -> report"),
    "plot": ((), "PNG figures: length distributions and training curves"),
    "view": ((), "one self-contained HTML page to read SFT/RL samples side by side"),
    "run": (None,
            "the whole pipeline (sft, generate, rl, eval, plot, view) in one run directory, "
            "skipping finished stages"),
}
LAUNCH_FILES = ("ddp", "fsdp", "deepspeed-zero2")

EXAMPLES = """examples:
  posttrain run                                   # the demo, end to end (CPU, embedded model)
  posttrain run --config tldr-smollm2-cpu data.train=../shared/data/tldr/train.jsonl \\
      data.eval=../shared/data/tldr/dev.jsonl
  posttrain sft                                   # one stage of the demo
  posttrain sft out_dir=runs/try lora.rank=8 sft.max_lr=1e-4
  posttrain rl --config defaults out_dir=runs/seed  # the seed's offline method (the defaults)
  posttrain rl --print-config rl.kl_control=adaptive
  accelerate launch --config_file "$(posttrain accelerate-config ddp)" -m posttrain run

Without --config every stage uses the demo's config (the bundled `demo`), as `posttrain run`
does; `--config defaults` takes the dataclass defaults, which are the seed's method.
"""

FORCE_HELP = {
    "run": "redo every stage from the first whose config changed (all stages when none "
           "changed), replacing each stage's old outputs only once its new ones are written; "
           "the later stages' old outputs count as stale meanwhile",
}
FORCE_DEFAULT = ("redo this stage even if it finished (with the same or a changed config); its "
                 "old outputs are replaced only once the new ones are written, and the later "
                 "stages' outputs are then marked stale")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="posttrain", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Post-train a causal LM: SFT, then RL that shapes one property of the "
                    "output. Each stage reads and writes one run directory (out_dir).",
        epilog=EXAMPLES)
    parser.add_argument("--version", action="version", version=f"posttrain {__version__}")
    sub = parser.add_subparsers(dest="stage", metavar="STAGE")
    for name, (sections, help_) in STAGES.items():
        p = sub.add_parser(
            name, help=help_, description=help_,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            epilog="options (set in the YAML file or as key=value; defaults shown):\n"
                   + describe(sections=sections))
        p.add_argument("--config", metavar="FILE.yaml", default="demo",
                       help="YAML file whose values override the defaults, or the name of a "
                            "bundled config: " + ", ".join(bundled_configs()) + f", or "
                            f"`{DEFAULTS}` (no file: the dataclass defaults, the seed's "
                            "method). Default: demo")
        p.add_argument("--force", action="store_true", help=FORCE_HELP.get(name, FORCE_DEFAULT))
        p.add_argument("--print-config", action="store_true",
                       help="print the resolved config (defaults, file, overrides) and exit")
        p.add_argument("overrides", nargs="*", metavar="key=value",
                       help="overrides applied after the YAML file, dotted for nested fields "
                            "(e.g. lora.rank=8 sft.max_lr=1e-4); before or after --config")
    p = sub.add_parser("accelerate-config", help="print the path of an installed `accelerate "
                       "launch` config file (" + ", ".join(LAUNCH_FILES) + ")")
    p.add_argument("name", choices=LAUNCH_FILES)
    return parser


def _is_main() -> bool:
    """Under `accelerate launch` / torchrun only rank 0 reports a bad input."""
    return os.environ.get("RANK", "0") == "0"


def main(argv=None) -> int:
    parser = build_parser()
    # key=value overrides may stand before and after --config: argparse hands the later
    # ones back as extras
    args, extra = parser.parse_known_args(argv)
    bad = [x for x in extra if x.startswith("-") or "=" not in x]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if extra:
        args.overrides = list(getattr(args, "overrides", [])) + extra
    if args.stage is None:
        parser.print_help()
        return 2
    if args.stage == "accelerate-config":
        print(BUNDLED / "accelerate" / f"{args.name}.yaml")
        return 0
    from posttrain.data import DataError
    from posttrain.io import InputFileError
    from posttrain.modeling import ModelError
    from posttrain.sft import TrainingError

    try:
        cfg = load_config(None if args.config == DEFAULTS else args.config,
                          tuple(args.overrides))
        if args.print_config:
            print(to_yaml(cfg), end="")
            return 0
        from posttrain import pipeline
        pipeline.check_out_dir(cfg)
        pipeline.check_hub_sources(cfg, args.stage)
        if args.stage == "run":
            pipeline.run(cfg, force=args.force)
        else:
            pipeline.run_stage(cfg, args.stage, force=args.force)
    except (ConfigError, DataError, ModelError, TrainingError, InputFileError) as e:
        if _is_main():
            print(f"posttrain {args.stage}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if _is_main():
            print(f"posttrain {args.stage}: interrupted; re-run the same command to resume",
                  file=sys.stderr)
        return 130
    return 0

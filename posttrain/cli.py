"""`posttrain <stage> [--config FILE.yaml] [key=value ...]`: load the config, run the stage."""
from __future__ import annotations

import argparse
import errno
import os
import shutil
import sys
from contextlib import nullcontext

from posttrain import __version__
from posttrain.config import (BUNDLED, DEFAULTS, ConfigError, bundled_configs, describe,
                              load_config, to_yaml)
from posttrain.io import InputFileError
from posttrain.lock import command_line, out_dir_lock
from posttrain.stages import RUN_HELP, STAGES

LAUNCH_FILES = ("ddp", "fsdp")

EXAMPLES = """examples:
  posttrain run                                   # the demo, end to end (CPU, embedded model)
  posttrain run --config tldr-smollm2-cpu data.train=../shared/data/tldr/train.jsonl \\
      data.eval=../shared/data/tldr/dev.jsonl
  posttrain sft                                   # one stage of the demo
  posttrain sft out_dir=runs/try lora.rank=8 sft.max_lr=1e-4
  posttrain rl --config defaults out_dir=runs/ref  # the reference recipe (the defaults)
  posttrain rl --print-config rl.kl_control=adaptive_summary
  accelerate launch --config_file "$(posttrain accelerate-config ddp)" -m posttrain run

Without --config every stage uses the demo's config (the bundled `demo`), as `posttrain run`
does; `--config defaults` takes the dataclass defaults, which are the reference recipe.
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
    # every stage, then `run` (its --help lists every section)
    commands = [(s.name, s.help_sections, s.help) for s in STAGES.values()]
    bundled = ", ".join(bundled_configs())
    demo = load_config("demo", ())     # what a stage without --config runs with
    for name, sections, help_ in commands + [("run", None, RUN_HELP)]:
        p = sub.add_parser(
            name, help=help_, description=help_,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            epilog="options (set in the YAML file or as key=value), with the demo config's "
                   "values (what a\ncommand without --config uses) and, where they differ, "
                   f"the dataclass defaults\n(`--config {DEFAULTS}`: the reference recipe):\n"
                   + describe(sections=sections, values=demo))
        p.add_argument("--config", metavar="FILE.yaml", default="demo",
                       help="YAML file whose values override the defaults, or the name of a "
                            "bundled config: " + bundled + f", or "
                            f"`{DEFAULTS}` (no file: the dataclass defaults, the "
                            "reference recipe). Default: demo")
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


def _disk_full(e: BaseException) -> bool:
    """A write failed for want of space: ENOSPC / EDQUOT, or torch's checkpoint writer,
    which reports a short write as a RuntimeError ("unexpected pos")."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(e)
    return "No space left on device" in text or ("inline_container" in text
                                                  and "unexpected pos" in text)


def _free(folder) -> str:
    try:
        return f"{shutil.disk_usage(folder).free / 2**20:.0f} MiB"
    except OSError:
        return "unknown"


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
    # lazy imports, here and below: they load torch and transformers, which `--help` never
    # needs (keeps it fast)
    from posttrain.data import DataError
    from posttrain.model.load import ModelError
    from posttrain.sft import TrainingError

    cfg = None
    try:
        cfg = load_config(None if args.config == DEFAULTS else args.config,
                          tuple(args.overrides))
        if args.print_config:
            print(to_yaml(cfg), end="")
            return 0
        from posttrain import pipeline  # lazy: loads torch (see above)
        pipeline.check_out_dir(cfg)
        # one command at a time in an out_dir (under `accelerate launch`: held by rank 0)
        with out_dir_lock(cfg.run_dir, command_line()) if _is_main() else nullcontext():
            pipeline.check_hub_sources(cfg, args.stage)
            if args.stage == "run":
                pipeline.run(cfg, force=args.force)
            else:
                pipeline.run_stage(cfg, args.stage, force=args.force)
    except (ConfigError, DataError, ModelError, TrainingError, InputFileError) as e:
        if _is_main():
            print(f"posttrain {args.stage}: error: {e}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as e:
        if cfg is None or not _disk_full(e):
            raise
        if _is_main():
            print(f"posttrain {args.stage}: error: no space left on the disk that holds "
                  f"{cfg.run_dir} ({_free(cfg.run_dir)} free; {str(e).splitlines()[0][:120]}); "
                  "the finished outputs are intact: make room, then re-run the same command "
                  "to resume", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if _is_main():
            print(f"posttrain {args.stage}: interrupted; re-run the same command to resume",
                  file=sys.stderr)
        return 130
    return 0

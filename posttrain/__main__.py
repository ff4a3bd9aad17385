"""`python -m posttrain`: the CLI. Guarded, so that a process that imports this module (vLLM's
spawned workers re-import the main module) does not run the CLI again."""
from posttrain.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

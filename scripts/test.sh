#!/usr/bin/env bash
# Lint and run the whole test suite; napari's canvas needs a (virtual) display, so pytest runs
# under xvfb-run when there is no DISPLAY.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
if [ -z "${DISPLAY:-}" ] && command -v xvfb-run >/dev/null 2>&1; then
  exec xvfb-run -a -s "-screen 0 1280x1024x24" .venv/bin/python -m pytest "$@"
fi
exec .venv/bin/python -m pytest "$@"

#!/usr/bin/env bash
# Keep the declared minimum versions honest: a separate virtual environment with Python 3.11 and
# every dependency at the floor pyproject.toml declares (scripts/minimum_versions.py reads them,
# so the check follows the declaration), the package installed into it (not editable), and a
# subset of the tests that touches every floor: the engine and its files (numpy, scipy, torch,
# safetensors, pyyaml, tifffile, zarr, dask), the napari readers and writer, and the dock widget's
# hover text, clicks, placement and spectrum plot through a real viewer (napari, magicgui, npe2,
# qtpy, matplotlib). torch is the local 2.13.0 CPU wheel pinned by constraints.txt, as everywhere
# on this project's machines.
#
#   bash scripts/check_minimum_versions.sh            # build/venv-minimum, made anew each time
#   MIN_PYTHON=/path/to/python3.11 MIN_VENV=/tmp/min bash scripts/check_minimum_versions.sh
#   KEEP_MIN_VENV=1 bash scripts/check_minimum_versions.sh   # reuse an existing venv
set -euo pipefail
cd "$(dirname "$0")/.."

# Python 3.11: MIN_PYTHON, else python3.11 on PATH, else the interpreter setup.sh made .venv with
# (the same Python the main suite ran on, so the check needs nothing this machine lacks).
PYTHON=${MIN_PYTHON:-$(command -v python3.11 || { [ -x .venv/bin/python ] &&
  .venv/bin/python -c 'import sys; print(sys._base_executable)'; } || echo python3.11)}
VENV=${MIN_VENV:-build/venv-minimum}
EXTRAS=(--extra napari --extra distributed)
start=$(date +%s)

if ! command -v "$PYTHON" >/dev/null 2>&1; then
  echo "minimum versions: $PYTHON not found (set MIN_PYTHON to a Python 3.11)" >&2
  exit 1
fi
"$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' || {
  echo "minimum versions: $PYTHON is not Python 3.11" >&2; exit 1; }

mkdir -p build
if [ -z "${KEEP_MIN_VENV:-}" ] || [ ! -x "$VENV/bin/python" ]; then
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIN_FILE=build/constraints-minimum.txt
"$PYTHON" scripts/minimum_versions.py "${EXTRAS[@]}" > "$PIN_FILE"
echo "minimum versions: installing $(tr '\n' ' ' < "$PIN_FILE")"
"$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | { grep -v "^WARNING: Location" || true; }
# The floors as exact pins, torch from constraints.txt, the package itself from this tree.
# The test tools are not part of the promise and come at their current versions.
"$VENV/bin/python" -m pip install -q -c constraints.txt -c "$PIN_FILE" \
  ".[napari,distributed]" "PyQt6>6.5" pytest pytest-qt hypothesis 2>&1 \
  | { grep -v "^WARNING: Location 'file:" || true; }
"$VENV/bin/python" scripts/minimum_versions.py "${EXTRAS[@]}" --verify
installed=$(date +%s)

# Run in this tree: pytest puts tests/ (not src/) on sys.path, so `import napari_gradcam` finds the
# installed package, with its napari.yaml and zoo files, as a user's install would.
run() {
  if [ -z "${DISPLAY:-}" ] && command -v xvfb-run >/dev/null 2>&1; then
    xvfb-run -a -s "-screen 0 1280x1024x24" "$@"
  else
    "$@"
  fi
}
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} run "$VENV/bin/python" -m pytest -q -p no:cacheprovider \
  tests/test_minimum_versions.py tests/test_core_is_qt_free.py tests/test_gradcam_math.py \
  tests/test_io.py tests/test_volume.py tests/test_model_loading.py tests/test_manifest.py \
  tests/test_reader_writer.py tests/test_reader_writer_widget.py \
  tests/test_spectrum_plot.py tests/test_widget.py tests/test_widget_magicgui.py \
  -k "not test_widget or manifest or click or places or declared or pickers"
echo "minimum versions: install $((installed - start)) s, tests $(($(date +%s) - installed)) s"

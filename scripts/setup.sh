#!/usr/bin/env bash
# One-time set-up on a fresh Debian/Ubuntu machine: system libraries for napari's OpenGL canvas
# (when run as root with apt-get), then a virtual environment in .venv with the plugin and its
# test tools. torch is pinned by constraints.txt to the CPU wheel this project is tested with;
# drop "-c constraints.txt" to let pip choose a CUDA build for your GPU.
set -euo pipefail
cd "$(dirname "$0")/.."

SYSTEM_PACKAGES="xvfb xauth libgl1-mesa-dri libglx-mesa0 libegl1 libxkbcommon-x11-0 libxcb-cursor0
  libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-xinerama0
  libxcb-xfixes0 libxcb-shape0 libdbus-1-3 libfontconfig1"

if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  missing=$(for p in $SYSTEM_PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done)
  if [ -n "$missing" ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $missing >/dev/null
  fi
else
  echo "setup: not root or no apt-get; make sure these are installed: $SYSTEM_PACKAGES" >&2
fi

PYTHON=${PYTHON:-python3}
# zarr 3 (our OME-Zarr writer) needs Python 3.11: say so before pip fails on it.
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
  echo "setup: $PYTHON is $("$PYTHON" --version 2>&1); napari-gradcam needs Python >= 3.11" \
    "(set PYTHON=python3.11)" >&2
  exit 1
}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e ".[testing,benchmark]"
echo "setup: done (.venv ready)"

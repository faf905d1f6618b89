#!/usr/bin/env bash
# Set up qwenvl in .venv/ at the repository root, then ask the bundled model about the example image.
#   bash scripts/setup.sh            (idempotent; re-running only checks what is there)
# QWENVL_SKIP_DEMO=1 skips the final demo (CI uses it before running the tests).
set -euo pipefail
cd "$(dirname "$0")/.."

# Fonts (labels and CJK drawing, synthetic data) and the word list (synthetic reading task).
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  missing=""
  for pkg in fonts-dejavu-core fonts-liberation fonts-noto-cjk wamerican ${QWENVL_APT_EXTRA:-}; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing="$missing $pkg"
  done
  if [ -n "$missing" ]; then
    echo "installing Debian packages:$missing"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
  fi
else
  echo "note: not root or no apt-get; install fonts-dejavu-core fonts-liberation fonts-noto-cjk wamerican yourself"
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# torch first, pinned, so that nothing below pulls a newer multi-gigabyte build.
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==${QWENVL_TORCH_VERSION:-2.13.0}"
# QWENVL_EXTRAS adds optional extras (CI adds "cluster", Ray Serve, so the replica tests run).
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[${QWENVL_EXTRAS:-serve,eval,test}]"
# qwenvl's CPU kernels (qwenvl/kernels), compiled once into ~/.cache/qwenvl/kernels (1-2 min); without a
# compiler this only warns, and the first use falls back to PyTorch's kernels the same way.
.venv/bin/python -c "import qwenvl.kernels as k; print('qwenvl CPU kernels:', k.isa() or 'not available')" || true

# Shows the command exactly as it runs (an argument with spaces in double quotes), then runs it.
demo() {
  local shown='$ qwenvl' arg
  for arg in "$@"; do
    case "$arg" in *[[:space:]]*) shown="$shown \"$arg\"" ;; *) shown="$shown $arg" ;; esac
  done
  echo "$shown"
  .venv/bin/qwenvl "$@"
}

if [ -z "${QWENVL_SKIP_DEMO:-}" ]; then
  echo
  demo chat --image examples/shapes.png "Locate the red triangle." --draw examples/shapes-boxes.png --boxes
  demo chat --image examples/shapes.png "What color is the circle?"
  demo chat --image examples/shapes.png "How many triangles are there?"
fi

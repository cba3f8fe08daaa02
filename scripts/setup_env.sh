#!/usr/bin/env bash
# Create (or update) the virtual environment used by `make demo` and `make test`.
# - With a working CUDA torch on the system python (GPU hosts), the venv reuses it.
# - Otherwise it installs torch 2.13.0 (a CPU build where one is available to pip).
# Everything else is installed against constraints.txt with torch pinned to the installed build,
# so pip never swaps torch for another build.
set -euo pipefail
VENV=${1:-.venv}
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."

if [ ! -x "$VENV/bin/python" ]; then
  if $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "[setup] system torch with CUDA found: venv reuses system site-packages"
    $PY -m venv --system-site-packages "$VENV"
  else
    $PY -m venv "$VENV"
  fi
fi
VPY="$VENV/bin/python"
$VPY -m pip install -q --upgrade pip setuptools wheel
if ! $VPY -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch==2.13.0"
  $VPY -m pip install -q torch==2.13.0
fi
TORCH_PIN=$($VPY -c "import torch; print(torch.__version__)")
CONSTRAINTS=$(mktemp)
trap 'rm -f "$CONSTRAINTS"' EXIT
{ echo "torch==${TORCH_PIN}"; grep -v '^#' constraints.txt; } > "$CONSTRAINTS"
if [ "$($VPY -c 'import sys; print(sys.version_info[:2] == (3, 11))')" != "True" ]; then
  # constraints.txt is the tested set for Python 3.11; other interpreters resolve the ranges freely.
  echo "torch==${TORCH_PIN}" > "$CONSTRAINTS"
fi
echo "[setup] installing requirements (torch pinned to ${TORCH_PIN})"
$VPY -m pip install -q -c "$CONSTRAINTS" --no-build-isolation -r requirements-dev.txt
$VPY -m pip install -q -c "$CONSTRAINTS" --no-build-isolation --no-deps -e .
touch "$VENV/.installed"
echo "[setup] done: $VENV"

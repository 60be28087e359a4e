#!/usr/bin/env bash
# Sets up a virtual environment for MegaMoM on a fresh machine.
#   torch first and pinned: the CPU build where there is no NVIDIA GPU (never a CUDA download on
#   a CPU machine), then mosaicml-streaming without its heavy declared dependencies, then megamom.
# Usage: scripts/bootstrap.sh [EXTRAS]   (e.g. "dev"); VENV and PYTHON may be set.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
STREAMING_VERSION=0.13.0
EXTRAS=${1:-}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
# pip's own exit status (a failed install stops the script); only a known harmless notice is filtered
pip_q() {
  local out rc=0
  out=$("$PY" -m pip install --quiet --disable-pip-version-check "$@" 2>&1) || rc=$?
  printf '%s\n' "$out" | grep -v -e "is ignored: it is neither" -e '^$' || true
  return $rc
}

"$PY" -m pip install --quiet --disable-pip-version-check --upgrade "pip>=23" "setuptools>=68" wheel 2>&1 | grep -v "is ignored" || true

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "bootstrap: NVIDIA GPU found, installing torch==$TORCH_VERSION (CUDA build)"
    pip_q "torch==$TORCH_VERSION"
  else
    echo "bootstrap: no GPU, installing torch==$TORCH_VERSION+cpu"
    # +cpu builds live on PyTorch's index (a local wheel cache, if configured, is tried first)
    "$PY" -m pip install --quiet --disable-pip-version-check "torch==$TORCH_VERSION+cpu" >/dev/null 2>&1 \
      || pip_q --index-url https://download.pytorch.org/whl/cpu "torch==$TORCH_VERSION+cpu"
  fi
  "$PY" -c "import torch" || { echo "bootstrap: torch did not install" >&2; exit 1; }
fi

if ! "$PY" -c "import importlib.metadata as m; assert m.version('mosaicml-streaming') == '$STREAMING_VERSION'" >/dev/null 2>&1; then
  pip_q --no-deps "mosaicml-streaming==$STREAMING_VERSION"
fi
pip_q -r requirements/streaming.txt

if [ -n "$EXTRAS" ]; then TARGET=".[$EXTRAS]"; else TARGET="."; fi
# Deps first (cheap when satisfied), then a fresh non-editable install of this tree so the tests
# always exercise the installed package.
pip_q "$TARGET"
# setuptools copies a source file into ./build only when it is newer than the copy there: a file
# restored with an older mtime would install stale. Build from scratch.
rm -rf build
pip_q --no-deps --no-build-isolation --force-reinstall .
"$PY" -c "import torch, megamom; print(f'bootstrap: megamom {megamom.__version__}, torch {torch.__version__}, cuda={torch.cuda.is_available()}')"

#!/usr/bin/env bash
# Sets up a virtual environment for MegaMoM on a fresh machine.
#   torch first and pinned: the CPU build where there is no NVIDIA GPU (never a CUDA download on a
#   CPU machine); then every other package at the tested versions of requirements/constraints.txt
#   (so a new upstream release cannot break a fresh clone; `make lock` refreshes them); then
#   mosaicml-streaming without its heavy declared dependencies; then megamom itself.
# Usage: scripts/bootstrap.sh [EXTRAS]   (e.g. "dev"); VENV, PYTHON and TORCH_VERSION may be set;
#   MEGAMOM_CONSTRAINTS=none installs the newest allowed releases instead (used by scripts/lock.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
STREAMING_VERSION=0.13.0
CONSTRAINTS=${MEGAMOM_CONSTRAINTS:-requirements/constraints.txt}
EXTRAS=${1:-}

say() { echo "bootstrap: $*"; }

if [ ! -x "$VENV/bin/python" ]; then
  say "creating the virtual environment $VENV ($("$PYTHON" --version 2>&1))"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIN=()
[ "$CONSTRAINTS" = none ] || PIN=(-c "$CONSTRAINTS")

# pip's own exit status stops the script. Conflict warnings are off here: the one known conflict
# (streaming's declared pins) is explained once by the check at the end, which fails on any other.
pip_q() {
  local out rc=0
  out=$("$PY" -m pip install --quiet --disable-pip-version-check --no-warn-conflicts "$@" 2>&1) || rc=$?
  printf '%s\n' "$out" | grep -v -e "is ignored: it is neither" -e '^$' || true
  return $rc
}

pip_q "${PIN[@]}" --upgrade pip setuptools wheel

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    say "NVIDIA GPU found: installing torch==$TORCH_VERSION (CUDA build, a few GB)"
    pip_q "torch==$TORCH_VERSION"
  else
    say "no GPU: installing torch==$TORCH_VERSION+cpu (about a minute)"
    # +cpu builds live on PyTorch's index (a local wheel cache, if configured, is tried first)
    "$PY" -m pip install --quiet --disable-pip-version-check "torch==$TORCH_VERSION+cpu" >/dev/null 2>&1 \
      || pip_q --index-url https://download.pytorch.org/whl/cpu "torch==$TORCH_VERSION+cpu"
  fi
  "$PY" -c "import torch" 2>/dev/null || { echo "bootstrap: torch did not install" >&2; exit 1; }
fi

if [ -n "$EXTRAS" ]; then TARGET=".[$EXTRAS]"; else TARGET="."; fi
say "installing megamom's dependencies${EXTRAS:+ with the $EXTRAS extras} (${CONSTRAINTS/#none/newest allowed releases})"
# --no-build-isolation: megamom builds with the venv's pinned setuptools, not the newest release.
pip_q "${PIN[@]}" --no-build-isolation "$TARGET"

if ! "$PY" -c "import importlib.metadata as m; assert m.version('mosaicml-streaming') == '$STREAMING_VERSION'" >/dev/null 2>&1; then
  say "installing mosaicml-streaming==$STREAMING_VERSION without its declared dependencies"
  pip_q --no-deps "mosaicml-streaming==$STREAMING_VERSION"
fi

say "installing megamom from this checkout"
# setuptools copies a source file into ./build only when it is newer than the copy there: a file
# restored with an older mtime would install stale. Build from scratch.
rm -rf build
pip_q --no-deps --no-build-isolation --force-reinstall .
rm -rf build megamom.egg-info

# mosaicml-streaming declares cloud SDKs, torchvision (which pulls a CUDA torch), numpy<2.2 and
# transformers<5; megamom uses only its local-disk paths, tested with the versions installed here.
conflicts=$("$PY" -m pip check --disable-pip-version-check 2>&1 | grep -v -e '^mosaicml-streaming ' -e '^No broken requirements' || true)
if [ -n "$conflicts" ]; then
  printf 'bootstrap: conflicting packages in %s:\n%s\n' "$VENV" "$conflicts" >&2
  exit 1
fi
say "mosaicml-streaming runs without its declared cloud SDKs and torchvision, with numpy / transformers newer than it declares (its local-disk paths are tested with these)"
"$PY" -c "import torch, megamom; print(f'bootstrap: ready: megamom {megamom.__version__}, torch {torch.__version__}, cuda={torch.cuda.is_available()}')"

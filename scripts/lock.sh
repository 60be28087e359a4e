#!/usr/bin/env bash
# Refreshes requirements/constraints.txt, the tested versions every install takes (`make lock`).
#   Builds a throw-away venv with the newest releases that pyproject.toml and requirements/ allow
#   (no constraints), runs the test suite in it, and only if it passes writes the frozen versions.
#   torch (pinned by scripts/bootstrap.sh, CPU or CUDA build), its CUDA runtime (nvidia-*) and
#   triton (the build torch brings) are left out: they differ between CPU and GPU machines.
# Usage: scripts/lock.sh [PYTEST_ARGS...]
set -euo pipefail
cd "$(dirname "$0")/.."
LOCK_VENV=${LOCK_VENV:-.venv-lock}
rm -rf "$LOCK_VENV"
VENV="$LOCK_VENV" MEGAMOM_CONSTRAINTS=none bash scripts/bootstrap.sh dev
MEGAMOM_EXPECT_INSTALLED=1 "$LOCK_VENV/bin/pytest" -q "$@"
tmp=$(mktemp requirements/.constraints.XXXXXX)
{
  echo "# Tested versions: scripts/bootstrap.sh installs every package under these constraints."
  echo "# Refresh with 'make lock' (scripts/lock.sh): newest allowed releases, full test suite, then this file."
  echo "# torch, nvidia-* and triton are pinned by the bootstrap / the dev extra, not here."
  "$LOCK_VENV/bin/python" -m pip freeze --all --exclude-editable --disable-pip-version-check \
    | grep -v -i -E '^(torch|triton|megamom|nvidia-[a-z0-9-]+) ?(==|@)' | LC_ALL=C sort -f
} > "$tmp"
mv "$tmp" requirements/constraints.txt
rm -rf "$LOCK_VENV"
echo "lock: requirements/constraints.txt written ($(grep -c '==' requirements/constraints.txt) pins)"

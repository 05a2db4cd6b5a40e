#!/usr/bin/env bash
# The test command: set up the CPU environment if needed, then run the whole test suite on CPU.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
bash scripts/setup_env.sh
# shellcheck disable=SC1091
source "${RESPEC_VENV:-$REPO/.venv}/bin/activate"
# Lab models and data are built once and cached inside the clone (git-ignored).
export RESPEC_CACHE="${RESPEC_CACHE:-$REPO/.cache/respec}"
exec python -m pytest -q -rs "$@"

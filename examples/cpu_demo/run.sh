#!/usr/bin/env bash
# README command 1: set up the CPU environment if needed, build the lab, run a short GRPO job with respec.
# Extra arguments go to run_grpo.py (e.g. --rollout vllm, --steps 20).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO"
bash scripts/setup_env.sh
# shellcheck disable=SC1091
source "${RESPEC_VENV:-$REPO/.venv}/bin/activate"
exec python examples/cpu_demo/run_grpo.py "$@"

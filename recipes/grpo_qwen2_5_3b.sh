#!/usr/bin/env bash
# GRPO | Qwen2.5-3B-Instruct | GSM8K, MATH or mixed | respec EAGLE-3 rollouts (config/qwen2_5_3b.yaml).
#   DRAFTER_PATH=/ckpt/eagle3-qwen2.5-3b DATASET=mixed MODEL_PATH=/models/Qwen2.5-3B-Instruct \
#       bash recipes/grpo_qwen2_5_3b.sh [hydra overrides...]
# Data: bash recipes/prepare_data.sh first. Environment variables: see recipes/run_recipe.sh.
set -euo pipefail
exec bash "$(dirname "${BASH_SOURCE[0]}")/run_recipe.sh" qwen2_5_3b "$@"

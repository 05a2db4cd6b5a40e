#!/usr/bin/env bash
# GRPO | Qwen2.5-14B-Instruct | GSM8K, MATH or mixed | respec EAGLE-3 rollouts (config/qwen2_5_14b.yaml).
#   DRAFTER_PATH=/ckpt/eagle3-qwen2.5-14b DATASET=mixed MODEL_PATH=/models/Qwen2.5-14B-Instruct \
#       bash recipes/grpo_qwen2_5_14b.sh [hydra overrides...]
# Data: bash recipes/prepare_data.sh first. Environment variables: see recipes/run_recipe.sh.
set -euo pipefail
exec bash "$(dirname "${BASH_SOURCE[0]}")/run_recipe.sh" qwen2_5_14b "$@"

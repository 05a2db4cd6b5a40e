#!/usr/bin/env bash
# GRPO | Qwen2.5-7B-Instruct | GSM8K, MATH or mixed | respec EAGLE-3 rollouts (config/qwen2_5_7b.yaml).
#   DRAFTER_PATH=/ckpt/eagle3-qwen2.5-7b DATASET=mixed MODEL_PATH=/models/Qwen2.5-7B-Instruct \
#       bash recipes/grpo_qwen2_5_7b.sh [hydra overrides...]
# Data: bash recipes/prepare_data.sh first. Environment variables: see recipes/run_recipe.sh.
set -euo pipefail
exec bash "$(dirname "${BASH_SOURCE[0]}")/run_recipe.sh" qwen2_5_7b "$@"

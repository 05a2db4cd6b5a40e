#!/usr/bin/env bash
# The recipes' shared launcher: stock verl GRPO (python -m verl.trainer.main_ppo) on GSM8K, MATH or both, from a
# recipe YAML in recipes/config, with respec rollouts. Called by the grpo_qwen2_5_*.sh scripts:
#   run_recipe.sh <recipe config name> [hydra overrides...]
# Environment:
#   DRAFTER_PATH   EAGLE-3 drafter checkpoint trained for the actor (required)
#   DATASET        gsm8k | math | mixed (default gsm8k)
#   DATA_DIR       where recipes/prepare_data.sh wrote <dataset>/{train,test}.parquet (default ~/data)
#   MODEL_PATH     actor (default: the recipe's Hugging Face id)
#   NNODES, NGPUS_PER_NODE   cluster shape (default 1 x 8)
#   PYTHON         interpreter (default python3)
#   DRY_RUN=1      print the command instead of running it
set -euo pipefail

recipe=${1:?usage: run_recipe.sh <recipe config name> [hydra overrides...]}
shift
RECIPES="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DATASET=${DATASET:-gsm8k}
DATA_DIR=${DATA_DIR:-$HOME/data}
if [ -z "${DRAFTER_PATH:-}" ]; then
    echo "DRAFTER_PATH is not set: point it at an EAGLE-3 drafter checkpoint (config.json + safetensors) trained for the actor" >&2
    exit 1
fi

case "${DATASET}" in
    gsm8k | math)
        train_files="['${DATA_DIR}/${DATASET}/train.parquet']"
        val_files="['${DATA_DIR}/${DATASET}/test.parquet']"
        ;;
    mixed)
        train_files="['${DATA_DIR}/gsm8k/train.parquet', '${DATA_DIR}/math/train.parquet']"
        val_files="['${DATA_DIR}/gsm8k/test.parquet', '${DATA_DIR}/math/test.parquet']"
        ;;
    *)
        echo "DATASET must be gsm8k, math or mixed, got: ${DATASET}" >&2
        exit 1
        ;;
esac

cmd=(
    "${PYTHON:-python3}" -m verl.trainer.main_ppo
    --config-path "${RECIPES}/config" --config-name "${recipe}"
    "data.train_files=${train_files}"
    "data.val_files=${val_files}"
    "actor_rollout_ref.rollout.custom.respec.drafter_path=${DRAFTER_PATH}"
    "trainer.experiment_name=${recipe}_${DATASET}"
    "trainer.nnodes=${NNODES:-1}"
    "trainer.n_gpus_per_node=${NGPUS_PER_NODE:-8}"
)
if [ -n "${MODEL_PATH:-}" ]; then
    cmd+=("actor_rollout_ref.model.path=${MODEL_PATH}")
fi
cmd+=("$@")

if [ -n "${DRY_RUN:-}" ]; then
    printf '%q ' "${cmd[@]}"
    echo
else
    exec "${cmd[@]}"
fi

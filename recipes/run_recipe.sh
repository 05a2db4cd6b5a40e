#!/usr/bin/env bash
# The recipes' shared launcher: stock verl GRPO (python -m verl.trainer.main_ppo) on GSM8K, MATH or both, from a
# recipe YAML in recipes/config, with respec rollouts. Called by the grpo_qwen2_5_*.sh scripts:
#   run_recipe.sh <recipe config name> [hydra overrides...]
# Environment:
#   DRAFTER_PATH   EAGLE-3 drafter checkpoint trained for the actor; if empty, a day-0 (untrained) drafter is built
#                  from MODEL_PATH once into $CHECKPOINT_DIR/drafter_day0 and the online learner adapts it
#   DATASET        gsm8k | math | mixed (default gsm8k)
#   DATA_DIR       where recipes/prepare_data.sh wrote <dataset>/{train,test}.parquet (default ~/data)
#   MODEL_PATH     actor (default: the recipe's Hugging Face id); a local directory when DRAFTER_PATH is empty
#   CHECKPOINT_DIR verl's checkpoint directory (default ./checkpoints/<recipe>_<dataset>)
#   NNODES, NGPUS_PER_NODE   cluster shape (default 1 x 8)
#   PYTHON         interpreter (default python3)
#   DRY_RUN=1      print the commands instead of running them (the day-0 build, if any, on the line before)
set -euo pipefail

recipe=${1:?usage: run_recipe.sh <recipe config name> [hydra overrides...]}
shift
RECIPES="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DATASET=${DATASET:-gsm8k}
DATA_DIR=${DATA_DIR:-$HOME/data}
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

CHECKPOINT_DIR=${CHECKPOINT_DIR:-$PWD/checkpoints/${recipe}_${DATASET}}
build_drafter=()
if [ -z "${DRAFTER_PATH:-}" ]; then
    if [ -z "${MODEL_PATH:-}" ]; then
        echo "DRAFTER_PATH is not set, so a day-0 drafter is built from the actor: set MODEL_PATH to the actor's local" \
            "Hugging Face directory, or DRAFTER_PATH to an EAGLE-3 drafter checkpoint trained for it" >&2
        exit 1
    fi
    DRAFTER_PATH="${CHECKPOINT_DIR}/drafter_day0"
    if [ ! -f "${DRAFTER_PATH}/config.json" ]; then
        build_drafter=("${PYTHON:-python3}" -m respec_plugin.core.drafter.day0 --actor "${MODEL_PATH}" --out "${DRAFTER_PATH}")
    fi
fi

cmd=(
    "${PYTHON:-python3}" -m verl.trainer.main_ppo
    --config-path "${RECIPES}/config" --config-name "${recipe}"
    "data.train_files=${train_files}"
    "data.val_files=${val_files}"
    "actor_rollout_ref.rollout.custom.respec.drafter_path=${DRAFTER_PATH}"
    "trainer.experiment_name=${recipe}_${DATASET}"
    "trainer.default_local_dir=${CHECKPOINT_DIR}"
    "trainer.nnodes=${NNODES:-1}"
    "trainer.n_gpus_per_node=${NGPUS_PER_NODE:-8}"
)
if [ -n "${MODEL_PATH:-}" ]; then
    cmd+=("actor_rollout_ref.model.path=${MODEL_PATH}")
fi
cmd+=("$@")

if [ -n "${DRY_RUN:-}" ]; then
    if [ ${#build_drafter[@]} -gt 0 ]; then
        printf '%q ' "${build_drafter[@]}"
        echo
    fi
    printf '%q ' "${cmd[@]}"
    echo
else
    if [ ${#build_drafter[@]} -gt 0 ]; then
        "${build_drafter[@]}"
    fi
    exec "${cmd[@]}"
fi

#!/usr/bin/env bash
# Writes the GSM8K and MATH parquet files the recipes train on, with verl's own preprocessors
# (examples/data_preprocess/{gsm8k,math_dataset}.py of a verl checkout; the verl wheel does not ship them):
#   VERL_REPO=/path/to/verl bash recipes/prepare_data.sh
# Environment:
#   VERL_REPO        a verl source checkout (git clone -b v0.9.0 https://github.com/verl-project/verl)
#   DATA_DIR         output root: <DATA_DIR>/gsm8k/{train,test}.parquet, <DATA_DIR>/math/... (default ~/data)
#   GSM8K_DATASET    local copy of openai/gsm8k (default: downloaded from the Hugging Face hub)
#   MATH_DATASET     local copy of DigitalLearningGmbH/MATH-lighteval (default: downloaded)
set -euo pipefail

if [ -z "${VERL_REPO:-}" ] || [ ! -d "${VERL_REPO}/examples/data_preprocess" ]; then
    echo "VERL_REPO=${VERL_REPO:-} has no examples/data_preprocess: set it to a verl source checkout" >&2
    exit 1
fi
DATA_DIR=${DATA_DIR:-$HOME/data}
PYTHON=${PYTHON:-python3}

run_preprocessor() {  # <script> <output dir> [local dataset path]
    local args=(--local_save_dir "$2")
    if [ -n "${3:-}" ]; then
        args+=(--local_dataset_path "$3")
    fi
    mkdir -p "$2"
    "${PYTHON}" "${VERL_REPO}/examples/data_preprocess/$1" "${args[@]}"
}

run_preprocessor gsm8k.py "${DATA_DIR}/gsm8k" "${GSM8K_DATASET:-}"
run_preprocessor math_dataset.py "${DATA_DIR}/math" "${MATH_DATASET:-}"
ls -l "${DATA_DIR}"/gsm8k/*.parquet "${DATA_DIR}"/math/*.parquet

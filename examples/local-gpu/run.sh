#!/usr/bin/env bash
# Builds ember with CUDA and answers one prompt with the small real model on GPU 0.
set -euo pipefail
cd "$(dirname "$0")/../.."
command -v nvidia-smi >/dev/null || { echo "no nvidia-smi: this machine has no NVIDIA driver" >&2; exit 1; }
command -v nvcc >/dev/null || { echo "no nvcc on PATH: install a CUDA toolkit, or run scripts/install-nvcc.sh and add the directory it prints to PATH" >&2; exit 1; }
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)}
cargo build --release -p ember-worker --features cuda
model_dir=$(scripts/fetch-model.sh)
target/release/ember generate --device "${EMBER_DEVICE:-cuda}" --model "$model_dir/hf-f16" \
  --prompt "${1:-What is the capital of France?}"

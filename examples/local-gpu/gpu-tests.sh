#!/usr/bin/env bash
# The GPU test suite, for a machine with an NVIDIA GPU: the kernel tests on the device, then
# the model's greedy answer on the GPU. Fails if no GPU run happened.
set -euo pipefail
cd "$(dirname "$0")/../.."
command -v nvidia-smi >/dev/null || { echo "no nvidia-smi: this machine has no NVIDIA driver" >&2; exit 1; }
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)}
log=$(mktemp)
cargo test -p ember-kernels --features cuda -- --nocapture 2>&1 | tee "$log"
# The streamed loader's CUDA sink and its staging ring (issue 20, finding 4).
cargo test -p ember-model-loader --features cuda --lib -- stream staging --nocapture 2>&1 | tee -a "$log"
if grep -q "CUDA kernel NOT RUN" "$log"; then
  echo "the kernel tests did not run on a GPU (see above)" >&2
  exit 1
fi
answer=$(EMBER_DEVICE=cuda examples/local-gpu/run.sh "What is the capital of France?")
echo "$answer"
[ "$answer" = "The capital of France is Paris." ] || { echo "unexpected answer on the GPU" >&2; exit 1; }
echo "GPU suite passed"

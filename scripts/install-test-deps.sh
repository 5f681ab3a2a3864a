#!/usr/bin/env bash
# Installs what Ember's tests need besides Rust (pinned): moto's server for SQS and S3,
# the minisign tool, Arize Phoenix (an OpenTelemetry trace backend), jsonata-js (the reference
# JSONata, from npm), cfn-lint for the
# templates in infra/, the official `openai` client (the HTTP API's tests talk to `ember serve
# --http` through it), and cargo-lambda for the local Lambda Runtime API (its
# PyPI wheel is a prebuilt binary; `cargo install` would take close to an hour).
# Idempotent and quick when everything is already there.
set -euo pipefail
want_moto=5.2.5
want_cargo_lambda=1.9.2
want_cfn_lint=1.51.0
want_openai=3.57.0
# The minisign tool (the signing tests check Ember's signatures against it): Debian's package.
want_minisign=0.11
want_minisign_deb=0.11-1
# Arize Phoenix, a real OpenTelemetry trace backend (OTLP in, REST queries out) for the tracing
# tests; in its own virtualenv, its dependencies being many and pinned tightly.
want_phoenix=20.26.1
phoenix_venv=${EMBER_PHOENIX_VENV:-$HOME/.cache/ember/phoenix-venv}
version_of() { python3 -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null || true; }
if [ "$(version_of moto)" != "$want_moto" ] || ! python3 -c 'import flask, flask_cors' 2>/dev/null; then
  python3 -m pip install --quiet --disable-pip-version-check "moto[server]==$want_moto"
fi
command -v moto_server >/dev/null || { echo "moto_server is not on PATH after installing moto" >&2; exit 1; }
if [ "$(minisign -v 2>/dev/null || true)" != "minisign $want_minisign" ]; then
  sudo=$([ "$(id -u)" = 0 ] || echo sudo)
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "minisign=$want_minisign_deb" >/dev/null
fi
[ "$(minisign -v)" = "minisign $want_minisign" ] || { echo "minisign $want_minisign is not on PATH after installing it" >&2; exit 1; }
if [ "$("$phoenix_venv/bin/python" -c "import importlib.metadata as m; print(m.version('arize-phoenix'))" 2>/dev/null || true)" != "$want_phoenix" ]; then
  python3 -m venv "$phoenix_venv"
  "$phoenix_venv/bin/pip" install --quiet --disable-pip-version-check "arize-phoenix==$want_phoenix"
fi
[ -x "$phoenix_venv/bin/phoenix" ] || { echo "phoenix is not in $phoenix_venv after installing it" >&2; exit 1; }
# cfn-lint checks the CloudFormation templates in infra/ (.ci/run).
if [ "$(version_of cfn-lint)" != "$want_cfn_lint" ]; then
  python3 -m pip install --quiet --disable-pip-version-check "cfn-lint==$want_cfn_lint"
fi
command -v cfn-lint >/dev/null || { echo "cfn-lint is not on PATH after installing it" >&2; exit 1; }
if [ "$(version_of openai)" != "$want_openai" ]; then
  python3 -m pip install --quiet --disable-pip-version-check "openai==$want_openai"
fi
python3 -c 'import openai' || { echo "the openai package does not import after installing it" >&2; exit 1; }
# The reference JSONata implementation (jsonata-js, the one Step Functions follows): the
# pipeline tests check Ember's JSONata results against it. npm, into its own folder.
want_jsonata=2.2.2
jsonata_dir=${EMBER_JSONATA_JS:-$HOME/.cache/ember/jsonata-js}
if [ "$(node -p "require('$jsonata_dir/node_modules/jsonata/package.json').version" 2>/dev/null || true)" != "$want_jsonata" ]; then
  mkdir -p "$jsonata_dir"
  (cd "$jsonata_dir" && npm install --silent --no-audit --no-fund "jsonata@$want_jsonata" >/dev/null)
fi
[ -f "$jsonata_dir/node_modules/jsonata/jsonata.js" ] || { echo "jsonata $want_jsonata is not in $jsonata_dir after installing it" >&2; exit 1; }
if [ "$(version_of cargo-lambda)" != "$want_cargo_lambda" ]; then
  python3 -m pip install --quiet --disable-pip-version-check "cargo-lambda==$want_cargo_lambda"
fi
# pip puts the binary in Python's scripts directory, which may not be on PATH (the tests look
# there too).
scripts=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
command -v cargo-lambda >/dev/null || [ -x "$scripts/cargo-lambda" ] \
  || { echo "cargo-lambda is neither on PATH nor in $scripts after installing it" >&2; exit 1; }

#!/usr/bin/env bash
# Installs what Ember's tests need besides Rust (pinned): moto's server for SQS and S3,
# cfn-lint for the templates in infra/, the official `openai` client (the HTTP API's tests talk
# to `ember serve --http` through it), and cargo-lambda for the local Lambda Runtime API (its
# PyPI wheel is a prebuilt binary; `cargo install` would take close to an hour).
# Idempotent and quick when everything is already there.
set -euo pipefail
want_moto=5.2.5
want_cargo_lambda=1.9.2
want_cfn_lint=1.51.0
want_openai=3.57.0
version_of() { python3 -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null || true; }
if [ "$(version_of moto)" != "$want_moto" ] || ! python3 -c 'import flask, flask_cors' 2>/dev/null; then
  python3 -m pip install --quiet --disable-pip-version-check "moto[server]==$want_moto"
fi
command -v moto_server >/dev/null || { echo "moto_server is not on PATH after installing moto" >&2; exit 1; }
# cfn-lint checks the CloudFormation templates in infra/ (.ci/run).
if [ "$(version_of cfn-lint)" != "$want_cfn_lint" ]; then
  python3 -m pip install --quiet --disable-pip-version-check "cfn-lint==$want_cfn_lint"
fi
command -v cfn-lint >/dev/null || { echo "cfn-lint is not on PATH after installing it" >&2; exit 1; }
if [ "$(version_of openai)" != "$want_openai" ]; then
  python3 -m pip install --quiet --disable-pip-version-check "openai==$want_openai"
fi
python3 -c 'import openai' || { echo "the openai package does not import after installing it" >&2; exit 1; }
if [ "$(version_of cargo-lambda)" != "$want_cargo_lambda" ]; then
  python3 -m pip install --quiet --disable-pip-version-check "cargo-lambda==$want_cargo_lambda"
fi
# pip puts the binary in Python's scripts directory, which may not be on PATH (the tests look
# there too).
scripts=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
command -v cargo-lambda >/dev/null || [ -x "$scripts/cargo-lambda" ] \
  || { echo "cargo-lambda is neither on PATH nor in $scripts after installing it" >&2; exit 1; }

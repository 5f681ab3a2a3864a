#!/usr/bin/env bash
# Installs what Ember's tests need besides Rust (pinned): moto's server for SQS and S3.
# Idempotent and quick when everything is already there.
set -euo pipefail
want_moto=5.2.5
have=$(python3 -c 'import importlib.metadata as m; print(m.version("moto"))' 2>/dev/null || true)
if [ "$have" != "$want_moto" ] || ! python3 -c 'import flask, flask_cors' 2>/dev/null; then
  python3 -m pip install --quiet --disable-pip-version-check "moto[server]==$want_moto"
fi
command -v moto_server >/dev/null || { echo "moto_server is not on PATH after installing moto" >&2; exit 1; }

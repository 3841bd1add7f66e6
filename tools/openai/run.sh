#!/usr/bin/env bash
# The OpenAI SDK check of the HTTP API (.ci/run calls it after the tests): installs the pinned `openai` package
# (tools/openai/requirements.txt) into the ignored .venv-openai/, starts `kosmos serve` (the demo model) on free
# ports and runs tools/openai/check.py against it. It uses the `kosmos` binary the tests built (target/debug), and
# builds it the way the tests do when it is missing; about a minute.
#
#   tools/openai/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."

venv=.venv-openai
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check -r tools/openai/requirements.txt

kosmos=target/debug/kosmos
if [ ! -x "$kosmos" ]; then
  # The binary of the test build (same features as `cargo test --workspace`: nothing is compiled twice).
  cargo test --workspace --locked --no-run
fi

free_port() {
  "$venv/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
grpc_port=$(free_port)
http_port=$(free_port)
log=$(mktemp)
"$kosmos" serve --listen "127.0.0.1:$grpc_port" --http-listen "127.0.0.1:$http_port" \
  --metrics-listen 127.0.0.1:0 2>"$log" &
serve_pid=$!
trap 'kill "$serve_pid" 2>/dev/null || true; wait "$serve_pid" 2>/dev/null || true' EXIT

"$venv/bin/python" tools/openai/check.py \
  --base-url "http://127.0.0.1:$http_port/v1" \
  --grpc "http://127.0.0.1:$grpc_port" \
  --kosmos "$kosmos" \
  --image models/demo/heldout/images/001.png \
  || { echo "kosmos serve's log:"; cat "$log"; exit 1; }

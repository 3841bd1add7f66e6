#!/usr/bin/env bash
# The README's test command. The suite needs two tools beyond cargo: Debian's Prometheus server (the live
# signal-chain test) and its promtool (the /metrics lint of the metrics tests). Both come from Debian's `prometheus`
# package, unpacked into the ignored .tools/prometheus/ without root by tools/prometheus/install.sh (a no-op once
# done). Then every test of the workspace runs; extra arguments go to `cargo test`.
#
#   tools/test.sh              # what CI runs (.ci/run adds --locked)
set -euo pipefail
cd "$(dirname "$0")/.."
tools/prometheus/install.sh >/dev/null
export PATH="$PWD/.tools/prometheus/usr/bin:$PATH"
exec cargo test --workspace "$@"

#!/usr/bin/env bash
# Installs the Prometheus server (Debian's `prometheus` package) into the git-ignored .tools/prometheus/, for the live
# signal-chain test (services/kosmos/tests/live_signals.rs). Nothing is installed system-wide: the package is fetched
# with `apt-get download` and unpacked with `dpkg-deb -x` (no root needed, no service started, no user created);
# as root with a stale package list it runs `apt-get update` once and retries.
#
#   tools/prometheus/install.sh        # prints the path of the prometheus binary
#
# Does nothing when .tools/prometheus/usr/bin/prometheus already runs. Exits non-zero, naming the problem, otherwise.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DEST="$ROOT/.tools/prometheus"
BIN="$DEST/usr/bin/prometheus"

if [[ -x "$BIN" ]] && "$BIN" --version >/dev/null 2>&1; then
  echo "$BIN"
  exit 0
fi

command -v apt-get >/dev/null 2>&1 || { echo "install.sh: apt-get is needed (a Debian-like machine)" >&2; exit 1; }
command -v dpkg-deb >/dev/null 2>&1 || { echo "install.sh: dpkg-deb is needed" >&2; exit 1; }

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
download() { (cd "$TMP" && apt-get download prometheus >/dev/null 2>"$TMP/apt.log"); }
if ! download; then
  if [[ "$(id -u)" == 0 ]]; then
    apt-get update >/dev/null 2>&1 || true
    download || { cat "$TMP/apt.log" >&2; echo "install.sh: apt-get download prometheus failed" >&2; exit 1; }
  else
    cat "$TMP/apt.log" >&2
    echo "install.sh: apt-get download prometheus failed (as root it would run apt-get update first)" >&2
    exit 1
  fi
fi
deb="$(ls "$TMP"/prometheus_*.deb | head -n1)"
rm -rf "$DEST"
mkdir -p "$DEST"
dpkg-deb -x "$deb" "$DEST"
"$BIN" --version >/dev/null 2>&1 || { echo "install.sh: $BIN does not run after unpacking $deb" >&2; exit 1; }
echo "$BIN"

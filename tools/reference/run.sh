#!/usr/bin/env bash
# Reference tooling entry point: installs the pinned Python environment into the ignored virtualenv .venv-ref/
# (at the repository root) and runs one of the reference scripts in it.
#
#   tools/reference/run.sh fixtures               regenerate tests/fixtures/ (make_fixtures.py, deterministic)
#   tools/reference/run.sh chat-templates         regenerate tests/fixtures/chat_templates.json (transformers' renders)
#   tools/reference/run.sh kosmos25-fixtures      regenerate tests/fixtures/kosmos25/ (Kosmos-2.5 reference outputs)
#   tools/reference/run.sh bench-model DIR        write the mid-size random benchmark model into DIR
#   tools/reference/run.sh bench-torch ARGS...    PyTorch timings (bench_torch.py --model DIR --threads N --json OUT)
#   tools/reference/run.sh python ARGS...         the venv's python
#   tools/reference/run.sh setup                  only create / update the venv
#
# The venv is (re)installed when it is missing or when requirements.txt changed (its sha256 is stored in
# .venv-ref/.requirements.sha256). Environment: PYTHON (default python3, must be 3.11) creates the venv.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
VENV="$ROOT/.venv-ref"
REQ="$HERE/requirements.txt"
STAMP="$VENV/.requirements.sha256"
PYTHON="${PYTHON:-python3}"

ensure_venv() {
    local want have=""
    want="$(sha256sum "$REQ" | cut -d' ' -f1)"
    if [[ -f "$STAMP" ]]; then
        have="$(cat "$STAMP")"
    fi
    if [[ -x "$VENV/bin/python" && "$want" == "$have" ]]; then
        return 0
    fi
    echo "run.sh: installing the reference environment into $VENV" >&2
    if [[ ! -x "$VENV/bin/python" ]]; then
        "$PYTHON" -m venv "$VENV"
    fi
    rm -f "$STAMP"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
    # A complete lock: no dependency resolution (torchscale 0.3.0 needs --no-deps in any case).
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -r "$REQ"
    "$VENV/bin/python" -m pip check
    echo "$want" >"$STAMP"
}

usage() {
    sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

[[ $# -ge 1 ]] || usage
cmd="$1"
shift

case "$cmd" in
setup)
    ensure_venv
    ;;
fixtures)
    ensure_venv
    cd "$ROOT"
    exec "$VENV/bin/python" "$HERE/make_fixtures.py" --out "$ROOT/tests/fixtures" "$@"
    ;;
chat-templates)
    ensure_venv
    cd "$ROOT"
    exec "$VENV/bin/python" "$HERE/make_chat_template_fixtures.py" --out "$ROOT/tests/fixtures/chat_templates.json" "$@"
    ;;
kosmos25-fixtures)
    ensure_venv
    cd "$ROOT"
    exec "$VENV/bin/python" "$HERE/make_kosmos25_fixtures.py" --out "$ROOT/tests/fixtures" "$@"
    ;;
bench-model)
    [[ $# -ge 1 ]] || usage
    ensure_venv
    cd "$ROOT"
    exec "$VENV/bin/python" "$HERE/make_bench_model.py" "$@"
    ;;
bench-torch)
    ensure_venv
    cd "$ROOT"
    exec "$VENV/bin/python" "$HERE/bench_torch.py" "$@"
    ;;
python)
    ensure_venv
    exec "$VENV/bin/python" "$@"
    ;;
*)
    usage
    ;;
esac

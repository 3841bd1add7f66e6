#!/usr/bin/env bash
# Demo model: training and held-out evaluation, in the pinned reference environment (tools/reference/run.sh).
#
#   tools/train/run.sh train [ARGS...]   train and write models/demo/ (train.py --help; the defaults are the shipped
#                                        model's recipe: seeded, 2500 steps, ~30 min on 2 idle CPU cores)
#   tools/train/run.sh eval [ARGS...]    held-out metrics of models/demo/ with PyTorch (eval_torch.py --help),
#                                        e.g. --dump models/demo/heldout to rewrite the held-out set for Rust
#   tools/train/run.sh train-doc [ARGS...]  train and write models/demo-doc/, the tiny Kosmos-2.5 (train_doc.py)
#   tools/train/run.sh eval-doc [ARGS...]   its held-out metrics with PyTorch (eval_doc_torch.py; --dump DIR)
#   tools/train/run.sh probe-doc MODEL_DIR  does it read? accuracy per token kind, own vs another page's image
#
# All run under `nice -n 10` (the build machines are shared) unless NICE=0.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
NICE="${NICE:-10}"

usage() {
    sed -n '2,11p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

[[ $# -ge 1 ]] || usage
cmd="$1"
shift

cd "$ROOT"
case "$cmd" in
train)
    exec nice -n "$NICE" "$ROOT/tools/reference/run.sh" python "$HERE/train.py" "$@"
    ;;
eval)
    exec nice -n "$NICE" "$ROOT/tools/reference/run.sh" python "$HERE/eval_torch.py" "$@"
    ;;
train-doc)
    exec nice -n "$NICE" "$ROOT/tools/reference/run.sh" python "$HERE/train_doc.py" "$@"
    ;;
eval-doc)
    exec nice -n "$NICE" "$ROOT/tools/reference/run.sh" python "$HERE/eval_doc_torch.py" "$@"
    ;;
probe-doc)
    exec nice -n "$NICE" "$ROOT/tools/reference/run.sh" python "$HERE/probe_doc.py" "$@"
    ;;
*)
    usage
    ;;
esac

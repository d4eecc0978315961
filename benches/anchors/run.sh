#!/usr/bin/env bash
# sift's default training run and the classic anchors (TF-IDF + linear SVM,
# fastText) on the same split of the same data, in one run.
#
#   benches/anchors/run.sh [DATA.jsonl] [OUT_DIR]
#
# DATA defaults to ../shared/data/debtags-dev.jsonl. The Python packages go
# into a virtual environment under ~/.cache/sift-anchors. Prints sift's
# figures (the shipped combination, the transformer alone, the in-run
# linear baseline) and the anchors', and keeps anchors.json and sift's
# metrics.json and report.html in OUT_DIR.
set -euo pipefail
cd "$(dirname "$0")/../.."
data=${1:-../shared/data/debtags-dev.jsonl}
out=${2:-$(mktemp -d)}
mkdir -p "$out"
venv=${SIFT_ANCHORS_VENV:-$HOME/.cache/sift-anchors}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "scikit-learn==1.9.1" "numpy<3" "xxhash==4.1.0" "fasttext-numpy2==0.10.4"
fi
echo "== anchors on sift's split"
"$venv/bin/python" benches/anchors/anchors.py "$data" --json "$out/anchors.json"
echo "== sift train (default preset) on the same data"
cargo run --locked --quiet --release -p sift-training --example train_jsonl -- "$data" "$out/model"
echo "== files in $out"
ls "$out" "$out/model"

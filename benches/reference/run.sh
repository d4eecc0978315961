#!/usr/bin/env bash
# Compares sift's CPU inference with a PyTorch reference (and, with --onnx,
# ONNX Runtime): same weights, same token ids, same batches, same threads.
# See benches/reference/README.md. Not part of CI.
#
#   benches/reference/run.sh MODEL_DIR DATA.jsonl [--limit N] [--batch B]
#       [--threads T] [--repeat R] [--onnx] [--int8] [--sdpa] [--out DIR]
#
# Environment: SIFT_BIN (default target/debug/sift, built if missing),
# PYTHON (the interpreter that creates the virtualenv, default python3).
set -euo pipefail

usage() {
    sed -n '6,10p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"

[ $# -ge 2 ] || usage
model="$(realpath "$1")"
data="$(realpath "$2")"
shift 2
limit=2000
batch=32
threads="$(nproc)"
repeat=3
onnx=0
sdpa=0
int8=0
out=""
while [ $# -gt 0 ]; do
    case "$1" in
        --limit) limit="$2"; shift 2 ;;
        --batch) batch="$2"; shift 2 ;;
        --threads) threads="$2"; shift 2 ;;
        --repeat) repeat="$2"; shift 2 ;;
        --out) out="$(realpath -m "$2")"; shift 2 ;;
        --onnx) onnx=1; shift ;;
        --int8) int8=1; shift ;;
        --sdpa) sdpa=1; shift ;;
        -h|--help) usage ;;
        *) echo "run.sh: unknown argument $1" >&2; usage ;;
    esac
done
for f in config.json model.safetensors tokenizer.json labels.json; do
    [ -f "$model/$f" ] || { echo "run.sh: $model has no $f; pass a model directory" >&2; exit 2; }
done
[ -f "$data" ] || { echo "run.sh: no such data file $data" >&2; exit 2; }
if [ -z "$out" ]; then
    out="$root/target/reference/$(basename "$model")-n$limit-b$batch-t$threads"
fi

# The virtualenv, created on first use and refreshed whenever the pinned
# requirements change (a stamp inside it records what was installed).
venv="$here/.venv"
requirements=("$here/requirements.txt")
[ "$onnx" = 1 ] && requirements+=("$here/requirements-onnx.txt")
want="$(cat "${requirements[@]}" | sha256sum | cut -d' ' -f1)"
stamp="$venv/.installed-$(basename "${requirements[-1]}" .txt)"
if [ ! -x "$venv/bin/python" ]; then
    echo "Creating $venv (torch and its nvidia-* wheels: a few GB, once)." >&2
    "${PYTHON:-python3}" -m venv "$venv"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    args=()
    for r in "${requirements[@]}"; do args+=(-r "$r"); done
    "$venv/bin/pip" install --quiet --disable-pip-version-check "${args[@]}"
    echo "$want" >"$stamp"
fi

# sift's side: tokenizes, times the forward passes, exports the token ids.
sift="${SIFT_BIN:-$root/target/debug/sift}"
if [ ! -x "$sift" ]; then
    if [ -n "${SIFT_BIN:-}" ]; then
        echo "run.sh: SIFT_BIN=$SIFT_BIN is not an executable" >&2
        exit 2
    fi
    (cd "$root" && cargo build --bin sift)
fi
mkdir -p "$out"
echo "== sift bench model -> $out" >&2
(cd "$root" && "$sift" bench model --model "$model" --data "$data" --limit "$limit" \
    --batch "$batch" --threads "$threads" --repeat "$repeat" --export "$out")
if [ "$int8" = 1 ]; then
    echo "== sift bench model --dtype int8 -> $out/int8" >&2
    (cd "$root" && "$sift" bench model --model "$model" --data "$data" --limit "$limit" \
        --batch "$batch" --threads "$threads" --repeat "$repeat" --dtype int8 --export "$out/int8")
fi

# The reference: the same ids, batches and thread count.
echo "== PyTorch reference" >&2
py_args=(--model "$model" --export "$out" --batch "$batch" --threads "$threads" --repeat "$repeat")
[ "$onnx" = 1 ] && py_args+=(--onnx)
[ "$int8" = 1 ] && py_args+=(--int8-export "$out/int8")
[ "$sdpa" = 1 ] && py_args+=(--sdpa)
# One thread pool each, of the size asked for: OpenMP (torch) reads these.
OMP_NUM_THREADS="$threads" MKL_NUM_THREADS="$threads" \
    "$venv/bin/python" "$here/torch_reference.py" "${py_args[@]}"

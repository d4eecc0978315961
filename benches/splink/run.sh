#!/usr/bin/env bash
# Compares sift's identity matching with Splink (link_only, DuckDB) on the
# data sift dbusa generate wrote. See benches/splink/README.md. Not part of CI.
#
#   benches/splink/run.sh DIR [--sift MATCHES.jsonl] [--threads N] [--seed S]
#       [--max-pairs N] [--recall R] [--out FILE] [--verbose]
#   benches/splink/run.sh --self-test
#
# Environment: PYTHON (the interpreter that creates the virtualenv, default python3).
set -euo pipefail

usage() {
    sed -n '5,9p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

[ $# -ge 1 ] || usage
args=()
dir=""
while [ $# -gt 0 ]; do
    case "$1" in
        --sift) args+=(--sift "$(realpath "$2")"); shift 2 ;;
        --threads|--seed|--max-pairs|--recall) args+=("$1" "$2"); shift 2 ;;
        --out) args+=(--out "$(realpath -m "$2")"); shift 2 ;;
        --verbose|--self-test) args+=("$1"); shift ;;
        -h|--help) usage ;;
        -*) echo "run.sh: unknown argument $1" >&2; usage ;;
        *)
            [ -z "$dir" ] || { echo "run.sh: one DIR only (got $dir and $1)" >&2; usage; }
            dir="$(realpath "$1")"; shift ;;
    esac
done
if [ -n "$dir" ]; then
    for f in dbusa.csv profiles.jsonl; do
        [ -f "$dir/$f" ] || {
            echo "run.sh: $dir has no $f; write it with sift dbusa generate ... --out $dir" >&2
            exit 2
        }
    done
    args=("$dir" "${args[@]}")
fi

# The virtualenv, created on first use and refreshed whenever the pinned
# requirements change (a stamp inside it records what was installed).
venv="$here/.venv"
want="$(sha256sum "$here/requirements.txt" | cut -d' ' -f1)"
stamp="$venv/.installed-requirements"
if [ ! -x "$venv/bin/python" ]; then
    echo "Creating $venv (splink, duckdb, pandas: about 300 MB, once)." >&2
    "${PYTHON:-python3}" -m venv "$venv"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$here/requirements.txt"
    echo "$want" >"$stamp"
fi

"$venv/bin/python" "$here/compare.py" "${args[@]}"

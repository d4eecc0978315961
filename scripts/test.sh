#!/usr/bin/env bash
# The test command: set up, then formatting, lints, and every test of the
# workspace (unit, conformance suites, crash test) on the embedded backends.
set -euo pipefail
cd "$(dirname "$0")/.."

step() {
  local name=$1; shift
  local t0=$SECONDS
  echo "==> $name: $*"
  "$@"
  echo "==> $name took $((SECONDS - t0)) s"
}

step setup scripts/setup.sh
step fmt cargo fmt --all --check
step clippy cargo clippy --workspace --all-targets --locked -- -D warnings
step test cargo test --workspace --locked

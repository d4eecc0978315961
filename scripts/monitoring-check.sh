#!/usr/bin/env bash
# Checks the Prometheus side of deploy/: the scrape configuration and the
# alerting rules with `promtool check config` / `promtool check rules`, and
# the rules' unit tests with `promtool test rules`. promtool comes from
# Debian's `prometheus` package, installed when missing (its service is not
# started). The metric names the rules and the Grafana dashboard use are
# checked against what sift exports by tests/monitoring.rs.
set -euo pipefail
cd "$(dirname "$0")/../deploy/prometheus"

if ! command -v promtool >/dev/null 2>&1; then
  sudo_cmd=""
  [[ $(id -u) -eq 0 ]] || sudo_cmd=sudo
  echo "monitoring-check.sh: installing Debian's prometheus package for promtool" >&2
  $sudo_cmd apt-get update -qq >&2
  # Refuse service starts during the install (no Prometheus daemon is wanted
  # here); only when the machine has no policy of its own.
  policy=/usr/sbin/policy-rc.d added=0
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' | $sudo_cmd tee "$policy" >/dev/null
    $sudo_cmd chmod +x "$policy"
    added=1
  fi
  rc=0
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends prometheus >&2 || rc=$?
  [[ $added -eq 0 ]] || $sudo_cmd rm -f "$policy"
  [[ $rc -eq 0 ]] || { echo "monitoring-check.sh: apt-get install prometheus failed" >&2; exit 1; }
fi
promtool --version 2>&1 | head -n 1
promtool check config prometheus.yml
promtool check rules sift-alerts.yml
promtool test rules tests/sift-alerts.test.yml

#!/usr/bin/env bash
# Installs what the review UI's browser test (tests/review_browser.rs) needs:
# Debian's Chromium (never a browser build of its own: playwright-core drives
# the system one) and the Node packages of tests/browser. Safe to run again:
# it only installs what is missing or stale, and says nothing when all is there.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x /usr/bin/chromium ]; then
  echo "browser-setup: installing Debian's chromium"
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends \
    chromium fonts-dejavu-core >/dev/null
fi

if ! command -v npm >/dev/null 2>&1; then
  echo "browser-setup: npm is missing; install Node.js 20 or newer (Debian: apt-get install nodejs npm)" >&2
  exit 1
fi
# A copy of the lock file npm ci installed from marks node_modules as current;
# a changed lock file (or none installed yet) means npm ci again.
dir=tests/browser
stamp=$dir/node_modules/.sift-installed-lock.json
if ! cmp -s "$dir/package-lock.json" "$stamp" 2>/dev/null; then
  echo "browser-setup: installing tests/browser's Node packages (npm ci)"
  (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
  cp "$dir/package-lock.json" "$stamp"
fi

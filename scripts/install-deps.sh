#!/usr/bin/env bash
# Installs the Debian packages kof's tests (and, with --bench, its benchmarks) need, and
# configures the real Nix. Idempotent; needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
lists=(.ci/apt-packages)
[ "${1:-}" = "--bench" ] && lists+=(.ci/apt-packages-bench)
# shellcheck disable=SC2046
pkgs=$(grep -hv '^#' "${lists[@]}" | xargs)
missing=$(dpkg-query -W -f='${db:Status-Abbrev} ${Package}\n' $pkgs 2>/dev/null | awk '$1 != "ii" {print $2}' || true)
if [ -n "$missing" ] || ! dpkg-query -W $pkgs >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # shellcheck disable=SC2086
  apt-get install -y -qq --no-install-recommends $pkgs >/dev/null
fi
./scripts/setup-nix-conf.sh

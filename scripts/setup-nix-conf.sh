#!/usr/bin/env bash
# Writes /etc/nix/nix.conf so Debian's nix-bin (Nix 2.8) works as root on these machines without
# a daemon, a sandbox or network substituters (see shared/reference/machine.md).
set -euo pipefail
mkdir -p /etc/nix
if ! grep -qs '^experimental-features = nix-command' /etc/nix/nix.conf; then
  [ -f /etc/nix/nix.conf ] && cp /etc/nix/nix.conf /etc/nix/nix.conf.kof-backup
  cat > /etc/nix/nix.conf <<'CONF'
build-users-group =
sandbox = false
filter-syscalls = false
substituters =
experimental-features = nix-command
CONF
fi
